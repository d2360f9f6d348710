"""The drafter protocol: the decode loop talks to every draft source through these three calls.

A drafter lives for one generation (one request), so per-request state such as the n-gram index over the
retrieved chunks can never leak into another request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hsd_rag.tree import TokenTree

if TYPE_CHECKING:
    from hsd_rag.budget import CostProfile


@dataclass
class DraftContext:
    """What a drafter sees when asked for drafts at one step."""

    token_ids: list[int]  # [t] prompt + generated tokens; token_ids[-1] is the pending root (not yet in the cache)
    prompt_length: int  # how many of token_ids are the prompt
    budget: int  # at most this many draft nodes will be verified (the tree is truncated to it afterwards)
    min_score: float = 0.0  # drafts whose acceptance estimate is below this never pay for their verification
    profile: CostProfile | None = None  # verify and drafting costs on this device (None: costs unknown)
    auto_budget: bool = False  # True: the tree is sized by `profile` (budget="auto"); False: cut to `budget`


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


def skip_prefix_features(drafter, count: int) -> None:
    """Tell a drafter that the prefill will not run over the first `count` prompt tokens (their KV rows came from
    an earlier request): a drafter that reads the prefill's features (EAGLE) implements `skip_prefix_features`,
    called after `start` and before the prefill; the others need nothing."""
    method = getattr(drafter, "skip_prefix_features", None)
    if method is not None:
        method(count)


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


def record_outcomes(
    outcome: StepOutcome,
    source: int,
    proposed: dict[tuple[int, ...], int],
    record: Callable[[int, bool], None],
) -> None:
    """Report every verified draft of `source` that was decided (its parent was accepted): accepted or not.

    `proposed` maps the token path below the root of each draft the source proposed to its calibration bucket.
    Nodes are matched by token path, not node id, so a tree that was truncated or fused with other sources
    (renumbered nodes) still calibrates the right buckets.
    """
    tree, accepted = outcome.tree, outcome.accepted_nodes
    if not accepted:
        return
    accepted_set = set(accepted)
    paths: dict[int, tuple[int, ...]] = {accepted[0]: ()}  # accepted node -> token path below the root
    for node in accepted[1:]:
        paths[node] = paths[tree.parents[node]] + (tree.tokens[node],)
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        if parent in accepted_set and tree.sources[node] & source:
            bucket = proposed.get(paths[parent] + (tree.tokens[node],))
            if bucket is not None:
                record(bucket, node in accepted_set)
