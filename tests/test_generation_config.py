"""The checkpoint's generation_config decides what `generate` would decide, and explicit arguments override it.

References are HF itself: `model.generate` for greedy outputs, HF's own logits processors for the exact
sampling distribution.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import SOURCE_NGRAM, TokenTree
from tests.fake_drafters import RandomTreeDrafter
from tests.fidelity import chi_square_p
from tests.tiny_models import TINY_VOCAB, IdTokenizer, tiny_model

PROMPT = [0, 30, 31, 32, 30, 31, 33]
METHODS = ["vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed"]


def hf_generate(model, prompt, **kwargs):
    out = model.generate(torch.tensor([prompt]), min_new_tokens=0, **kwargs)
    return out[0, len(prompt) :].tolist()


@pytest.fixture()
def model():
    """A fresh tiny model per test: tests edit its generation_config."""
    m = tiny_model("llama", seed=11, layers=4)
    m.generation_config.eos_token_id = None  # long outputs, so the penalty matters many times
    return m


def decoder_for(model, head: bool = True) -> HybridSpecDecoder:
    """A decoder without end-of-sequence tokens, like `generate` with the fixture's eos_token_id=None."""
    torch.manual_seed(0)
    dec = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model) if head else None)
    dec.eos_token_ids = set()
    return dec


# ---- greedy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_repetition_penalty_from_generation_config(model, method):
    model.generation_config.repetition_penalty = 1.3
    expected = hf_generate(model, PROMPT, max_new_tokens=40)
    plain = hf_generate(model, PROMPT, max_new_tokens=40, repetition_penalty=1.0)
    assert expected != plain  # the penalty changes this output, so the test can tell
    dec = decoder_for(model)
    # a document with the penalised answer (drafts accepted deep) and one with the unpenalised one (rejected)
    for budget, answer in itertools.product([1, 16], [expected, plain]):
        document = " ".join(map(str, PROMPT[-3:] + answer))
        res = dec.generate(PROMPT, documents=[document], method=method, budget=budget, max_new_tokens=40)
        assert res.token_ids == expected, (method, budget, answer is plain)


def test_random_trees_under_the_penalty(model):
    model.generation_config.repetition_penalty = 1.5
    expected = hf_generate(model, PROMPT, max_new_tokens=40)
    for seed in range(3):
        dec = decoder_for(model, head=False)
        drafter = RandomTreeDrafter(TINY_VOCAB, seed=seed, oracle=PROMPT + expected)
        dec.drafter_factories = {"ngram": lambda d, cfg, drafter=drafter: drafter}
        assert dec.generate(PROMPT, method="ngram", budget=24, max_new_tokens=40).token_ids == expected


def test_explicit_arguments_override_generation_config(model):
    model.generation_config.update(do_sample=True, temperature=0.7, repetition_penalty=1.3)
    dec = decoder_for(model)
    greedy = hf_generate(model, PROMPT, max_new_tokens=30, do_sample=False)
    assert dec.generate(PROMPT, max_new_tokens=30, do_sample=False).token_ids == greedy
    assert dec.generate(PROMPT, max_new_tokens=30, temperature=0).token_ids == greedy
    unpenalised = hf_generate(model, PROMPT, max_new_tokens=30, do_sample=False, repetition_penalty=1.0)
    assert dec.generate(PROMPT, max_new_tokens=30, temperature=0, repetition_penalty=1.0).token_ids == unpenalised


def test_resolved_settings_follow_hf_priorities(model):
    dec = HybridSpecDecoder(model, IdTokenizer())
    cfg = dec.config()
    assert cfg.greedy and cfg.do_sample is False and cfg.repetition_penalty == 1.0
    sampled = dec.config(temperature=0.7)  # an explicit temperature > 0 samples, with HF's top_k=50 default
    assert not sampled.greedy and (sampled.temperature, sampled.top_k, sampled.top_p) == (0.7, 50, 1.0)
    model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, min_p=0.05)
    cfg = dec.config()
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p) == (True, 0.6, 20, 0.9, 0.05)
    cfg = dec.config(top_k=0, temperature=1.1)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (1.1, 0, 0.9)
    assert dec.config(do_sample=False).greedy


@pytest.mark.parametrize(
    ("setting", "value", "sampling"),
    [
        ("no_repeat_ngram_size", 2, False),
        ("num_beams", 2, False),
        ("bad_words_ids", [[5]], False),
        ("min_new_tokens", 3, False),
        ("suppress_tokens", [4], False),
        ("typical_p", 0.5, True),
        ("epsilon_cutoff", 0.01, True),
    ],
)
def test_unsupported_generation_config_settings_are_named(model, setting, value, sampling):
    setattr(model.generation_config, setting, value)
    model.generation_config.do_sample = sampling
    dec = HybridSpecDecoder(model, IdTokenizer())
    with pytest.raises(ValueError, match=setting):
        dec.generate(PROMPT, max_new_tokens=4)


def test_sampling_only_settings_are_ignored_under_greedy_as_in_generate(model):
    model.generation_config.typical_p = 0.5  # HF applies it only when sampling
    expected = hf_generate(model, PROMPT, max_new_tokens=12, do_sample=False)
    assert decoder_for(model, head=False).generate(PROMPT, max_new_tokens=12).token_ids == expected


def test_min_length_counts_only_when_it_acts(model):
    model.generation_config.eos_token_id = 1
    model.generation_config.min_length = len(PROMPT)  # never suppresses EOS for this prompt: fine
    HybridSpecDecoder(model, IdTokenizer()).generate(PROMPT, max_new_tokens=2)
    model.generation_config.min_length = len(PROMPT) + 5
    with pytest.raises(ValueError, match="min_length"):
        HybridSpecDecoder(model, IdTokenizer()).generate(PROMPT, max_new_tokens=2)


@pytest.mark.parametrize("name", ["num_beams", "no_repeat_ngram_size"])
def test_unsupported_call_arguments_are_named(model, name):
    with pytest.raises(ValueError, match=name):
        HybridSpecDecoder(model, IdTokenizer()).generate(PROMPT, **{name: 2})


# ---- the pieces against HF's own processors ------------------------------------------------------------------


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    for t, k, m in itertools.product([0.5, 1.3], [0, 7], [0.05, 0.3]):
        expected = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        expected = MinPLogitsWarper(m)(None, expected)
        assert torch.allclose(logits_to_probs(logits, t, k, 1.0, m), expected.softmax(-1), atol=1e-6)


def test_repetition_penalty_rows_follow_each_nodes_path():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from hsd_rag.repetition_penalty import RepetitionPenalty

    history = [5, 9, 2, 7]  # prompt + decided tokens; 7 is the root
    tree = TokenTree.root(7)
    a = tree.add(0, 3, 0.9, SOURCE_NGRAM)
    b = tree.add(a, 11, 0.8, SOURCE_NGRAM)
    tree.add(b, 3, 0.7, SOURCE_NGRAM)
    tree.add(0, 12, 0.5, SOURCE_NGRAM)
    torch.manual_seed(1)
    logits = torch.randn(len(tree), 16) * 2
    rule = RepetitionPenalty(1.7)
    rule.start(history[:2])
    rule.advance(history[2:])
    out = rule.apply(tree, logits, history)
    hf = RepetitionPenaltyLogitsProcessor(1.7)
    for node in range(len(tree)):
        seen = history + [tree.tokens[n] for n in tree.path_to(node)[1:]]
        expected = hf(torch.tensor([seen]), logits[node : node + 1].clone())
        assert torch.allclose(out[node], expected[0]), node


# ---- sampling: the checkpoint's settings decide the distribution --------------------------------------------

SAMPLES = 800
P_FLOOR = 1e-3


def hf_distribution(model, ids, top_k: int = 50, repetition_penalty: bool = True):
    """The next-token law `generate` samples from under this generation_config, with HF's own processors."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    gc = model.generation_config
    scores = model(torch.tensor([ids])).logits[:, -1].float()
    processors = [RepetitionPenaltyLogitsProcessor(gc.repetition_penalty)] if repetition_penalty else []
    if gc.temperature is not None:
        processors.append(TemperatureLogitsWarper(gc.temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))  # generate's default 50: generation_config.top_k is unset
    for processor in processors:
        scores = processor(torch.tensor([ids]), scores)
    return scores.softmax(-1)[0]


def test_sampling_defaults_come_from_generation_config(model):
    """No sampling argument at all: do_sample, temperature and HF's top_k=50 default come from the checkpoint
    (min_p is checked against HF's warper above: it cannot bind where top_k=50 does)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)  # flat enough that > 50 tokens carry real mass: top_k=50 matters
    model.generation_config.update(do_sample=True, temperature=1.4)
    with torch.no_grad():
        law = hf_distribution(model, PROMPT, repetition_penalty=False)
        without_top_k = hf_distribution(model, PROMPT, top_k=0, repetition_penalty=False)
    assert float(without_top_k.topk(50).values.sum()) < 0.8  # without top_k=50 other tokens would be drawn
    dec = decoder_for(model, head=False)
    counts: dict[int, int] = {}
    for seed in range(SAMPLES):
        token = dec.generate(PROMPT, method="vanilla", max_new_tokens=1, seed=seed).token_ids[0]
        counts[token] = counts.get(token, 0) + 1
    p_value = chi_square_p(counts, {t: float(law[t]) for t in range(TINY_VOCAB)})
    assert p_value > P_FLOOR, f"sampled distribution differs from generate's (p={p_value:.2e})"


def test_sampled_repetition_penalty_along_draft_paths():
    """Sampling with the checkpoint's repetition penalty: the first two tokens (the second often an accepted
    draft, penalised along its own path) follow generate's joint law."""
    small = tiny_model("llama", vocab=8, seed=3, layers=4, hidden=32)
    small.generation_config.update(do_sample=True, repetition_penalty=1.8, eos_token_id=None)
    prompt = [0, 3, 5, 3]
    with torch.no_grad():
        first = hf_distribution(small, prompt)
        joint = {(a, b): float(first[a] * hf_distribution(small, prompt + [a])[b]) for a in range(8) for b in range(8)}
    dec = HybridSpecDecoder(small, IdTokenizer())
    dec.eos_token_ids = set()
    drafter = RandomTreeDrafter(8, seed=7, width=2, depth=3)
    dec.drafter_factories = {"ngram": lambda d, cfg: drafter}
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(SAMPLES):
        res = dec.generate(prompt, method="ngram", budget=8, max_new_tokens=3, seed=seed)
        counts[tuple(res.token_ids[:2])] = counts.get(tuple(res.token_ids[:2]), 0) + 1
        accepted += sum(res.stats.accepted_by_source.values())
    assert accepted > SAMPLES // 10  # drafts were accepted: the per-path penalty decided many second tokens
    p_value = chi_square_p(counts, joint)
    assert p_value > P_FLOOR, f"sampled distribution differs from generate's (p={p_value:.2e})"
