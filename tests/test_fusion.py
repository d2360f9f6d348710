"""Fusion of n-gram and EAGLE trees under one budget.

Synthetic truth: at every prefix the target's next-token distribution p(. | prefix) is fixed, so under lossless
sampling the probability that the output passes through a node is the product of p along its path, and the
expected number of accepted drafts of a tree is the sum of those products over its nodes. Drafters whose scores
are these true path probabilities play "calibrated" sources.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_rag.drafters.base import DraftContext
from hsd_rag.drafters.hybrid import FixedFusion, HybridDrafter, fuse_adaptive
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree, source_names

VOCAB = 6
ROOT = 0


def true_p(prefix: tuple[int, ...], token: int, seed: int) -> float:
    """A fixed random next-token distribution per prefix (the synthetic target)."""
    rng = random.Random(hash((prefix, seed)))
    weights = [rng.random() ** 3 for _ in range(VOCAB)]
    return weights[token] / sum(weights)


def path_tokens(tree: TokenTree, node: int) -> tuple[int, ...]:
    return tuple(tree.tokens[n] for n in tree.path_to(node)[1:])


def expected_accepted(tree: TokenTree, seed: int) -> float:
    total = 0.0
    for node in range(1, len(tree)):
        toks = path_tokens(tree, node)
        prob = 1.0
        for i, t in enumerate(toks):
            prob *= true_p(toks[:i], t, seed)
        total += prob
    return total


def random_source_tree(source: int, seed: int, rng: random.Random, nodes: int) -> TokenTree:
    """A random tree whose scores are the true path probabilities (a calibrated source)."""
    tree = TokenTree.root(ROOT)
    for _ in range(nodes):
        parent = rng.randrange(len(tree))
        if tree.depths[parent] >= 6:
            continue
        token = rng.randrange(VOCAB)
        prefix = path_tokens(tree, parent)
        parent_score = tree.scores[parent] if parent else 1.0
        tree.add(parent, token, parent_score * true_p(prefix, token, seed), source)
    return tree


class StubDrafter:
    def __init__(self, tree: TokenTree):
        self.tree, self.budgets = tree, []

    def start(self, prompt_ids, documents): ...
    def observe(self, outcome): ...
    def close(self): ...

    def propose(self, context: DraftContext) -> TokenTree:
        self.budgets.append(context.budget)
        return self.tree.truncate(context.budget)


def ctx(budget: int) -> DraftContext:
    return DraftContext([5, ROOT], 1, budget)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 24), n1=st.integers(0, 30), n2=st.integers(0, 30))
def test_adaptive_never_worse_than_either_source_or_fixed(seed, budget, n1, n2):
    rng = random.Random(seed)
    ngram = random_source_tree(SOURCE_NGRAM, seed, rng, n1)
    eagle = random_source_tree(SOURCE_EAGLE, seed, rng, n2)
    fused = fuse_adaptive([ngram, eagle], budget)
    fixed = FixedFusion().fuse(ctx(budget), [StubDrafter(ngram), StubDrafter(eagle)])
    e_fused = expected_accepted(fused, seed)
    tolerance = 1e-9
    assert fused.num_drafts == min(budget, len({path_tokens(t, n) for t in (ngram, eagle) for n in range(1, len(t))}))
    assert e_fused + tolerance >= expected_accepted(ngram.truncate(budget), seed)
    assert e_fused + tolerance >= expected_accepted(eagle.truncate(budget), seed)
    assert e_fused + tolerance >= expected_accepted(fixed, seed)
    assert fixed.num_drafts <= budget


def test_adaptive_beats_fixed_when_the_match_is_weak():
    # The n-gram source found a 10-token continuation it is unsure of; EAGLE is confident about its chain.
    ngram = TokenTree.root(ROOT)
    ngram.add_path([1] * 10, [0.05 * 0.9**i for i in range(10)], SOURCE_NGRAM)
    eagle = TokenTree.root(ROOT)
    eagle.add_path([2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5], [0.9**i for i in range(1, 13)], SOURCE_EAGLE)
    fused = fuse_adaptive([ngram, eagle], 12)
    fixed = FixedFusion().fuse(ctx(12), [StubDrafter(ngram), StubDrafter(eagle)])

    def expected(tree):  # scores are the true probabilities here
        return sum(tree.scores[1:])

    assert fused.tokens[1:] == [2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5]
    assert expected(fused) > expected(fixed) * 1.5


def test_budget_ancestors_duplicates_and_labels():
    ngram = TokenTree.root(ROOT)
    ngram.add_path([1, 2, 3], [0.8, 0.7, 0.6], SOURCE_NGRAM)
    eagle = TokenTree.root(ROOT)
    eagle.add_path([1, 2, 4], [0.9, 0.5, 0.4], SOURCE_EAGLE)
    eagle.add_path([5], [0.05], SOURCE_EAGLE)
    fused = fuse_adaptive([ngram, eagle], 4)
    assert fused.num_drafts == 4
    assert fused.tokens == [0, 1, 2, 3, 4]  # the shared prefix 1-2 counted once; 5 (0.05) drops out
    assert source_names(fused.sources[1]) == ["ngram", "eagle"]
    assert source_names(fused.sources[2]) == ["ngram", "eagle"]
    assert source_names(fused.sources[3]) == ["ngram"]
    assert source_names(fused.sources[4]) == ["eagle"]
    assert fused.scores[1] == 0.9
    for node in range(1, len(fused)):
        assert all(a in range(len(fused)) for a in fused.path_to(node))


def test_fixed_carves_ngram_share_out_of_the_eagle_budget():
    ngram = TokenTree.root(ROOT)
    ngram.add_path(list(range(1, 13)), [0.5] * 12, SOURCE_NGRAM)
    eagle_stub = StubDrafter(random_source_tree(SOURCE_EAGLE, 1, random.Random(1), 40))
    fixed = FixedFusion(ngram_branches=2, ngram_length=10).fuse(ctx(16), [StubDrafter(ngram), eagle_stub])
    assert eagle_stub.budgets == [6]  # 16 - one 10-token continuation
    assert fixed.num_drafts <= 16


def test_hybrid_drafter_passes_calls_to_every_source():
    a, b = StubDrafter(TokenTree.root(ROOT)), StubDrafter(TokenTree.root(ROOT))
    hybrid = HybridDrafter([a, b])
    hybrid.propose(ctx(8))
    assert a.budgets == [8] and b.budgets == [8]


def test_siblings_from_two_sources_compete_for_one_acceptance():
    """A confident n-gram child leaves little room for the head's sibling: its score is capped to what is left,
    so the budget goes to the n-gram chain's next token instead."""
    ngram = TokenTree.root(ROOT)
    ngram.add_path([1, 2], [0.9, 0.8], SOURCE_NGRAM)
    eagle = TokenTree.root(ROOT)
    eagle.add_path([3], [0.5], SOURCE_EAGLE)  # beside the n-gram's 1 (0.9): capped to 0.1
    eagle.add_path([1, 4], [0.9, 0.6], SOURCE_EAGLE)  # beside the n-gram's 2 (0.8 / 0.9 = 0.89): 0.9 x 0.11 = 0.1
    fused = fuse_adaptive([ngram, eagle], 3)
    scores = dict(zip(fused.tokens, fused.scores, strict=True))
    assert sorted(fused.tokens) == [0, 1, 2, 3]  # raw scores would have kept 4 (0.6); capped, the tie goes shallower
    assert abs(scores[3] - 0.1) < 1e-9  # the head's root child keeps only what the n-gram's 0.9 left
    assert abs(sum(fused.scores[n] for n in fused.children(0)) - 1.0) < 1e-9
