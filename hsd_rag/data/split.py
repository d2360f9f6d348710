"""Deterministic held-out split: EAGLE head training and benchmarks must never see the same prompt.

Membership depends only on an example's id (and a seed), not on list order or on which other examples are
present, so a benchmark run and a training run that load different subsets still agree on every shared id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

HASH_BYTES = 8  # 64 bits of sha256: uniform enough for any fraction a split uses


class HasId(Protocol):
    id: str


T = TypeVar("T", bound=HasId)


def unit_hash(key: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()[:HASH_BYTES]
    return int.from_bytes(digest, "big") / 2 ** (8 * HASH_BYTES)


def is_heldout(example_id: str, heldout_fraction: float, seed: int = 0) -> bool:
    return unit_hash(example_id, seed) < heldout_fraction


def split(examples: Sequence[T], heldout_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, heldout), each in input order; about `heldout_fraction` of the ids go to heldout."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train, heldout = [], []
    for example in examples:
        (heldout if is_heldout(example.id, heldout_fraction, seed) else train).append(example)
    return train, heldout
