"""Hardware-aware tree sizing: expected tokens per unit of verification time."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from hsd_rag.budget import CostProfile, fit_tree
from hsd_rag.tree import SOURCE_NGRAM, TokenTree

CPU = CostProfile(tokens=[1, 8, 16], relative_cost=[1.0, 1.5, 1.8])
FREE = CostProfile(tokens=[1, 64], relative_cost=[1.0, 1.0])
# measured by `hsd-rag tune` on the 2-core CI box (SmolLM2-135M, one thread)
MEASURED = CostProfile(tokens=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64], relative_cost=[1.0, 1.02, 1.11, 1.29, 1.6, 2.01, 2.95, 3.54, 4.69, 5.89])


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


@given(
    scores=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=40),
    new=st.floats(0.0, 1.0),
    budget=st.integers(1, 64),
    extra=st.sampled_from([0.0, 0.2]),
    profile=st.sampled_from([CPU, FREE, MEASURED, CostProfile.default_for("cpu"), CostProfile.default_for("cuda")]),
)
def test_a_draft_below_the_entry_floor_is_never_kept(scores, new, budget, extra, profile):
    """Drafters may skip a draft scoring below `entry_floor(the drafts already scored)`: added to them, it is
    never among the drafts `best_num_drafts` keeps."""
    scores = sorted(scores, reverse=True)
    assume(new not in scores)  # a tie could be kept in its twin's place
    if new >= profile.entry_floor(scores, budget, extra):
        return
    merged = sorted([*scores, new], reverse=True)
    assert new not in merged[: profile.best_num_drafts(merged, budget)]


def test_the_entry_floor_prunes_what_the_budget_cap_and_min_useful_score_cannot():
    """With a 64 cap and a CPU's near-free second draft those two bounds are ~0.01; after a good n-gram match
    only a fairly likely draft can still pay for its share of the bigger forward."""
    free_tree = [0.9, 0.8, 0.6, 0.5, 0.3]
    assert MEASURED.min_useful_score(64) < 0.03
    floor = MEASURED.entry_floor(free_tree, 64)
    assert 0.1 < floor < 0.3
    for draft, kept in ((floor - 0.001, False), (floor + 0.001, True)):  # the floor is tight for one more draft
        merged = sorted([*free_tree, draft], reverse=True)
        assert (draft in merged[: MEASURED.best_num_drafts(merged, 64)]) is kept
    assert MEASURED.entry_floor([], 64) < MEASURED.entry_floor(free_tree, 64)  # nothing drafted: easier to enter
    assert FREE.entry_floor(free_tree, 64) == 0.0  # free verification: everything pays


def test_min_useful_score_is_zero_when_verification_is_free():
    assert FREE.min_useful_score(16) == 0.0
    assert 0.0 < CPU.min_useful_score(16) < 0.1


def test_a_dip_in_a_measured_profile_is_pooled_so_bigger_trees_never_look_free():
    dipped = CostProfile(tokens=[1, 8, 12, 16, 24], relative_cost=[1.0, 2.15, 2.58, 2.23, 2.47])
    costs = dipped.relative_cost
    assert all(a < b for a, b in zip(costs, costs[1:], strict=False))  # strictly rising
    assert costs[3] == (2.58 + 2.23) / 2 and costs[:2] == [1.0, 2.15] and costs[4] == 2.47
    assert dipped.min_useful_score(64) > 0.0  # the early-exit floor is no longer zeroed by the dip


def test_drafting_costs_default_for_eagle_and_zero_for_free_sources(tmp_path):
    measured = CostProfile(tokens=[1, 16], relative_cost=[1.0, 2.0], draft_costs={"eagle": {"fixed": 0.1, "per_level": 0.05}})
    assert measured.draft_cost("eagle", 4) == 0.1 + 0.05 * 4
    assert measured.draft_cost("ngram", 4) == 0.0
    assert CPU.draft_cost("eagle", 1) > 0.0  # the built-in estimate until `hsd-rag tune` measured it
    measured.save(tmp_path / "p.json")
    assert CostProfile.load(tmp_path / "p.json") == measured
    k, rate = measured.best_rate([0.9, 0.9], budget=16, extra_cost=0.5)
    assert k == 2 and rate == (1 + 1.8) / (measured.cost(3) + 0.5)
