"""Hybrid drafting: several draft sources fused into ONE token tree under ONE budget.

The loop sees a single drafter; this one asks every source for a tree and fuses them.

`adaptive` (default). Every candidate node u, from either source, carries s(u) = an estimate of
P(u is accepted), the probability that the target's decode passes through u:
  - EAGLE: the head's path probability Π q(x_i | x_<i) along the path (an estimate of the target's own);
  - n-gram: Π over the path of the calibrated conditional acceptance rate of its (match length, branch
    frequency share) bucket, learned online from this request's accept/reject outcomes.
A node proposed by both sources is one node labelled with both, scored max(s_ngram, s_eagle). The children of
one node compete for one acceptance (the target takes exactly one token after it), so their conditional estimates
are capped, best first, to sum to at most 1 (`TokenTree.exclusive_children`): an n-gram child at 0.9 leaves a head
sibling at most 0.1, whatever each source thought alone (on English RAG prompts this took τ at budget 16 from 3.47
to 3.80 with answer history off, and stopped head nodes from inflating auto-sized trees). The expected
number of accepted drafts of a tree T is E[A] = Σ_{u∈T} P(u accepted) (linearity of expectation over the
indicator of each node being on the accepted path). Scores are monotone along paths, so the `budget` highest
scores form an ancestor-closed set, and no other ancestor-closed set of that size has a larger Σ s(u):
keeping them maximises the estimated E[A] over all trees the budget allows. Hence, with calibrated scores,
the fused tree is never worse in expectation than either source alone, nor than any fixed split. A source that
costs time to draft is asked only when its drafts are expected to raise tokens per second (source_gate.py).

`fixed`: the research prototype's scheme, kept as the baseline — up to `ngram_branches` n-gram continuations of
`ngram_length` tokens each are carved out of the budget whenever a match exists (blind to how confident the
match is) and the EAGLE tree fills what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from hsd_rag.drafters.base import DraftContext, Drafter, StepOutcome, skip_prefix_features
from hsd_rag.drafters.source_gate import SourceGate
from hsd_rag.tree import TokenTree

PROTOTYPE_NGRAM_BRANCHES = 2  # n-gram continuations per step in the prototype
PROTOTYPE_NGRAM_LENGTH = 10  # tokens copied per continuation in the prototype


class FusionPolicy(Protocol):
    def fuse(self, context: DraftContext, drafters: Sequence[Drafter]) -> TokenTree: ...


class AdaptiveFusion:
    """Union of all sources' trees, then the `budget` nodes with the highest acceptance estimates.

    Sources are asked in order. Under budget="auto" (trees sized for tokens per second), one that costs time to
    draft (the device's CostProfile gives it a drafting cost, e.g. an EAGLE head) is asked only while its drafts
    are expected to pay for that cost (SourceGate), and then with a score floor: levels whose nodes could not
    displace the free sources' kept nodes are never drafted. A fixed budget asks every source every step: the
    caller chose the tree size, and it is filled with the best nodes of all of them.
    """

    name = "adaptive"

    def __init__(self, gated: bool = True, gates: dict[str, SourceGate] | None = None):
        """`gates`: per costly source, shared by the requests of one decoder (learned gains carry over);
        default: this request's own."""
        self.gated = gated
        self._gates: dict[str, SourceGate] = gates if gates is not None else {}
        self._counts: dict[str, list[int]] = {}  # per costly source: [asked, skipped] in this request
        for name, gate in self._gates.items():
            gate.new_request()
            self._counts[name] = [0, 0]

    def fuse(self, context: DraftContext, drafters: Sequence[Drafter]) -> TokenTree:
        trees: list[TokenTree] = []
        profile = context.profile
        for drafter in drafters:
            free = profile is None or profile.draft_cost(drafter.name, 1) == 0
            if not self.gated or not context.auto_budget or free:
                trees.append(drafter.propose(context))
                continue
            free_scores = _sorted_scores(trees, context)
            free_rate = _rate(profile, free_scores, context, 0.0)
            gate = self._gates.setdefault(drafter.name, SourceGate())
            counts = self._counts.setdefault(drafter.name, [0, 0])
            if not gate.should_ask(free_rate):
                counts[1] += 1
                continue
            counts[0] += 1
            levels_before = getattr(drafter, "levels_drafted", 0)
            # a draft that could not displace the free sources' nodes from the auto-sized tree is never drafted
            floor = profile.entry_floor(free_scores, context.budget, profile.draft_cost(drafter.name, 1))
            tree = drafter.propose(replace(context, min_score=max(context.min_score, floor)))
            levels = getattr(drafter, "levels_drafted", 1) - levels_before
            trees.append(tree)
            cost = profile.draft_cost(drafter.name, levels)
            gate.learn(free_rate, _rate(profile, _sorted_scores(trees, context), context, cost))
        if not trees:
            return TokenTree.root(context.token_ids[-1])
        return fuse_adaptive(trees, context.budget)

    def gate_counts(self) -> dict[str, tuple[int, int]]:
        """Per costly source: (steps it was asked, steps it was skipped) in this request."""
        return {name: (asked, skipped) for name, (asked, skipped) in self._counts.items()}


def _sorted_scores(trees: Sequence[TokenTree], context: DraftContext) -> list[float]:
    """Acceptance estimates of the drafts of the fused trees, best first (at most `budget` of them)."""
    if not trees:
        return []
    fused = trees[0] if len(trees) == 1 else fuse_adaptive(trees, context.budget)
    return sorted(fused.effective_scores()[1:], reverse=True)[: context.budget]


def _rate(profile, sorted_scores: list[float], context: DraftContext, drafting_cost: float) -> float:
    """Expected tokens per unit of time of a step: sized by the profile (auto) or cut to the budget."""
    if context.auto_budget:
        return profile.best_rate(sorted_scores, context.budget, drafting_cost)[1]
    return profile.fixed_rate(sorted_scores, context.budget, drafting_cost)


def fuse_adaptive(trees: Sequence[TokenTree], budget: int) -> TokenTree:
    fused = TokenTree.root(trees[0].tokens[0])
    for tree in trees:
        fused.merge(tree)
    if len(trees) > 1:  # siblings from different sources compete for one acceptance (TokenTree.exclusive_children)
        fused = fused.exclusive_children()
    return fused.truncate(budget)


@dataclass
class FixedFusion:
    """The prototype's split: n-gram continuations take a fixed share, the EAGLE tree the rest."""

    ngram_branches: int = PROTOTYPE_NGRAM_BRANCHES
    ngram_length: int = PROTOTYPE_NGRAM_LENGTH
    name: str = "fixed"

    def fuse(self, context: DraftContext, drafters: Sequence[Drafter]) -> TokenTree:
        ngram, eagle = drafters
        ngram_paths = self._ngram_paths(ngram.propose(context), context.budget)
        used = sum(len(p) for p in ngram_paths)
        eagle_tree = eagle.propose(replace(context, budget=max(0, context.budget - used)))
        return fuse_fixed(ngram_paths, eagle_tree, context.budget)

    def _ngram_paths(self, tree: TokenTree, budget: int) -> list[list[tuple[int, float, int]]]:
        """Up to `ngram_branches` root-to-leaf paths (longest match first), each cut to `ngram_length`."""
        paths, room = [], budget
        for leaf_path in sorted(tree.paths(), key=lambda p: -tree.scores[p[1]] if len(p) > 1 else 0.0):
            if len(paths) == self.ngram_branches or room <= 0 or len(leaf_path) < 2:
                break
            nodes = leaf_path[1 : 1 + min(self.ngram_length, room)]
            paths.append([(tree.tokens[n], tree.scores[n], tree.sources[n]) for n in nodes])
            room -= len(nodes)
        return paths


def fuse_fixed(ngram_paths, eagle_tree: TokenTree, budget: int) -> TokenTree:
    fused = TokenTree.root(eagle_tree.tokens[0])
    for path in ngram_paths:
        parent = 0
        for token, score, source in path:
            parent = fused.add(parent, token, score, source)
    fused.merge(eagle_tree)
    # shared prefixes can only shrink the union; a surplus (EAGLE ignoring its share) is cut by score
    return fused if fused.num_drafts <= budget else fused.truncate(budget)


class HybridDrafter:
    """Several drafters behind one: each proposes, the policy fuses, each observes the verified outcome."""

    name = "hybrid"

    def __init__(self, drafters: Sequence[Drafter], policy: FusionPolicy | None = None):
        if not drafters:
            raise ValueError("HybridDrafter needs at least one drafter.")
        self.drafters = list(drafters)
        self.policy = policy or AdaptiveFusion()

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        for drafter in self.drafters:
            drafter.start(prompt_ids, documents)

    def skip_prefix_features(self, count: int) -> None:
        for drafter in self.drafters:
            skip_prefix_features(drafter, count)

    def propose(self, context: DraftContext) -> TokenTree:
        return self.policy.fuse(context, self.drafters)

    def observe(self, outcome: StepOutcome) -> None:
        for drafter in self.drafters:
            drafter.observe(outcome)

    def close(self) -> None:
        for drafter in self.drafters:
            drafter.close()
