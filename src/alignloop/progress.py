"""Progress bars for every long loop (tqdm: plain in logs, live in a terminal)."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             disable: bool = False, **kwargs) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=True, **kwargs)
