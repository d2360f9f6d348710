"""Greedy equality on the real default model (SmolLM2-135M-Instruct) with real RAG prompts."""

from __future__ import annotations

import pytest
import torch

from hsd_rag.data import format_messages

pytestmark = pytest.mark.slow
MAX_NEW = 40
PROMPTS = 3


def hf_greedy(decoder, messages) -> list[int]:
    ids = torch.tensor([decoder.encode_prompt(messages)])
    out = decoder.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def references(default_decoder, rag_examples):
    cases = []
    for ex in rag_examples[:PROMPTS]:
        messages = format_messages(ex)
        cases.append((ex, messages, hf_greedy(default_decoder, messages)))
    return cases


METHODS = ["ngram"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [1, 4, 16, 60])
def test_related_documents(default_decoder, references, method, budget):
    for ex, messages, expected in references:
        res = default_decoder.generate(messages, documents=ex.documents, method=method, budget=budget,
                                       max_new_tokens=MAX_NEW)
        assert res.token_ids == expected, ex.id


@pytest.mark.parametrize("method", METHODS)
def test_unrelated_documents(default_decoder, references, rag_examples, method):
    unrelated = rag_examples[-1].documents
    for ex, messages, expected in references[:2]:
        res = default_decoder.generate(messages, documents=unrelated, method=method, budget=16, max_new_tokens=MAX_NEW)
        assert res.token_ids == expected, ex.id


def test_chat_template_matches_tokenizer(default_decoder):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = default_decoder.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert default_decoder.encode_prompt(messages) == list(expected)
