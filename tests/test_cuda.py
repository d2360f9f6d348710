"""The same promises on a CUDA device (skipped without one; `scripts/gpu_check.sh` runs them on a GPU machine).

Nothing in the decoder names a device: models, heads and trees follow the target. These tests move the tiny
targets to CUDA and check greedy equality with HF `generate` on that device for every method, and that a step
reads the device back only where it must (the same budget as tests/test_host_syncs.py).
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from tests.test_host_syncs import ReadBackCounter
from tests.tiny_models import IdTokenizer, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def decoder(request):
    model = tiny_model(request.param, seed=11, layers=8).to("cuda")
    torch.manual_seed(0)
    return HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))


@pytest.mark.parametrize("method", ["vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed"])
@pytest.mark.parametrize("budget", [4, 16, "auto"])
def test_greedy_equals_generate_on_cuda(decoder, method, budget):
    prompt = [0, 30, 31, 32, 33, 34, 35]
    ids = torch.tensor([prompt], device="cuda")
    expected = decoder.model.generate(ids, do_sample=False, max_new_tokens=32)[0, len(prompt):].tolist()
    document = " ".join(map(str, prompt[-3:] + expected[:20]))
    result = decoder.generate(prompt, documents=[document], method=method, budget=budget, max_new_tokens=32,
                              answer_history=False)
    assert result.token_ids == expected[: len(result.token_ids)]
    assert len(result.token_ids) == len(expected) or result.stats.stop_reason == "eos"


@pytest.mark.parametrize(("method", "per_step"), [("ngram", 1), ("eagle", 2), ("hybrid", 2)])
def test_read_backs_per_step_on_cuda(decoder, method, per_step):
    prompt = [0, 30, 31, 32, 30, 31, 32, 30, 31]
    with ReadBackCounter() as counter:
        result = decoder.generate(prompt, documents=["30 31 32 33 34"], method=method, budget=8,
                                  max_new_tokens=24, answer_history=False)
    assert counter.count <= per_step * result.stats.steps


def test_sampling_runs_on_cuda_with_a_seed(decoder):
    prompt = [0, 30, 31, 32]
    first = decoder.generate(prompt, method="hybrid", budget=8, max_new_tokens=16, temperature=0.8, seed=3)
    again = decoder.generate(prompt, method="hybrid", budget=8, max_new_tokens=16, temperature=0.8, seed=3,
                             answer_history=False)
    assert first.stats.new_tokens > 0 and again.stats.new_tokens > 0
