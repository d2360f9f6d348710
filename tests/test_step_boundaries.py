"""EOS, stop strings and split UTF-8 characters that land *inside* a multi-token accepted step.

tests/scripted_model.py builds a Llama whose greedy output is a known script (over the real SmolLM2 byte-level
tokenizer) and an EAGLE-3 head that drafts it, so every method accepts many tokens per step and we know where
each boundary falls. Token ids are compared with HF `generate(do_sample=False)` (with its own EOS handling and
`stop_strings`), and the steps are spied on to prove the boundary really fell inside a step.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from tests.scripted_model import scripted_model, successor_head, successor_map

TEXT = "Zoë met Łukasz in Kraków: 東京 🎉 means party!"  # Ł, 東, 京 and 🎉 are split over 2-3 byte-level tokens
TAIL = " Never shown."  # the script goes on after EOS: drafted past it, never emitted
PROMPT = "Story time"
METHODS = ["ngram", "eagle", "hybrid", "hybrid-fixed"]
MAX_NEW = 40


@pytest.fixture(scope="module")
def scripted():
    from transformers import AutoTokenizer

    from hsd_rag.loading import default_snapshot

    tok = AutoTokenizer.from_pretrained(default_snapshot())
    prompt = tok(PROMPT).input_ids
    script = tok(TEXT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    script += tok(TAIL, add_special_tokens=False).input_ids
    successor = successor_map(prompt, script)
    model = scripted_model(successor, eos_token_id=tok.eos_token_id)
    decoder = HybridSpecDecoder(model, tok, head=successor_head(model, successor))
    # the n-gram drafter reads the script (EOS and tail included) from a document
    return SimpleNamespace(decoder=decoder, tok=tok, prompt=prompt, documents=[TEXT + tok.eos_token + TAIL])


def hf_generate(scripted, **kwargs) -> list[int]:
    ids = torch.tensor([scripted.prompt])
    out = scripted.decoder.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=MAX_NEW, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def spied(decoder: HybridSpecDecoder) -> tuple[HybridSpecDecoder, list[list[int]]]:
    """A decoder over the same weights whose drafters log every step's emitted tokens (before EOS/stop cuts)."""
    steps: list[list[int]] = []

    def wrap(factory):
        def make(dec, cfg):
            drafter = factory(dec, cfg)
            observe = drafter.observe

            def logging_observe(outcome):
                steps.append(list(outcome.new_tokens))
                return observe(outcome)

            drafter.observe = logging_observe
            return drafter

        return make

    spy = HybridSpecDecoder(decoder.model, decoder.tokenizer, head=decoder.head)
    spy.drafter_factories = {name: wrap(f) for name, f in type(decoder).drafter_factories.items()}
    return spy, steps


def step_of(steps: list[list[int]], index: int) -> tuple[int, int]:
    """(step number, position inside that step) of the `index`-th generated token."""
    for number, tokens in enumerate(steps):
        if index < len(tokens):
            return number, index
        index -= len(tokens)
    raise AssertionError("token index beyond the logged steps")


@pytest.mark.parametrize("method", METHODS)
def test_eos_inside_an_accepted_step(scripted, method):
    expected = hf_generate(scripted)
    assert expected[-1] == scripted.tok.eos_token_id and len(expected) < MAX_NEW  # HF stops at EOS, keeps it
    decoder, steps = spied(scripted.decoder)
    res = decoder.generate(scripted.prompt, documents=scripted.documents, method=method, budget=16,
                           max_new_tokens=MAX_NEW)
    assert res.token_ids == expected
    assert res.text == TEXT and res.stats.stop_reason == "eos"
    number, position = step_of(steps, len(expected) - 1)
    assert position < len(steps[number]) - 1, steps[number]  # drafts after EOS were accepted in that step


STOPS = ["Kraków", "東京", "🎉", " party"]
SPLIT_AFTER_FIRST_CHARACTER = ["東京"]  # its first character is complete while the second is still partial


@pytest.fixture(scope="module")
def stop_references(scripted) -> dict[str, list[int]]:
    """HF's tokens for each stop string: they end on the token that completes it."""
    return {stop: hf_generate(scripted, stop_strings=[stop], tokenizer=scripted.tok) for stop in STOPS}


@pytest.mark.parametrize("method", METHODS)
def test_stop_string_inside_an_accepted_step(scripted, stop_references, method):
    decoder, steps = spied(scripted.decoder)
    inside = 0
    for stop, expected in stop_references.items():
        steps.clear()
        res = decoder.generate(scripted.prompt, documents=scripted.documents, method=method, budget=16,
                               max_new_tokens=MAX_NEW, stop=[stop])
        assert res.token_ids == expected, stop
        assert res.text == TEXT[: TEXT.find(stop)] and res.stats.stop_reason == "stop_string"
        if stop not in SPLIT_AFTER_FIRST_CHARACTER:  # that case: test_stream_never_shows_part_of_a_stop_string
            streamed = decoder.stream(scripted.prompt, documents=scripted.documents, method=method, budget=16,
                                      max_new_tokens=MAX_NEW, stop=stop)
            assert "".join(streamed) == res.text  # held-back characters never leak the stop string
        number, position = step_of(steps, len(expected) - 1)
        inside += position < len(steps[number]) - 1
    assert inside >= len(STOPS) - 1  # (almost) every stop string completed mid-step, with drafts after it


@pytest.mark.parametrize("method", ["vanilla", "ngram"])
def test_stream_never_shows_part_of_a_stop_string(scripted, method):
    (stop,) = SPLIT_AFTER_FIRST_CHARACTER
    kwargs = dict(documents=scripted.documents, method=method, budget=16, max_new_tokens=MAX_NEW, stop=stop)
    final = scripted.decoder.generate(scripted.prompt, **kwargs).text
    assert final == TEXT[: TEXT.find(stop)]
    assert "".join(scripted.decoder.stream(scripted.prompt, **kwargs)) == final


@pytest.mark.parametrize("method", ["vanilla", *METHODS])
def test_streaming_holds_back_split_characters(scripted, method):
    stream = scripted.decoder.stream_tokens(scripted.prompt, documents=scripted.documents, method=method,
                                            budget=16, max_new_tokens=MAX_NEW)
    pieces = list(stream)
    assert stream.result.text == TEXT
    ids, emitted = [], ""
    for piece in pieces:
        ids.append(piece.token_id)
        emitted += piece.text
        assert "\ufffd" not in piece.text  # never half a character
        decoded = scripted.tok.decode(ids, skip_special_tokens=True)
        assert decoded.startswith(emitted)  # never ahead of the tokens, never different
        if not decoded.endswith("\ufffd"):  # a token that completes its characters releases everything held
            assert emitted == decoded
    assert emitted == TEXT
    split = [p.text for p in pieces if p.text == ""]
    assert len(split) >= 4  # the tokens that only started a character emitted nothing
    per_step = list(scripted.decoder.stream(scripted.prompt, documents=scripted.documents, method=method,
                                            budget=16, max_new_tokens=MAX_NEW))
    assert "".join(per_step) == TEXT and not any("\ufffd" in p for p in per_step)
