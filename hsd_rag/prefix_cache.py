"""Reuse the KV rows of a prompt prefix that an earlier request already prefilled (vLLM's "automatic prefix
caching"): a RAG app's system prompt and instructions, its chat template, a chunk retrieved again first.

Why it is exact: keys and values at position t depend only on tokens 0..t, so the rows an earlier prompt
computed for a shared prefix are the rows this prompt would compute, up to the float rounding of a different
matrix shape (the same rounding that already separates a tree forward from one-token decoding). Entries are the
prefilled prompts of recent requests (copied out, LRU, bounded in bytes); a request copies the longest shared
prefix's rows into its own new cache, so no entry ever changes while requests read it. Only caches of
full-attention layers are kept (sliding-window layers drop their oldest rows). Entries are dropped when the
model's weights change (`weights_key`: each parameter's storage and in-place version).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hsd_rag.tensor_stamp import edit_stamp

DEFAULT_MAX_BYTES = 256 * 2**20  # SmolLM2-135M: ~46 KB per token in float32, so ~5,700 prompt tokens
DEFAULT_MAX_ENTRIES = 8
MIN_REUSE_TOKENS = 16  # shorter shared prefixes save less than the lookup and copy cost


@dataclass(frozen=True)
class _Entry:
    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: keys, values [B, kv_heads, T, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def weights_key(model) -> int:
    """Changes whenever a parameter of `model` is replaced or edited in place (inference tensors: replaced)."""
    return hash(tuple(edit_stamp(p) for p in model.parameters()))


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Prefilled prompts of recent requests, thread-safe; `restore` before a prefill, `store` after it."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES,
                 min_reuse: int = MIN_REUSE_TOKENS):
        if max_bytes < 0 or max_entries < 0 or min_reuse < 1:
            raise ValueError("max_bytes and max_entries must be >= 0 and min_reuse >= 1.")
        self.max_bytes, self.max_entries, self.min_reuse = max_bytes, max_entries, min_reuse
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._weights = None  # weights_key of the model the entries were computed with
        self.hits = 0  # requests that reused a prefix
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to it

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def restore(self, token_ids: Sequence[int], cache, weights: int | None = None) -> int:
        """Copy the rows of the longest stored prefix of `token_ids` into the empty `cache`; returns how many
        leading tokens no longer need a prefill (0: nothing long enough is stored). `weights`: the model's
        `weights_key`; entries computed with other weights are dropped."""
        with self._lock:
            if weights != self._weights:
                self._entries.clear()
                self._weights = weights
            best, length = None, 0
            for entry in self._entries.values():
                n = shared_prefix_length(entry.tokens, token_ids)
                if n > length:
                    best, length = entry, n
            if best is None or length < self.min_reuse:
                return 0
            self._entries.move_to_end(best.tokens)
            self.hits += 1
            self.reused_tokens += length
        for index, (keys, values) in enumerate(best.layers):  # entries are never mutated: copy outside the lock
            cache.update(keys[..., :length, :], values[..., :length, :], index)
        return length

    def store(self, token_ids: Sequence[int], cache) -> None:
        """Keep a copy of `cache`'s rows for `token_ids` (the prefilled prompt), evicting the oldest entries."""
        tokens = tuple(int(t) for t in token_ids)
        if len(tokens) < self.min_reuse or self.max_entries == 0:
            return
        with self._lock:
            if tokens in self._entries:  # the same prompt again: its rows are stored already
                self._entries.move_to_end(tokens)
                return
        layers = tuple(
            (layer.keys[..., : len(tokens), :].clone(), layer.values[..., : len(tokens), :].clone())
            for layer in cache.layers
        )
        entry = _Entry(tokens, layers)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries.pop(tokens, None)
            # a stored prompt that is a prefix of the new one is redundant: the new entry covers it
            for key in [k for k in self._entries if len(k) <= len(tokens) and tokens[: len(k)] == k]:
                del self._entries[key]
            self._entries[tokens] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while self._entries and (len(self._entries) > self.max_entries or total > self.max_bytes):
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
