"""Sampling is lossless: the empirical distribution of generated tokens matches the target's own.

A tiny model with an 8-token vocabulary makes the exact joint distribution of the first two generated tokens
computable by enumeration (64 cells); a chi-square test with a fixed seed compares it to 800 speculative
samples, for several temperature / top-p / top-k settings, with drafts that are always right (the target's
own most likely continuation), always wrong (its least likely tokens) and random trees. Each kind of draft
meets two of the three settings (six pairs, every setting twice), which keeps the suite short; both
mutations of the acceptance rule tried by hand (keeping rejected drafts in the residual distribution,
dropping the residual renormalisation between sibling drafts) make these tests fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from hsd_rag import HybridSpecDecoder
from hsd_rag.drafters.base import DraftContext
from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree
from tests.fake_drafters import RandomTreeDrafter
from tests.tiny_models import IdTokenizer, tiny_model

VOCAB = 8
PROMPT = [0, 3, 5]
SAMPLES = 800
MIN_EXPECTED = 5.0  # chi-square needs expected counts of at least ~5 per cell: smaller cells are pooled
P_FLOOR = 1e-3  # fixed seeds make this deterministic; a real bias gives p-values far below it


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", vocab=VOCAB, seed=3, layers=4, hidden=32)
    with torch.no_grad():
        # peaked enough that the best draft holds ~40 % of the mass (a wrong sibling acceptance rule then shifts
        # whole first-token cells), spread enough that every setting samples many cells
        m.lm_head.weight.mul_(2.5)
    return m


class RankDrafter:
    """Drafts a chain of the target's own rank-r tokens (r=0: always right; r=-1: always wrong)."""

    name = "rank"

    def __init__(self, model, rank: int, depth: int = 3):
        self.model, self.rank, self.depth = model, rank, depth
        self._memo: dict[tuple[int, ...], TokenTree] = {}  # contexts repeat across samples

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        key = tuple(context.token_ids)
        if key not in self._memo:
            with torch.no_grad():
                self._memo[key] = self._draft(context)
        return self._memo[key]

    def _draft(self, context: DraftContext) -> TokenTree:
        tree = TokenTree.root(context.token_ids[-1])
        ids, parent = list(context.token_ids), 0
        for level in range(self.depth):
            logits = self.model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argsort(descending=True)[self.rank])
            parent = tree.add(parent, token, 0.5 / (level + 1), SOURCE_NGRAM)
            ids.append(token)
        # a second, different branch at the root, scored above the chain's second node so that it survives a
        # 2-draft budget: multi-draft rejection among siblings is exercised at every step
        second = int(self.model(torch.tensor([context.token_ids])).logits[0, -1].argsort(descending=True)[1])
        tree.add(0, second, 0.4, SOURCE_EAGLE)
        return tree

    def observe(self, outcome):
        pass

    def close(self):
        pass


def exact_joint(model, temperature, top_k, top_p) -> dict[tuple[int, int], float]:
    with torch.no_grad():
        p1 = logits_to_probs(model(torch.tensor([PROMPT])).logits[0, -1], temperature, top_k, top_p)
        joint = {}
        for a in range(VOCAB):
            p2 = logits_to_probs(model(torch.tensor([PROMPT + [a]])).logits[0, -1], temperature, top_k, top_p)
            for b in range(VOCAB):
                joint[(a, b)] = float(p1[a] * p2[b])
    return joint


def fidelity_p(counts: dict, joint: dict) -> float:
    """The smaller p-value of the joint (2-token) test and of the first-token marginal test.

    The marginal has 8 well-filled cells, so it catches a bias on one first token that the 64-cell joint test
    dilutes (e.g. a sibling draft accepted with p instead of p / residual)."""
    first_counts: dict[int, int] = {}
    first_joint: dict[int, float] = {}
    for (a, _), n in counts.items():
        first_counts[a] = first_counts.get(a, 0) + n
    for (a, _), p in joint.items():
        first_joint[a] = first_joint.get(a, 0.0) + p
    return min(chi_square_p(counts, joint), chi_square_p(first_counts, first_joint))


def chi_square_p(counts: dict, joint: dict) -> float:
    cells = sorted(joint, key=joint.get, reverse=True)
    observed, expected, pool_obs, pool_exp = [], [], 0.0, 0.0
    for cell in cells:
        exp = joint[cell] * SAMPLES
        if exp >= MIN_EXPECTED:
            observed.append(counts.get(cell, 0))
            expected.append(exp)
        else:
            pool_obs += counts.get(cell, 0)
            pool_exp += exp
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    total = sum(expected)
    expected = [e * sum(observed) / total for e in expected]
    return float(chisquare(observed, expected).pvalue)


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=0, top_p=0.9),
    dict(temperature=1.3, top_k=4, top_p=1.0),
]
PAIRS = [  # (drafts, setting index): every kind of draft twice, every setting twice
    ("always-right", 0),
    ("always-right", 1),
    ("always-wrong", 1),
    ("always-wrong", 2),
    ("random-tree", 2),
    ("random-tree", 0),
]


@pytest.mark.parametrize(
    ("drafts", "sampling"),
    [(d, SETTINGS[i]) for d, i in PAIRS],
    ids=[f"{d}-T{SETTINGS[i]['temperature']}-k{SETTINGS[i]['top_k']}-p{SETTINGS[i]['top_p']}" for d, i in PAIRS],
)
def test_sampled_distribution_matches_target(model, sampling, drafts):
    drafter = {
        "always-right": lambda: RankDrafter(model, rank=0),
        "always-wrong": lambda: RankDrafter(model, rank=-1),
        "random-tree": lambda: RandomTreeDrafter(VOCAB, seed=7, width=2, depth=3),
    }[drafts]()
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.drafter_factories = {"ngram": lambda d, cfg: drafter}
    dec.eos_token_ids = set()  # count every cell, including the eos token id
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    gen = torch.Generator().manual_seed(1234)
    for _ in range(SAMPLES):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        res = dec.generate(PROMPT, max_new_tokens=3, method="ngram", budget=8, seed=seed, **sampling)
        key = tuple(res.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        accepted += res.stats.accepted_by_source.get("ngram", 0)  # the rank-r chain (the sibling is "eagle")
    p_value = fidelity_p(counts, exact_joint(model, **sampling))
    assert p_value > P_FLOOR, f"sampled distribution differs from the target's (p={p_value:.2e})"
    if drafts == "always-right":
        assert accepted > SAMPLES * 0.1  # the drafts really were used, so the test exercised acceptance
    if drafts == "always-wrong" and sampling["top_k"]:
        assert accepted == 0  # rank -1 is outside top-k: probability zero, never accepted (the rank-1 sibling is)


def test_exact_joint_is_a_distribution(model):
    for s in SETTINGS:
        assert abs(sum(exact_joint(model, **s).values()) - 1.0) < 1e-4


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    for t, k, p in itertools.product([0.5, 1.0, 2.0], [0, 1, 7], [1.0, 0.9, 0.3]):
        expected = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.allclose(logits_to_probs(logits, t, k, p), expected.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("method", ["ngram", "eagle", "hybrid", "hybrid-fixed"])
def test_real_methods_sample_the_target_distribution(model, method):
    from hsd_rag.heads import Eagle3Head

    torch.manual_seed(0)
    dec = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))
    dec.eos_token_ids = set()
    sampling = SETTINGS[1]
    # a document repeating the prompt's tail makes the n-gram drafter propose continuations too
    documents = [" ".join(map(str, PROMPT + [2, 4, 6] + PROMPT + [1, 7]))]
    counts: dict[tuple[int, int], int] = {}
    drafted = 0
    for i in range(SAMPLES):
        res = dec.generate(PROMPT, documents=documents, max_new_tokens=3, method=method, budget=8, seed=i,
                           **sampling)
        key = tuple(res.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        drafted += res.stats.tree_nodes
    assert drafted > SAMPLES  # drafts were verified, so acceptance was exercised
    p_value = fidelity_p(counts, exact_joint(model, **sampling))
    assert p_value > P_FLOOR, f"{method}: sampled distribution differs from the target's (p={p_value:.2e})"
