"""Train / held-out splits: every stage holds out whole keys (a text, a prompt), never parts of one.

Two ways to choose the held-out keys, on purpose:
- `shuffled_split`: a seeded shuffle, then a cut. Used where one run makes the split once
  (the corpus, SFT pairs, a reward-model data file, chatterbot prompts).
- `hash_split`: a key is held out when its hash falls below the fraction. Used across pipeline
  rounds, where the data grows each round and a prompt held out once must stay held out.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def held_out_count(n: int, fraction: float) -> int:
    """⌊n·fraction⌋, at least one: a split with nothing held out measures nothing."""
    return max(1, int(n * fraction))


def shuffled_split(keys: Sequence[K], fraction: float, rng: random.Random,
                   count: int | None = None) -> tuple[list[K], list[K]]:
    """(train, held_out): `keys` shuffled by `rng`, the first `count` (default `held_out_count`) held out."""
    order = list(keys)
    rng.shuffle(order)
    n_held = held_out_count(len(order), fraction) if count is None else count
    return order[n_held:], order[:n_held]


def hash_held_out(key: str, fraction: float) -> bool:
    """Stable across runs, rounds and machines: the same key is held out every time."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def hash_split(keys: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out) keys by `hash_held_out`; with few keys, where the hash may leave a side
    empty, the first `held_out_count` keys in sorted order are held out instead."""
    unique = sorted(set(keys))
    held = [k for k in unique if hash_held_out(k, fraction)]
    if not held or len(held) == len(unique):
        held = unique[:held_out_count(len(unique), fraction)]
    held_set = set(held)
    return [k for k in unique if k not in held_set], held


def split_items(items: Sequence[T], key: Callable[[T], K], held_keys: Sequence[K]) -> tuple[list[T], list[T]]:
    """(train, held_out) items, in their order, by whether their key is held out."""
    held = set(held_keys)
    return [it for it in items if key(it) not in held], [it for it in items if key(it) in held]
