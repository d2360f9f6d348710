"""The drafter protocol: the decode loop talks to every draft source through these three calls.

A drafter lives for one generation (one request), so per-request state such as the n-gram index over the
retrieved chunks can never leak into another request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hsd_rag.tree import TokenTree


@dataclass
class DraftContext:
    """What a drafter sees when asked for drafts at one step."""

    token_ids: list[int]  # [t] prompt + generated tokens; token_ids[-1] is the pending root (not yet in the cache)
    prompt_length: int  # how many of token_ids are the prompt
    budget: int  # at most this many draft nodes will be verified (the tree is truncated to it afterwards)
    min_score: float = 0.0  # drafts whose acceptance estimate is below this never pay for their verification


@dataclass
class StepOutcome:
    """What the target decided at one step, reported back to the drafter."""

    tree: TokenTree  # the tree that was verified
    accepted_nodes: list[int]  # node ids on the accepted path, root first (the root is always accepted)
    new_tokens: list[int]  # tokens appended to the output this step: accepted drafts, then the bonus token


@runtime_checkable
class Drafter(Protocol):
    """A draft source. `start` once per request, then `propose`/`observe` once per step, `close` at the end."""

    name: str

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        """Begin a request: the prompt tokens and extra tokenized documents (e.g. retrieved chunks)."""

    def propose(self, context: DraftContext) -> TokenTree:
        """Return a scored tree rooted at `context.token_ids[-1]` (it may hold more than `budget` drafts)."""

    def observe(self, outcome: StepOutcome) -> None:
        """Learn what was accepted (append tokens to indexes, move feature caches, calibrate scores)."""

    def close(self) -> None:
        """Release per-request resources (hooks, caches)."""


class NoDrafter:
    """Proposes nothing: the loop then decodes one token per target forward (method="vanilla")."""

    name = "vanilla"

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        return TokenTree.root(context.token_ids[-1])

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def close(self) -> None:
        pass
