"""Hardware-aware tree sizing: expected tokens per unit of verification time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hsd_rag.budget import CostProfile, fit_tree
from hsd_rag.tree import SOURCE_NGRAM, TokenTree

CPU = CostProfile(tokens=[1, 8, 16], relative_cost=[1.0, 1.5, 1.8])
FREE = CostProfile(tokens=[1, 64], relative_cost=[1.0, 1.0])


def test_cost_interpolates_and_extrapolates():
    assert CPU.cost(1) == 1.0
    assert CPU.cost(12) == 1.65
    assert CPU.cost(24) == 2.1  # the last segment's slope continued


def test_confident_drafts_are_kept_and_hopeless_ones_dropped():
    assert CPU.best_num_drafts([0.95] * 10, budget=16) == 10
    assert CPU.best_num_drafts([0.01] * 10, budget=16) == 0  # each costs more than it is expected to return
    # 1 + 0.9 = 1.9 over cost(2) ≈ 1.07 beats 1.0 / 1.0; the weak tail does not pay
    assert CPU.best_num_drafts([0.9, 0.02, 0.02], budget=16) == 1


def test_free_verification_keeps_everything_up_to_budget():
    assert FREE.best_num_drafts([0.01] * 10, budget=6) == 6


def test_fit_tree_keeps_an_ancestor_closed_prefix():
    tree = TokenTree.root(0)
    tree.add_path([1, 2, 3, 4], [0.9, 0.85, 0.8, 0.05], SOURCE_NGRAM)
    tree.add(0, 9, 0.03, SOURCE_NGRAM)
    fitted = fit_tree(tree, CPU, budget=16)
    assert fitted.tokens == [0, 1, 2, 3]


def test_profile_round_trip(tmp_path):
    CPU.save(tmp_path / "p.json")
    assert CostProfile.load(tmp_path / "p.json") == CPU


@given(
    scores=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    budget=st.integers(1, 64),
    profile=st.sampled_from([CPU, FREE, CostProfile.default_for("cpu"), CostProfile.default_for("cuda")]),
)
def test_no_kept_draft_scores_below_the_min_useful_score(scores, budget, profile):
    """Drafters may skip whatever scores below `min_useful_score`: `best_num_drafts` never keeps it."""
    scores = sorted(scores, reverse=True)
    kept = profile.best_num_drafts(scores, budget)
    assert all(s >= profile.min_useful_score(budget) for s in scores[:kept])


def test_min_useful_score_is_zero_when_verification_is_free():
    assert FREE.min_useful_score(16) == 0.0
    assert 0.0 < CPU.min_useful_score(16) < 0.1
