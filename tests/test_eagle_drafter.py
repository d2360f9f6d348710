"""EagleDrafter against a small harness that drives a tiny Llama exactly as the decode loop does.

Harness: start() -> prefill prompt[:-1] -> per step: propose -> truncate -> one tree forward (DynamicCache, 4D
additive mask from TokenTree.attention_mask, TokenTree.position_ids) -> accept -> keep the accepted rows of the
target cache -> observe.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hsd_rag.budget import CostProfile, fit_tree
from hsd_rag.drafters.base import DraftContext, Drafter, StepOutcome
from hsd_rag.drafters.eagle import EagleDrafter
from hsd_rag.drafters.eagle_calibration import RawHeadScores
from hsd_rag.heads import Eagle1Head, Eagle3Head
from hsd_rag.heads.features import eagle3_feature_layers
from hsd_rag.tree import SOURCE_EAGLE, TokenTree
from tests.tiny_models import tiny_model

VOCAB = 128
DRAFT_VOCAB = 64
HIDDEN = 64
LAYERS = 8
PROMPT = [5, 17, 42, 9, 77, 3, 60, 21, 88, 14, 33, 2]
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=HIDDEN)


def make_head(target, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "eagle3":
        head = Eagle3Head.from_target(target, draft_vocab_size=DRAFT_VOCAB)
        with torch.no_grad():
            head.set_vocab_map(torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values)
    else:
        head = Eagle1Head.from_target(target)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.3)  # peaky head distributions give deep, uneven trees
    return head.eval()


# ---- the harness -------------------------------------------------------------------------------------------


class Harness:
    """Prefill + tree-verify forwards of the target, as the decode loop performs them."""

    def __init__(self, model, drafter: Drafter, prompt: list[int]):
        self.model, self.drafter = model, drafter
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = DynamicCache(config=model.config)
        self.prompt = list(prompt)
        self.tokens = list(prompt)
        self.past = len(prompt) - 1
        drafter.start(prompt, [])
        if len(prompt) > 1:
            self.forward(torch.tensor([prompt[:-1]]), None, None)

    def forward(self, ids, mask, positions):
        kwargs = {self.cache_arg: self.cache}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)

    def propose(self, budget: int) -> TokenTree:
        return self.drafter.propose(DraftContext(list(self.tokens), len(self.prompt), budget)).truncate(budget)

    def step(self, tree: TokenTree, choose=None) -> StepOutcome:
        """Verify `tree`; accept greedily, or along the path to `choose(tree)` (any node, for coverage)."""
        logits = self.forward(
            tree.input_ids(), tree.attention_mask(self.past, torch.float32), tree.position_ids(self.past)
        ).logits[0]
        argmax = logits.argmax(-1).tolist()
        if choose is None:
            node, nodes = 0, [0]
            while (child := tree.child(node, argmax[node])) is not None:
                node = child
                nodes.append(node)
        else:
            nodes = tree.path_to(choose(tree))
        self.keep(nodes)
        new_tokens = [tree.tokens[n] for n in nodes[1:]] + [argmax[nodes[-1]]]
        outcome = StepOutcome(tree, nodes, new_tokens)
        self.drafter.observe(outcome)
        self.tokens.extend(new_tokens)
        return outcome

    def keep(self, nodes: list[int]) -> None:
        # Sliced by hand: DynamicCache.crop changed meaning across transformers 5.x (absolute vs. negative count).
        index = torch.tensor(nodes) + self.past
        kept = torch.cat((torch.arange(self.past), index))
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, kept)
            layer.values = layer.values.index_select(-2, kept)
        self.past += len(nodes)


def assert_well_formed(tree: TokenTree, root: int, budget: int, depth: int, head) -> None:
    assert tree.tokens[0] == root and tree.parents[0] == -1
    assert tree.num_drafts <= budget
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        assert 0 <= parent < node
        assert tree.scores[node] <= tree.scores[parent] + 1e-12  # a path never gets likelier
        assert 0.0 < tree.scores[node] <= 1.0
        assert tree.sources[node] == SOURCE_EAGLE
        assert tree.depths[node] <= depth
    if isinstance(head, Eagle3Head):
        assert all(bool(head.t2d[t]) for t in tree.tokens[1:])  # drafts come from the draft vocabulary


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


# ---- the sequential reference --------------------------------------------------------------------------------


def target_features(model, head, tokens: list[int]) -> torch.Tensor:
    """Features of every token in the target cache from one plain causal forward: [1, N - 1, F]."""
    ids = torch.tensor([tokens[:-1]])
    if isinstance(head, Eagle3Head):
        states = model(ids, output_hidden_states=True).hidden_states
        return torch.cat([states[i] for i in eagle3_feature_layers(LAYERS)], dim=-1)
    return model.model(ids).last_hidden_state


def sequential_log_probs(model, head, tokens: list[int], path: list[int]) -> list[torch.Tensor]:
    """Head log-probs (draft vocab) before each token of `path`, by plain causal forwards without any cache or
    tree mask: accepted pairs use target features, draft pairs feed back the previous output hidden."""
    features = target_features(model, head, tokens)
    hidden_in = head.fuse(features) if isinstance(head, Eagle3Head) else features  # [1, N - 1, H]
    ids = torch.tensor([tokens[1:]])
    out = head(hidden_in, ids)
    result = [F.log_softmax(out.logits[0, -1], -1)]
    for token in path[:-1]:
        hidden_in = torch.cat((hidden_in, out.hidden[:, -1:]), dim=1)
        ids = torch.cat((ids, torch.tensor([[token]])), dim=1)
        out = head(hidden_in, ids)
        result.append(F.log_softmax(out.logits[0, -1], -1))
    return result


def draft_id_of(head):
    target_ids = head.to_target_ids(torch.arange(head.draft_vocab_size)).tolist()
    return {t: d for d, t in enumerate(target_ids)}


# ---- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_greedy_output_equals_generate_and_trees_are_well_formed(target, kind):
    head = make_head(target, kind)
    budget, depth, top_k, max_new = 10, 4, 3, 24
    drafter = EagleDrafter(target, head, depth=depth, top_k=top_k)
    assert isinstance(drafter, Drafter) and drafter.name == "eagle"
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        while len(harness.tokens) - len(PROMPT) < max_new:
            tree = harness.propose(budget)
            assert_well_formed(tree, harness.tokens[-1], budget, depth, head)
            assert tree.num_drafts == budget  # plenty of candidates: the budget is filled
            assert drafter.cache_length == harness.past and drafter.pending == 0  # drafts rolled back
            outcome = harness.step(tree)
            assert drafter.cache_length + drafter.pending == harness.past
            assert drafter.pending == len(outcome.accepted_nodes)
        drafter.close()
    expected = hf_greedy(target, PROMPT, max_new)
    assert harness.tokens[len(PROMPT) :][:max_new] == expected


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_tree_drafting_equals_sequential_head_decoding(target, kind):
    """After steps that accept deep, non-contiguous paths, every node's score equals the product of the head's
    probabilities along its path computed by plain sequential forwards, and the best depth-1 draft is the
    argmax of the head's logits."""
    head = make_head(target, kind, seed=1)
    budget, depth, top_k = 12, 4, 4
    drafter = EagleDrafter(target, head, depth=depth, top_k=top_k,
                           calibrator_factory=lambda: RawHeadScores(device=head.device))
    rng = random.Random(0)
    draft_id = draft_id_of(head)
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        for _ in range(4):
            tree = harness.propose(budget)
            assert_well_formed(tree, harness.tokens[-1], budget, depth, head)
            for node in range(1, len(tree)):
                path = [tree.tokens[n] for n in tree.path_to(node)[1:]]
                log_probs = sequential_log_probs(target, head, harness.tokens, path)
                expected = sum(lp[draft_id[t]].item() for lp, t in zip(log_probs, path, strict=True))
                assert tree.scores[node] == pytest.approx(float(torch.tensor(expected).exp()), rel=SCORE_TOLERANCE)
                if tree.depths[node] == 1 and tree.scores[node] == max(tree.scores[c] for c in tree.children(0)):
                    best = head.to_target_ids(log_probs[0].argmax()).item()
                    assert tree.tokens[node] == best
            # the top-k children of the root are exactly the head's top-k tokens
            reference = sequential_log_probs(target, head, harness.tokens, [0])[0]
            top = set(head.to_target_ids(reference.topk(top_k).indices).tolist())
            assert {tree.tokens[c] for c in tree.children(0)} <= top
            drafter.capture.clear()  # drop what the reference forwards above left in the drafter's hooks
            # accept the path to a random deepest node: several drafts, generally not nodes 0..m
            deepest = max(tree.depths)
            leaves = [n for n in range(len(tree)) if tree.depths[n] == deepest]
            outcome = harness.step(tree, choose=lambda t, leaves=leaves: rng.choice(leaves))
            assert len(outcome.accepted_nodes) == deepest + 1
        drafter.close()


def test_budget_zero_steps_and_a_one_token_prompt(target):
    head = make_head(target, "eagle3", seed=2)
    drafter = EagleDrafter(target, head, depth=3, top_k=2)
    prompt = [7]
    max_new = 14
    with torch.inference_mode():
        harness = Harness(target, drafter, prompt)
        budgets = [6, 0, 0, 5, 1, 0, 6]
        step = 0
        while len(harness.tokens) - len(prompt) < max_new:
            budget = budgets[step % len(budgets)]
            tree = harness.propose(budget)
            assert_well_formed(tree, harness.tokens[-1], budget, 3, head)
            if step == 0 or budget == 0:
                assert tree.num_drafts == 0  # no target feature yet / nothing asked for
            harness.step(tree)
            assert drafter.cache_length + drafter.pending == harness.past
            step += 1
        drafter.close()
    assert harness.tokens[len(prompt) :][:max_new] == hf_greedy(target, prompt, max_new)


@pytest.mark.parametrize("window", [None, 4])
def test_a_drafter_first_asked_steps_after_the_prefill_stays_in_sync(target, window):
    """A source gate may skip the head from a request's first step (what it learned on earlier requests): the
    prefill's features then arrive with the first tree forward's, and the head must still catch up exactly."""
    head = make_head(target, "eagle3", seed=3)
    drafter = EagleDrafter(target, head, depth=3, top_k=2, prompt_window=window)
    max_new = 16
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        for _ in range(2):  # skipped: the loop verifies a root-only tree without asking the drafter
            harness.step(TokenTree.root(harness.tokens[-1]))
            assert drafter.skipped + drafter.cache_length + drafter.pending == harness.past
        while len(harness.tokens) - len(PROMPT) < max_new:
            tree = harness.propose(6)
            assert tree.num_drafts == 6
            harness.step(tree)
            assert drafter.skipped + drafter.cache_length + drafter.pending == harness.past
        assert drafter.skipped == (0 if window is None else len(PROMPT) - 1 - window)
        drafter.close()
    assert harness.tokens[len(PROMPT) :][:max_new] == hf_greedy(target, PROMPT, max_new)


def test_a_prompt_window_runs_only_the_last_prompt_pairs(target):
    """The head reads the last `prompt_window` prompt pairs (the target features already carry the rest):
    its depth-1 drafts are those of the head run over just those pairs, and decoding stays lossless."""
    head = make_head(target, "eagle3", seed=4)
    window, max_new = 4, 20
    drafter = EagleDrafter(target, head, depth=3, top_k=3, prompt_window=window,
                           calibrator_factory=lambda: RawHeadScores(device=head.device))
    draft_id = draft_id_of(head)
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        tree = harness.propose(8)
        assert drafter.skipped == len(PROMPT) - 1 - window and drafter.cache_length == window
        features = target_features(target, head, harness.tokens)[:, -window:]
        positions = torch.arange(len(PROMPT) - 1 - window, len(PROMPT) - 1)[None]
        out = head(head.fuse(features), torch.tensor([harness.tokens[1:]])[:, -window:], positions)
        reference = F.log_softmax(out.logits[0, -1], -1)
        for child in tree.children(0):
            expected = float(reference[draft_id[tree.tokens[child]]].exp())
            assert tree.scores[child] == pytest.approx(expected, rel=SCORE_TOLERANCE)
        drafter.capture.clear()  # drop what the reference forward above left in the drafter's hooks
        while len(harness.tokens) - len(PROMPT) < max_new:
            harness.step(tree)
            assert drafter.skipped + drafter.cache_length + drafter.pending == harness.past
            tree = harness.propose(8)
        drafter.close()
    assert harness.tokens[len(PROMPT) :][:max_new] == hf_greedy(target, PROMPT, max_new)
    with pytest.raises(ValueError, match="prompt_window"):
        EagleDrafter(target, head, prompt_window=0)
    assert harness.tokens[len(PROMPT) :][:max_new] == hf_greedy(target, PROMPT, max_new)


def test_close_removes_hooks_and_protocol_misuse_is_explained(target):
    head = make_head(target, "eagle3")
    drafter = EagleDrafter(target, head, depth=2, top_k=2)
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        assert any(layer._forward_pre_hooks for layer in target.model.layers)
        tree = harness.propose(4)
        with pytest.raises(RuntimeError, match="exactly one tree forward"):
            drafter.observe(StepOutcome(tree, [0], [1]))  # no target forward happened
        drafter.close()
    assert all(not layer._forward_pre_hooks for layer in target.model.layers)
    with pytest.raises(RuntimeError, match="before start"):
        drafter.propose(DraftContext(PROMPT, len(PROMPT), 4))
    unsynced = EagleDrafter(target, head, depth=2, top_k=2)
    with torch.inference_mode():
        Harness(target, unsynced, PROMPT)
        with pytest.raises(RuntimeError, match="out of sync"):
            unsynced.propose(DraftContext(PROMPT + [3], len(PROMPT), 4))
        unsynced.close()


def drafted_steps(target, head, depth: int, top_k: int, steps: int, early_exit: bool, draft):
    """`steps` greedy steps of one drafter, each verifying `draft(harness)`: (the trees, head levels drafted).
    One drafter at a time: two would hook the same target."""
    drafter = EagleDrafter(target, head, depth=depth, top_k=top_k, early_exit=early_exit)
    harness, trees = Harness(target, drafter, PROMPT), []
    for _ in range(steps):
        trees.append(draft(harness))
        harness.step(trees[-1])
    drafter.close()
    return trees, drafter.levels_drafted


def test_early_exit_keeps_the_same_tree_with_fewer_head_levels(target):
    """Stopping once no frontier node can enter the kept `budget` changes nothing but the work done; a score
    floor (`DraftContext.min_score`) prunes further."""
    head = make_head(target, "eagle3", seed=2)
    budget, depth, top_k, steps = 4, 6, 4, 6

    def run(early_exit: bool):
        return drafted_steps(target, head, depth, top_k, steps, early_exit, lambda harness: harness.propose(budget))

    with torch.inference_mode():
        (full_trees, full_levels), (early_trees, early_levels) = run(False), run(True)
        for full, early in zip(full_trees, early_trees, strict=True):
            assert full.tokens == early.tokens and full.parents == early.parents
            assert full.scores == pytest.approx(early.scores, rel=1e-6)
        assert early_levels < full_levels == steps * min(depth, budget)  # the drafter caps depth at budget
        floored = EagleDrafter(target, head, depth=depth, top_k=top_k, early_exit=True)
        harness = Harness(target, floored, PROMPT)
        floored.propose(DraftContext(list(harness.tokens), len(PROMPT), 64, min_score=0.5))
        assert floored.levels_drafted < depth
        floored.close()


@pytest.mark.parametrize("costs", [[1.0, 1.02, 1.11, 1.29, 2.01, 3.54, 5.89], [1.0, 1.0, 1.0, 1.01, 1.02, 1.05, 1.1]])
def test_auto_budget_early_exit_keeps_the_same_fitted_tree(target, costs):
    """Under budget="auto" the budget is only a cap (64): the early exit uses the entry floor of the candidates
    drafted so far (CostProfile.entry_floor), and the tree fit_tree keeps is the one full drafting gives."""
    profile = CostProfile(tokens=[1, 2, 4, 8, 16, 32, 64], relative_cost=costs)
    head = make_head(target, "eagle3", seed=2)
    depth, top_k, steps = 6, 4, 6

    def auto_tree(harness):
        context = DraftContext(list(harness.tokens), len(PROMPT), 64, 0.0, profile, True)
        return fit_tree(harness.drafter.propose(context), profile, 64)

    def run(early_exit: bool):
        return drafted_steps(target, head, depth, top_k, steps, early_exit, auto_tree)

    with torch.inference_mode():
        (full_trees, full_levels), (early_trees, early_levels) = run(False), run(True)
    for full, early in zip(full_trees, early_trees, strict=True):
        assert full.tokens == early.tokens and full.parents == early.parents
    assert full_levels == steps * depth
    assert sum(tree.num_drafts for tree in early_trees) > steps  # the fitted trees are not trivially empty
    if costs[1] > costs[0]:  # a CPU-like profile: deep, unlikely levels are never drafted
        assert early_levels < full_levels


# ---- calibrated scores ---------------------------------------------------------------------------------------


def test_calibrated_scores_are_products_of_bucket_estimates_and_learn_from_outcomes(target):
    """A node's score is the product along its path of its (depth, head-probability) bucket's estimate; a step's
    decided drafts move exactly their buckets' estimates."""
    from hsd_rag.drafters.eagle_calibration import EagleCalibrator
    from hsd_rag.heads.acceptance_priors import AcceptancePriors

    head = make_head(target, "eagle3", seed=2)
    priors = AcceptancePriors.empty("test")
    for row_acc, row_ver in zip(priors.accepted, priors.verified, strict=True):
        for bucket in range(len(row_ver)):
            row_ver[bucket], row_acc[bucket] = 100, 10 + 5 * bucket  # a known, monotone prior
    calibrators: list[EagleCalibrator] = []

    def factory():
        calibrators.append(EagleCalibrator(priors, device=head.device))
        return calibrators[-1]

    drafter = EagleDrafter(target, head, depth=3, top_k=3, calibrator_factory=factory)
    draft_id = draft_id_of(head)
    with torch.inference_mode():
        harness = Harness(target, drafter, PROMPT)
        calibrator = calibrators[-1]
        tree = harness.propose(8)
        for node in range(1, len(tree)):
            path = [tree.tokens[n] for n in tree.path_to(node)[1:]]
            log_probs = sequential_log_probs(target, head, harness.tokens, path)
            expected = 0.0
            for depth, (lp, token) in enumerate(zip(log_probs, path, strict=True), start=1):
                estimate, _ = calibrator.score(depth, lp[draft_id[token]].reshape(1))
                expected += float(estimate)
            assert tree.scores[node] == pytest.approx(float(torch.tensor(expected).exp()), rel=SCORE_TOLERANCE)
        drafter.capture.clear()
        before = list(calibrator.accepted), list(calibrator.rejected)
        outcome = harness.step(tree)
        decided = [n for n in range(1, len(tree)) if tree.parents[n] in outcome.accepted_nodes]
        recorded = sum(calibrator.accepted) + sum(calibrator.rejected) - sum(before[0]) - sum(before[1])
        assert recorded == len(decided)
        assert sum(calibrator.accepted) - sum(before[0]) == len(outcome.accepted_nodes) - 1
    drafter.close()


def test_acceptance_priors_round_trip_and_load_with_the_head(target, tmp_path):
    from hsd_rag.heads import load_head, save_head
    from hsd_rag.heads.acceptance_priors import AcceptancePriors

    head = make_head(target, "eagle3")
    save_head(head, tmp_path)
    assert load_head(tmp_path, target).acceptance_priors is None
    priors = AcceptancePriors.empty("unit test")
    priors.accepted[0][3], priors.verified[0][3] = 7, 10
    priors.save(tmp_path)
    loaded = load_head(tmp_path, target).acceptance_priors
    assert loaded == priors and loaded.rate(0, 3) == 0.7 and loaded.rate(1, 1) is None
