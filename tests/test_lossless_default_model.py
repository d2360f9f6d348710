"""Greedy equality on the real default model (SmolLM2-135M-Instruct) with real RAG prompts.

Every method, with the head shipped for this model and with a random EAGLE-3 head, with related documents
(the passages of the prompt) and unrelated ones, against `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.data import format_messages
from hsd_rag.heads import Eagle3Head
from hsd_rag.loading import shipped_head_dir

pytestmark = pytest.mark.slow
MAX_NEW = 40
PROMPTS = 2


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


@pytest.fixture(scope="module")
def random_head_decoder(default_decoder):
    torch.manual_seed(0)
    head = Eagle3Head.from_target(default_decoder.model)
    return HybridSpecDecoder(default_decoder.model, default_decoder.tokenizer, head=head)


def check(decoder, references, method, budget, documents=None):
    for ex, messages, expected in references:
        docs = ex.documents if documents is None else documents
        res = decoder.generate(messages, documents=docs, method=method, budget=budget, max_new_tokens=MAX_NEW)
        assert res.token_ids == expected, (ex.id, method, budget)


def test_default_model_ships_a_head(default_decoder):
    assert shipped_head_dir() is not None
    assert default_decoder.head is not None and default_decoder.default_method == "hybrid"


@pytest.mark.parametrize("budget", [1, 4, 16, 60, "auto"])
def test_ngram(default_decoder, references, budget):
    check(default_decoder, references, "ngram", budget)


@pytest.mark.parametrize("method", ["eagle", "hybrid", "hybrid-fixed"])
@pytest.mark.parametrize("budget", [1, 16, 60])
def test_shipped_head(default_decoder, references, method, budget):
    check(default_decoder, references, method, budget)


@pytest.mark.parametrize("method", ["eagle", "hybrid", "hybrid-fixed"])
def test_random_head(random_head_decoder, references, method):
    check(random_head_decoder, references, method, 16)


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
def test_unrelated_documents(default_decoder, references, rag_examples, method):
    check(default_decoder, references, method, 16, documents=rag_examples[-1].documents)


def test_chat_template_matches_tokenizer(default_decoder):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = default_decoder.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert default_decoder.encode_prompt(messages) == list(expected)
