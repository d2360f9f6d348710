"""Constrained sampling is lossless: tokens are distributed as the target's own, masked by the grammar, then warped.

The grammar `x(a|b|c)(a|b|{")-[a-z]*` forces `x` first (grafted as a "grammar" draft), then offers a few
tokens whose continuations depend on the path (`a` may be followed by the part-two `a`, `b`, `{"` or `{`, since
`{"` has two tokenizations), then forces `-` (grafted again). The exact joint distribution of tokens 2 and 3 is
enumerated with xgrammar's matcher directly (no hsd_rag.constrain code) and compared by chi-square to 800
speculative samples, for drafts that are mostly forbidden, a dense tree over the grammar's own tokens, and the
real n-gram / EAGLE / hybrid drafters.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import xgrammar as xgr

from hsd_rag.drafters.base import DraftContext
from hsd_rag.heads import Eagle3Head
from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree
from tests.constrain_fixtures import MODEL_VOCAB, compiled_grammar, json_decoder
from tests.fake_drafters import RandomTreeDrafter
from tests.test_sampling_fidelity import fidelity_p

PATTERN = {"type": "regex", "pattern": r'x(a|b|c)(a|b|\{")-[a-z]*'}
PROMPT = [0, 30, 31]
SAMPLES = 800
P_FLOOR = 1e-3  # fixed seeds make this deterministic; a real bias gives p-values far below it
SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.8, top_k=0, top_p=0.9),
    dict(temperature=1.5, top_k=3, top_p=1.0),
]


@pytest.fixture(scope="module")
def decoder():
    dec = json_decoder("llama", seed=3, layers=3, hidden=32)  # EAGLE-3 reads 3 layers
    with torch.no_grad():
        dec.model.lm_head.weight.mul_(0.5)  # spread the mass over the grammar's few allowed tokens
    torch.manual_seed(0)
    dec.head = Eagle3Head.from_target(dec.model)
    return dec


def exact_joint(decoder, temperature, top_k, top_p) -> dict[tuple[int, int], float]:
    """P(tokens 2 and 3) of the plain constrained decode, by enumeration with the grammar engine's matcher."""
    matcher = xgr.GrammarMatcher(compiled_grammar(decoder, PATTERN))
    bitmask = xgr.allocate_token_bitmask(1, MODEL_VOCAB)

    def probs(ids):
        with torch.no_grad():
            logits = decoder.model(torch.tensor([ids])).logits[0, -1:].clone()
        xgr.reset_token_bitmask(bitmask)
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        return logits_to_probs(logits[0], temperature, top_k, top_p)

    x = decoder.tokenizer.convert_tokens_to_ids("x")
    assert matcher.accept_token(x)
    prefix = PROMPT + [x]
    p1 = probs(prefix)
    joint = {}
    for a in torch.nonzero(p1).flatten().tolist():
        assert matcher.accept_token(a)
        p2 = probs(prefix + [a])
        for b in torch.nonzero(p2).flatten().tolist():
            joint[(a, b)] = float(p1[a] * p2[b])
        matcher.rollback(1)
    return joint


class GrammarTokensTree:
    """A dense depth-2 tree over tokens the grammar uses (some allowed, some not), scored at random."""

    name = "dense"

    def __init__(self, tokens: list[int], seed: int):
        self.tokens = tokens
        self.rng = torch.Generator().manual_seed(seed)

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        tree = TokenTree.root(context.token_ids[-1])
        for first, second in itertools.product(self.tokens, self.tokens):
            score = float(torch.rand(1, generator=self.rng))
            parent = tree.add(0, first, score, SOURCE_NGRAM)
            tree.add(parent, second, score * 0.5, SOURCE_EAGLE)
        return tree

    def observe(self, outcome):
        pass

    def close(self):
        pass


def sample_counts(decoder, method: str, sampling: dict, documents=None):
    counts: dict[tuple[int, int], int] = {}
    grammar_accepted = drafted = 0
    for seed in range(SAMPLES):
        result = decoder.generate(PROMPT, documents=documents, response_format=PATTERN, method=method, budget=6,
                                  max_new_tokens=4, seed=seed, **sampling)
        key = tuple(result.token_ids[1:3])
        counts[key] = counts.get(key, 0) + 1
        grammar_accepted += result.stats.accepted_by_source.get("grammar", 0)
        drafted += result.stats.tree_nodes
    return counts, grammar_accepted, drafted


@pytest.mark.parametrize(
    ("drafts", "setting"),
    [("random-tree", 0), ("dense-grammar-tokens", 1), ("dense-grammar-tokens", 2), ("random-tree", 2)],
)
def test_constrained_samples_match_the_constrained_target(decoder, drafts, setting):
    sampling = SETTINGS[setting]
    tok = decoder.tokenizer.convert_tokens_to_ids
    drafter = {
        "random-tree": lambda: RandomTreeDrafter(MODEL_VOCAB, seed=7, width=3, depth=3),
        "dense-grammar-tokens": lambda: GrammarTokensTree([tok(t) for t in ["a", "b", "c", "{", '{"', "-"]], 5),
    }[drafts]()
    decoder.drafter_factories = {**type(decoder).drafter_factories, "ngram": lambda d, cfg: drafter}
    counts, grammar_accepted, drafted = sample_counts(decoder, "ngram", sampling)
    joint = exact_joint(decoder, **sampling)
    assert abs(sum(joint.values()) - 1.0) < 1e-4 and len(joint) >= 6  # a real distribution with several cells
    p_value = fidelity_p(counts, joint)
    assert p_value > P_FLOOR, f"constrained samples differ from the constrained target (p={p_value:.2e})"
    assert grammar_accepted >= SAMPLES  # the forced `x` (and `-`) were grafted and accepted
    assert drafted > SAMPLES  # besides grafts, drafts survived pruning and were verified


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
def test_real_methods_sample_the_constrained_target(decoder, method):
    decoder.drafter_factories = type(decoder).drafter_factories
    sampling = SETTINGS[1]
    documents = ["xab-abc xc{\"-q xba-zz"]  # n-gram drafts that are sometimes right
    counts, _, drafted = sample_counts(decoder, method, sampling, documents)
    p_value = fidelity_p(counts, exact_joint(decoder, **sampling))
    assert p_value > P_FLOOR, f"{method}: constrained samples differ from the target (p={p_value:.2e})"
    assert drafted > SAMPLES
