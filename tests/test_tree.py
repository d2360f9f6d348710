"""TokenTree: merging, truncation with ancestors, and the mask / positions / paths derived from it."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree, source_names


def test_merge_counts_shared_prefix_once_and_unions_labels():
    a = TokenTree.root(7)
    a.add_path([1, 2, 3], [0.9, 0.8, 0.7], SOURCE_NGRAM)
    b = TokenTree.root(7)
    b.add_path([1, 2, 4], [0.6, 0.5, 0.4], SOURCE_EAGLE)
    a.merge(b)
    assert a.tokens == [7, 1, 2, 3, 4]  # 1 and 2 are shared; 3 and 4 are siblings
    assert a.parents == [-1, 0, 1, 2, 2]
    assert source_names(a.sources[1]) == ["ngram", "eagle"]
    assert source_names(a.sources[4]) == ["eagle"]
    assert a.scores[1] == 0.9  # the better estimate wins


def test_truncate_keeps_best_nodes_with_ancestors():
    t = TokenTree.root(0)
    t.add_path([1, 2, 3], [0.9, 0.2, 0.95], SOURCE_NGRAM)  # node 3's score is capped by its parent's 0.2
    t.add_path([5], [0.5], SOURCE_EAGLE)
    kept = t.truncate(2)
    assert kept.tokens == [0, 1, 5]
    assert kept.truncate(5) is kept


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6), st.floats(0, 1)), max_size=40),
    budget=st.integers(0, 45),
)
def test_truncate_exact_budget_and_ancestor_closed(edges, budget):
    t = TokenTree.root(99)
    for parent, token, score in edges:
        t.add(parent % len(t), token, score, SOURCE_NGRAM)
    kept = t.truncate(budget)
    assert kept.num_drafts == min(budget, t.num_drafts)
    assert all(p < i for i, p in enumerate(kept.parents) if i)
    # every kept path exists in the original tree
    for path in kept.paths():
        node = 0
        for n in path[1:]:
            node = t.child(node, kept.tokens[n])
            assert node is not None


def test_mask_positions_and_paths():
    t = TokenTree.root(10)
    t.add_path([11, 12], [0.9, 0.8], SOURCE_NGRAM)  # nodes 1, 2
    t.add(0, 13, 0.5, SOURCE_EAGLE)  # node 3
    mask = t.attention_mask(past_length=4, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 8)
    visible = mask[0, 0] == 0
    assert visible[:, :4].all()  # everyone sees the cache
    assert visible[2, 4:].tolist() == [True, True, True, False]  # node 2 sees root, node 1, itself
    assert visible[3, 4:].tolist() == [True, False, False, True]
    assert t.position_ids(4).tolist() == [[4, 5, 6, 5]]
    assert sorted(t.paths()) == [[0, 1, 2], [0, 3]]


def test_exclusive_children_cap_siblings_best_first_and_keep_the_nodes():
    tree = TokenTree.root(0)
    a = tree.add(0, 1, 0.7, SOURCE_NGRAM)
    b = tree.add(0, 2, 0.6, SOURCE_EAGLE)  # 0.7 + 0.6 > 1: capped to 0.3
    c = tree.add(b, 3, 0.3, SOURCE_EAGLE)  # conditional 0.5 of its parent, kept as a share of the capped parent
    d = tree.add(a, 4, 0.35, SOURCE_NGRAM)  # conditional 0.5, alone: unchanged
    capped = tree.exclusive_children()
    assert capped.tokens == tree.tokens and capped.parents == tree.parents and capped.sources == tree.sources
    assert capped.scores[a] == 0.7 and abs(capped.scores[b] - 0.3) < 1e-12
    assert abs(capped.scores[c] - 0.15) < 1e-12 and abs(capped.scores[d] - 0.35) < 1e-12
    assert tree.scores[b] == 0.6  # the original is left alone
    calibrated = TokenTree.root(0)
    calibrated.add_path([1, 2], [0.5, 0.25], SOURCE_NGRAM)
    calibrated.add(0, 3, 0.4, SOURCE_EAGLE)  # 0.5 + 0.4 <= 1: nothing to cap
    assert calibrated.exclusive_children().scores == calibrated.scores
