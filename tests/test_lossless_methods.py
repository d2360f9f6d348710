"""Every real method is lossless: greedy equality and sampling fidelity for ngram / eagle / hybrid(-fixed).

Random EAGLE-3 heads on tiny targets propose mostly wrong drafts; a document holding the true continuation
makes the n-gram drafts right, so both acceptance and rejection paths are exercised.
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from tests.tiny_models import IdTokenizer, tiny_model

METHODS = ["ngram", "eagle", "hybrid", "hybrid-fixed"]


def hf_greedy(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def decoder(request):
    model = tiny_model(request.param, seed=11, layers=8)
    torch.manual_seed(0)
    head = Eagle3Head.from_target(model)
    return HybridSpecDecoder(model, IdTokenizer(), head=head)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [1, 4, 16, 60, "auto"])
def test_greedy_equality(decoder, method, budget):
    prompt = [0, 30, 31, 32, 33, 34, 35]
    expected = hf_greedy(decoder.model, prompt, 40)
    related = " ".join(map(str, prompt[-3:] + expected[:25]))  # a document that contains the answer
    unrelated = " ".join(str(t) for t in range(40, 90))
    for docs in ([related], [unrelated]):
        res = decoder.generate(prompt, documents=docs, method=method, budget=budget, max_new_tokens=40)
        assert res.token_ids == expected, (method, budget, docs is unrelated)


def test_hybrid_labels_both_sources(decoder):
    prompt = [0, 30, 31, 32, 33]
    expected = hf_greedy(decoder.model, prompt, 30)
    doc = " ".join(map(str, prompt[-2:] + expected))
    res = decoder.generate(prompt, documents=[doc], method="hybrid", budget=16, max_new_tokens=30)
    assert res.token_ids == expected
    assert res.stats.drafted_by_source.get("eagle", 0) > 0
    assert res.stats.accepted_by_source.get("ngram", 0) > 0


def test_methods_needing_a_head_are_refused_without_one():
    dec = HybridSpecDecoder(tiny_model("llama"), IdTokenizer())
    assert "eagle" not in dec.available_methods()
    with pytest.raises(ValueError, match="EAGLE head"):
        dec.generate([0, 1, 2], method="hybrid")
