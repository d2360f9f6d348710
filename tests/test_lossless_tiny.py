"""Greedy equality with HF generate for tiny random Llama / Qwen2 / Mistral, with adversarial draft trees.

The planted true path sits after random nodes and decoy siblings (tests/fake_drafters.py), so accepting it
makes the cache rollback keep non-adjacent rows at almost every step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_rag import HybridSpecDecoder
from tests.fake_drafters import RandomTreeDrafter, skips_siblings
from tests.tiny_models import TINY_VOCAB, IdTokenizer, tiny_model

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return request.param, tiny_model(request.param)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


def decoder_with(model, drafter) -> HybridSpecDecoder:
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.drafter_factories = {**dec.drafter_factories, "ngram": lambda d, cfg: drafter}
    return dec


@pytest.mark.parametrize("budget", [1, 4, 16, 60, "auto"])
@pytest.mark.parametrize("planted", [True, False], ids=["true-path-planted", "random-only"])
def test_greedy_equals_generate(tiny, budget, planted):
    _, model = tiny
    prompt = [0, 11, 12, 13, 14, 15, 16, 17]
    expected = hf_greedy(model, prompt, 48)
    drafter = RandomTreeDrafter(TINY_VOCAB, seed=budget, oracle=prompt + expected if planted else None)
    result = decoder_with(model, drafter).generate(prompt, max_new_tokens=48, method="ngram", budget=budget)
    assert result.token_ids == expected
    if planted and budget != 1:
        assert result.stats.tau > 1.5  # the planted true path is actually being accepted
        assert skips_siblings(drafter.accepted_paths)  # past decoy siblings: the rollback moved cache rows
    assert result.stats.steps <= 48


def test_vanilla_equals_generate(tiny):
    _, model = tiny
    prompt = [0, 3, 4, 5]
    result = HybridSpecDecoder(model, IdTokenizer()).generate(prompt, max_new_tokens=30, method="vanilla")
    assert result.token_ids == hf_greedy(model, prompt, 30)
    assert result.stats.steps == len(result.token_ids) and result.stats.tau == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(2, TINY_VOCAB - 1), min_size=1, max_size=24),
    budget=st.integers(0, 40),
    seed=st.integers(0, 10_000),
    planted=st.booleans(),
    max_new=st.integers(1, 24),
)
def test_greedy_fuzz(prompt, budget, seed, planted, max_new):
    model = _FUZZ_MODEL
    expected = hf_greedy(model, prompt, max_new)
    drafter = RandomTreeDrafter(TINY_VOCAB, seed=seed, oracle=prompt + expected if planted else None)
    result = decoder_with(model, drafter).generate(prompt, max_new_tokens=max_new, method="ngram", budget=budget)
    assert result.token_ids == expected


_FUZZ_MODEL = tiny_model("llama", seed=1)
