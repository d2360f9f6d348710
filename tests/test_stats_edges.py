"""Stats describe the returned output exactly, also when EOS, max_new_tokens or a stop string cuts a step short."""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from tests.fake_drafters import RandomTreeDrafter
from tests.tiny_models import TINY_VOCAB, IdTokenizer, tiny_model

PROMPT = [0, 30, 31, 32, 33, 34, 35]
MAX_NEW = 40


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=4)  # a varied output: its tokens rarely repeat early


@pytest.fixture(scope="module")
def truth(model):
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.eos_token_ids = set()
    return dec.generate(PROMPT, max_new_tokens=MAX_NEW, method="vanilla").token_ids


def oracle_decoder(model, truth, eos=()) -> HybridSpecDecoder:
    """Drafts that hold the true continuation: steps emit several tokens, so cuts fall inside steps."""
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.eos_token_ids = set(eos)
    dec.drafter_factories = {"ngram": lambda d, cfg: RandomTreeDrafter(TINY_VOCAB, seed=3, oracle=PROMPT + truth)}
    return dec


def assert_exact(result):
    stats, sources = result.stats, result.token_sources
    assert stats.new_tokens == len(result.token_ids) == len(sources)
    for name in ("ngram", "eagle"):
        assert stats.accepted_by_source.get(name, 0) == sum(name in s.split("+") for s in sources)
    drafts = sum(s != "target" for s in sources)
    assert sum(depth * steps for depth, steps in stats.accepted_by_depth.items()) == drafts
    assert sum(stats.accepted_by_depth.values()) == stats.steps
    assert stats.tau == pytest.approx(len(result.token_ids) / stats.steps)


def step_of_each_token(dec, **kwargs):
    return [(p.token_id, p.step) for p in dec.stream_tokens(PROMPT, method="ngram", budget=8, **kwargs)]


def middle_of_a_long_step(pieces, usable=lambda i: True) -> int:
    """Index of a usable token with other tokens of its step before and after it."""
    for i in range(1, len(pieces) - 1):
        if pieces[i - 1][1] == pieces[i][1] == pieces[i + 1][1] and usable(i):
            return i
    raise AssertionError("no step emitted three tokens")


def test_stop_string_mid_step(model, truth):
    dec = oracle_decoder(model, truth)
    full = dec.generate(PROMPT, method="ngram", budget=8, max_new_tokens=MAX_NEW)

    def first_occurrence(i):  # " x " first appears where token i is (the text is the ids joined by spaces)
        return full.text.find(f" {truth[i]} ") == len(" ".join(map(str, truth[:i])))

    i = middle_of_a_long_step(step_of_each_token(dec, max_new_tokens=MAX_NEW), first_occurrence)
    stop = f" {truth[i]} "
    res = dec.generate(PROMPT, method="ngram", budget=8, max_new_tokens=MAX_NEW, stop=[stop])
    assert res.stats.stop_reason == "stop_string"
    assert res.token_ids == truth[: i + 2]  # the stop string " x " is complete once the token after x arrived
    assert res.text == full.text[: full.text.find(stop)]
    assert_exact(res)


def test_eos_mid_step_counts_no_draft_after_it(model, truth):
    pieces = step_of_each_token(oracle_decoder(model, truth), max_new_tokens=MAX_NEW)
    i = middle_of_a_long_step(pieces, lambda i: truth[i] not in truth[:i])
    eos = truth[i]
    res = oracle_decoder(model, truth, eos=[eos]).generate(PROMPT, method="ngram", budget=8, max_new_tokens=MAX_NEW)
    assert res.stats.stop_reason == "eos" and res.token_ids == truth[: i + 1]
    assert_exact(res)


def test_max_new_tokens_mid_step(model, truth):
    pieces = step_of_each_token(oracle_decoder(model, truth), max_new_tokens=MAX_NEW)
    i = middle_of_a_long_step(pieces)
    res = oracle_decoder(model, truth).generate(PROMPT, method="ngram", budget=8, max_new_tokens=i + 1)
    assert res.stats.stop_reason == "length" and res.token_ids == truth[: i + 1]
    assert_exact(res)


def test_plain_run_stats_are_exact(model, truth):
    res = oracle_decoder(model, truth).generate(PROMPT, method="ngram", budget=8, max_new_tokens=MAX_NEW)
    assert res.token_ids == truth
    assert_exact(res)
    assert res.stats.queue_s >= 0 and res.stats.total_s >= res.stats.prefill_s + res.stats.verify_s


@pytest.mark.parametrize("shape", [(2, 5), (1, 1, 5), ()])
def test_batched_or_odd_tensor_prompts_are_refused(model, shape):
    dec = HybridSpecDecoder(model, IdTokenizer())
    prompt = torch.full(shape, 7, dtype=torch.long) if shape else torch.tensor(7)
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        dec.generate(prompt, max_new_tokens=2)


def test_one_row_tensor_prompts_work(model):
    dec = HybridSpecDecoder(model, IdTokenizer())
    expected = dec.generate(PROMPT, max_new_tokens=5).token_ids
    assert dec.generate(torch.tensor([PROMPT]), max_new_tokens=5).token_ids == expected
    assert dec.generate(torch.tensor(PROMPT), max_new_tokens=5).token_ids == expected
