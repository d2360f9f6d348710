"""The decoder's public contract on a tiny model: stop strings, streaming, stats, and clear errors."""

from __future__ import annotations

import pytest
import torch

from hsd_rag import ContextWindowError, HybridSpecDecoder
from tests.fake_drafters import RandomTreeDrafter
from tests.tiny_models import TINY_VOCAB, IdTokenizer, tiny_model

PROMPT = [0, 21, 22, 23, 24]


@pytest.fixture(scope="module")
def dec():
    return HybridSpecDecoder(tiny_model("llama", seed=5), IdTokenizer())


def test_stream_concatenates_to_generate_text(dec):
    full = dec.generate(PROMPT, max_new_tokens=20, method="ngram")
    stream = dec.stream(PROMPT, max_new_tokens=20, method="ngram")
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert stream.result.token_ids == full.token_ids
    assert len(pieces) <= stream.result.stats.steps  # one piece per target forward at most


def test_stream_tokens_carry_sources(dec):
    stream = dec.stream_tokens(PROMPT, max_new_tokens=12, method="vanilla")
    pieces = list(stream)
    assert [p.token_id for p in pieces] == stream.result.token_ids
    assert {p.source for p in pieces} == {"target"}


def test_stop_string_cuts_text(dec):
    full = dec.generate(PROMPT, max_new_tokens=20, method="vanilla")
    words = full.text.split()
    assert len(words) >= 4
    stop = " " + words[3]
    res = dec.generate(PROMPT, max_new_tokens=20, method="vanilla", stop=[stop])
    assert res.text == full.text[: full.text.find(stop)]
    assert res.stats.stop_reason == "stop_string"
    assert "".join(dec.stream(PROMPT, max_new_tokens=20, method="vanilla", stop=stop)) == res.text


def test_stats_add_up(dec):
    dec2 = HybridSpecDecoder(dec.model, IdTokenizer())
    prompt = PROMPT
    ref = dec.generate(prompt, max_new_tokens=30, method="vanilla").token_ids
    dec2.drafter_factories = {"ngram": lambda d, c: RandomTreeDrafter(TINY_VOCAB, seed=1, oracle=prompt + ref)}
    res = dec2.generate(prompt, max_new_tokens=30, method="ngram", budget=8)
    s = res.stats
    assert res.token_ids == ref
    assert s.new_tokens == len(res.token_ids)
    # every token is either an accepted draft or a bonus token from the target (one per step, maybe cut at the end)
    assert sum(s.accepted_by_source.values()) + s.steps >= s.new_tokens
    assert sum(s.accepted_by_depth.values()) == s.steps
    assert s.tau == pytest.approx(s.new_tokens / s.steps)
    assert s.draft_s >= 0 and s.verify_s > 0 and s.total_s >= s.draft_s + s.verify_s
    assert res.token_sources.count("target") <= s.steps


def test_prompt_longer_than_context_window(dec):
    window = dec.model.config.max_position_embeddings
    with pytest.raises(ContextWindowError, match="context window"):
        dec.generate([2] * window, max_new_tokens=4)


def test_generation_stops_at_context_window(dec):
    window = dec.model.config.max_position_embeddings
    res = dec.generate([2] * (window - 3), max_new_tokens=50, method="ngram")
    assert len(res.token_ids) <= 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_token=5), "max_new_token"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(method="magic"), "method"),
        (dict(temperature=-1), "temperature"),
        (dict(budget=-2), "budget"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_arguments_are_named(dec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dec.generate(PROMPT, **kwargs)


def test_bad_prompts(dec):
    with pytest.raises(ValueError, match="empty"):
        dec.generate([])
    with pytest.raises(TypeError, match="prompt"):
        dec.generate(3.5)
    with pytest.raises(ValueError, match="chat template"):
        dec.generate([{"role": "user", "content": "hi"}])


def test_tensor_prompt_and_eos(dec):
    res = dec.generate(torch.tensor([PROMPT]), max_new_tokens=200, method="vanilla")
    if res.stats.stop_reason == "eos":
        assert res.token_ids[-1] in dec.eos_token_ids
    else:
        assert len(res.token_ids) == 200
