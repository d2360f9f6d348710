"""Sampling is lossless: generated tokens follow the target's own distribution exactly, whatever the drafts.

Three layers of evidence, each compared with a law computed exactly from the target (tests/fidelity.py):

1. The acceptance rule alone (`accept_sampling`) on a hand-built tree of siblings and grandchildren with
   hand-set target distributions, 20,000 steps per setting: a mis-weighted sibling, a rejected-token list that
   leaks between tree levels or a bonus token drawn from the wrong residual shifts whole cells.
2. The whole decoder on a tiny 8-token model, 5 new tokens per sample, drafts chosen by the target's own ranking
   so that accepted paths skip earlier siblings (decoys first): the cache rollback then keeps non-adjacent rows
   and the tokens decided *after* it are tested too (marginals of the first 1, 2, 3 and 4 tokens).
3. The real drafters (n-gram, EAGLE, both fused) on the same model, asserting that drafts were accepted at
   depth >= 2 so acceptance of deep paths was really exercised.

`scripts/mutants.py` applies deliberate bugs and checks that these tests fail with p < 1e-6; correct code
passes for any `HSD_RAG_TEST_SEED` (the p-values are printed as `[fidelity] ...` lines).
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.drafters.base import DraftContext
from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree
from hsd_rag.verify import accept_sampling
from tests.fake_drafters import RandomTreeDrafter
from tests.fidelity import P_FLOOR, SEED, fidelity_p, report, sequence_law, step_law
from tests.tiny_models import IdTokenizer, tiny_model

VOCAB = 8
PROMPT = [0, 3, 5]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny: a thread pool only adds hand-offs, which on a busy 2-core machine cost far more
    than the work (an acceptance step measured 40x slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SETTINGS = {
    "T1": dict(temperature=1.0, top_k=0, top_p=1.0),
    "T0.7-p0.9": dict(temperature=0.7, top_k=0, top_p=0.9),
    "T1.3-k4": dict(temperature=1.3, top_k=4, top_p=1.0),
}

# ---- 1. the acceptance rule on a hand-built tree ------------------------------------------------------------

RULE_STEPS = 20_000
# node: (parent, token, the target's distribution at that node over the 8 tokens). Node ids are not path order:
# the root's first child A is a likely-rejected sibling of B, whose subtree is where most paths go.
RULE_TREE = [
    (-1, 0, [0.06, 0.28, 0.28, 0.16, 0.08, 0.06, 0.05, 0.03]),  # 0 root: drafts A=1, B=2, C=3 below it
    (0, 1, [0.10, 0.25, 0.05, 0.05, 0.35, 0.10, 0.05, 0.05]),  # 1 A: child F=4
    (0, 2, [0.05, 0.30, 0.08, 0.04, 0.05, 0.22, 0.18, 0.08]),  # 2 B: children D=5, E=6; A's token is likely
    (0, 3, [0.20, 0.10, 0.10, 0.20, 0.10, 0.10, 0.10, 0.10]),  # 3 C: a leaf
    (1, 4, [0.30, 0.05, 0.05, 0.30, 0.10, 0.10, 0.05, 0.05]),  # 4 F: a leaf
    (2, 5, [0.05, 0.20, 0.10, 0.05, 0.05, 0.05, 0.10, 0.40]),  # 5 D: child G=7; B's rejected sibling 1 likely
    (2, 6, [0.40, 0.05, 0.05, 0.05, 0.05, 0.20, 0.10, 0.10]),  # 6 E: a leaf
    (5, 7, [0.10, 0.10, 0.30, 0.10, 0.10, 0.10, 0.10, 0.10]),  # 7 G: a leaf at depth 3
]


def rule_tree() -> tuple[TokenTree, torch.Tensor]:
    tree = TokenTree.root(RULE_TREE[0][1])
    for node, (parent, token, _) in enumerate(RULE_TREE[1:], start=1):
        assert tree.add(parent, token, 1.0 - 0.1 * node, SOURCE_NGRAM) == node
    logits = torch.tensor([probs for _, _, probs in RULE_TREE]).log()
    return tree, logits


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_acceptance_rule_emits_the_target_law(setting):
    sampling = SETTINGS[setting]
    tree, logits = rule_tree()
    law = step_law(tree, logits_to_probs(logits, **sampling))
    generator = torch.Generator().manual_seed(SEED * 1000 + list(SETTINGS).index(setting))
    samples, depths = [], Counter()
    for _ in range(RULE_STEPS):
        acc = accept_sampling(tree, logits, sampling["temperature"], sampling["top_k"], sampling["top_p"],
                              generator)
        samples.append(tuple(tree.tokens[n] for n in acc.nodes[1:]) + (acc.bonus_token,))
        depths[len(acc.nodes) - 1] += 1
    p_value = fidelity_p(samples, law, lengths=(1, 2, 4))
    line = report(f"rule-{setting}", p_value, deep_steps=depths[2] + depths[3])
    assert p_value > P_FLOOR, line
    assert depths[3] > 0 and depths[0] > 0  # the deepest path and the all-rejected case both happened


# ---- 2. the decoder on a tiny model: drafts ranked by the target ---------------------------------------------

NEW_TOKENS = 5  # the first step verifies up to 4 drafts; later steps follow a rollback
TESTED_TOKENS = 4
DECODER_SAMPLES = 1500


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", vocab=VOCAB, seed=3, layers=4, hidden=32)
    with torch.no_grad():
        # peaked enough that the best draft holds ~40 % of the mass (a wrong sibling rule then shifts whole
        # cells), spread enough that every setting samples many cells
        m.lm_head.weight.mul_(2.5)
    return m


class RankedTreeDrafter:
    """Drafts a fixed tree shape whose tokens are the target's own rank-r choices at each node's context.

    `shape` lists (parent, rank) per draft node in node order (parent 0 is the root); rank 0 is the target's
    most likely token (usually accepted), rank -1 its least likely (a decoy, nearly always rejected).
    Scores fall along the list, so truncating to a budget keeps a prefix of it.
    """

    name = "ranked"

    def __init__(self, model, shape: list[tuple[int, int]]):
        self.model, self.shape = model, shape
        self._memo: dict[tuple[int, ...], TokenTree] = {}  # contexts repeat across samples

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        key = tuple(context.token_ids)
        if key not in self._memo:
            self._memo[key] = self._draft(list(context.token_ids))
        return self._memo[key]

    @torch.no_grad()
    def _draft(self, ids: list[int]) -> TokenTree:
        tree = TokenTree.root(ids[-1])
        for i, (parent, rank) in enumerate(self.shape, start=1):
            path = [tree.tokens[n] for n in tree.path_to(parent)[1:]]
            order = self.model(torch.tensor([ids + path])).logits[0, -1].argsort(descending=True)
            tree.add(parent, int(order[rank]), 1.0 - 0.05 * i, SOURCE_NGRAM if rank >= 0 else SOURCE_EAGLE)
        return tree

    def observe(self, outcome):
        pass

    def close(self):
        pass


SHAPES = {
    # decoy, runner-up, then the best token with its own best child: accepted paths skip earlier siblings,
    # so the cache keeps non-adjacent rows, and a rejected runner-up must not leak into the next level
    "decoys-first": [(0, -1), (0, 1), (0, 0), (3, 0), (3, -1), (4, 0)],
    # the target's best chain with a runner-up sibling (accepted often, several levels deep)
    "best-chain": [(0, 0), (1, 0), (2, 0), (0, 1), (3, 0)],
    # the target's least likely tokens (rejected; under top-k their probability is exactly zero)
    "worst-chain": [(0, -1), (1, -1), (2, -1), (0, -2)],
}
DECODER_CASES = [  # (drafts, setting): every setting at least once, the rollback-heavy shape under two
    ("decoys-first", "T1"),
    ("decoys-first", "T1.3-k4"),
    ("best-chain", "T0.7-p0.9"),
    ("worst-chain", "T1.3-k4"),
    ("random-tree", "T1"),
]


def sample(decoder, method: str, samples: int, sampling: dict, documents=None, base_seed: int = 0):
    """Token sequences of `samples` seeded generations and the per-depth acceptance counts over all of them."""
    sequences, depths = [], Counter()
    for i in range(samples):
        res = decoder.generate(PROMPT, documents=documents, max_new_tokens=NEW_TOKENS, method=method, budget=8,
                               seed=base_seed + i, **sampling)
        sequences.append(tuple(res.token_ids))
        depths.update(res.stats.accepted_by_depth)
    return sequences, depths


@pytest.mark.parametrize(("drafts", "setting"), DECODER_CASES, ids=[f"{d}-{s}" for d, s in DECODER_CASES])
def test_decoder_samples_the_target_law(model, drafts, setting):
    sampling = SETTINGS[setting]
    drafter = (
        RandomTreeDrafter(VOCAB, seed=7, width=2, depth=3)
        if drafts == "random-tree"
        else RankedTreeDrafter(model, SHAPES[drafts])
    )
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.drafter_factories = {"ngram": lambda d, cfg: drafter}
    dec.eos_token_ids = set()  # count every cell, including the eos token id
    base = (SEED * 100 + DECODER_CASES.index((drafts, setting))) * 1_000_003
    sequences, depths = sample(dec, "ngram", DECODER_SAMPLES, sampling, base_seed=base)
    law = sequence_law(model, PROMPT, TESTED_TOKENS, **sampling)
    p_value = fidelity_p(sequences, law, lengths=range(1, TESTED_TOKENS + 1))
    deep = sum(n for d, n in depths.items() if d >= 2)
    line = report(f"decoder-{drafts}-{setting}", p_value, deep_steps=deep)
    assert p_value > P_FLOOR, line
    if drafts == "worst-chain" and sampling["top_k"]:
        assert deep == 0  # rank -1 is outside top-k: never accepted
    else:
        assert deep > 0, depths  # paths two or more drafts deep were accepted


def test_sequence_law_is_a_distribution(model):
    for s in SETTINGS.values():
        assert abs(sum(sequence_law(model, PROMPT, 3, **s).values()) - 1.0) < 1e-6


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary: HF keeps every tied token
    for t, k, p in itertools.product([0.5, 1.0, 2.0], [0, 1, 7], [1.0, 0.9, 0.3]):
        expected = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.allclose(logits_to_probs(logits, t, k, p), expected.softmax(-1), atol=1e-6)


# ---- 3. the real drafters -------------------------------------------------------------------------------------

REAL_SAMPLES = 800


@pytest.fixture(scope="module")
def head_decoder(model):
    from hsd_rag.heads import Eagle3Head

    torch.manual_seed(0)
    dec = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))
    dec.eos_token_ids = set()
    return dec


@pytest.mark.parametrize("method", ["ngram", "eagle", "hybrid", "hybrid-fixed"])
def test_real_methods_sample_the_target_law(model, head_decoder, method):
    sampling = SETTINGS["T0.7-p0.9"]
    # documents holding the prompt followed by the target's likeliest continuations make n-gram drafts that
    # are often right several tokens deep
    law = sequence_law(model, PROMPT, 3, **sampling)
    likely = sorted(law, key=law.get, reverse=True)[:3]
    documents = [" ".join(map(str, PROMPT + list(seq))) for seq in likely]
    base = (SEED * 100 + 50 + ["ngram", "eagle", "hybrid", "hybrid-fixed"].index(method)) * 1_000_003
    sequences, depths = sample(head_decoder, method, REAL_SAMPLES, sampling, documents, base_seed=base)
    p_value = fidelity_p(sequences, law)
    deep = sum(n for d, n in depths.items() if d >= 2)
    line = report(f"real-{method}", p_value, deep_steps=deep)
    assert p_value > P_FLOOR, line
    assert deep > 0, depths  # drafts accepted two or more deep
