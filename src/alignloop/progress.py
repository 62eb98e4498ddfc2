"""Progress bars for every long loop (tqdm: plain in logs, live in a terminal).

TQDM_DISABLE=1 in the environment turns them all off (tqdm reads it), for quiet logs.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             disable: bool = False, **kwargs) -> tqdm:
    if disable:  # passed only when set, so that tqdm's own TQDM_DISABLE variable still applies
        kwargs["disable"] = True
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=True, **kwargs)
