"""The decoder's public contract on a tiny model: stop strings, streaming, stats, and clear errors."""

from __future__ import annotations

import pytest
import torch

from hsd_rag import ContextWindowError, HybridSpecDecoder
from tests.fake_drafters import RandomTreeDrafter
from tests.tiny_models import TINY_VOCAB, IdTokenizer, tiny_model

PROMPT = [0, 21, 22, 23, 24]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


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
    ref = hf_greedy(dec.model, prompt, 30)
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
    prompt = [2] * (window - 3)
    res = dec.generate(prompt, max_new_tokens=50, method="ngram")
    expected = hf_greedy(dec.model, prompt, 3)  # the 3 tokens that still fit
    assert len(expected) == 3 and 1 not in expected  # no EOS on the way: the window is what stops it
    assert res.token_ids == expected and res.stats.stop_reason == "context_window"


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


def test_tensor_prompt_equals_list_prompt(dec):
    expected = hf_greedy(dec.model, PROMPT, 16)
    for prompt in (PROMPT, torch.tensor([PROMPT]), torch.tensor(PROMPT)):
        for method in ("vanilla", "ngram"):
            res = dec.generate(prompt, max_new_tokens=16, method=method)
            assert res.token_ids == expected, (type(prompt).__name__, tuple(getattr(prompt, "shape", ())), method)
            assert res.stats.prompt_tokens == len(PROMPT)


def test_eos_inside_a_step_ends_generation_like_generate():
    model = tiny_model("llama", seed=5)
    free = hf_greedy(model, PROMPT, 24)  # without EOS the model would write this
    eos = next(t for t in free[3:] if t != 1)  # pretend a token it writes mid-answer is EOS
    model.generation_config.eos_token_id = eos
    expected = hf_greedy(model, PROMPT, 24)
    assert expected[-1] == eos and len(expected) < 24
    drafter = RandomTreeDrafter(TINY_VOCAB, seed=3, oracle=PROMPT + free)  # drafts run past the EOS
    dec = HybridSpecDecoder(model, IdTokenizer())
    dec.drafter_factories = {"ngram": lambda d, c: drafter}
    for budget in (4, 16):
        res = dec.generate(PROMPT, max_new_tokens=24, method="ngram", budget=budget)
        assert res.token_ids == expected and res.stats.stop_reason == "eos"
    assert res.stats.tau > 1.0  # drafts were accepted, EOS among them
