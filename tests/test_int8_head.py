"""hsd_rag.kernels.int8_linear: an fp32 draft head on a CPU target running the fast kernels multiplies with int8
weights; the head's parameters, checkpoints and training are untouched, the target never is, and decoding stays
lossless (the target verifies every draft)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import checkpoint as checkpoint_module
from hsd_rag.heads import load_head, save_head
from hsd_rag.kernels import packed_linear_count, stock_linears, use_fast_kernels
from hsd_rag.kernels.int8_linear import (
    Int8Linear,
    float_linears,
    int8_linear_available,
    int8_linear_count,
    int8_linears,
)
from tests.test_heads import LAYERS, VOCAB, random_eagle3
from tests.tiny_models import IdTokenizer, tiny_model

pytestmark = pytest.mark.skipif(not int8_linear_available(), reason="this torch build has no fbgemm int8 linear")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 192), nn.SiLU(), nn.Linear(192, 64, bias=False)).eval()


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max().detach() / reference.abs().max().detach())


@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 9, 96)])
def test_int8_output_is_close_to_the_float_one_and_the_weights_stay_float(shape):
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*shape)
    with torch.inference_mode():
        reference = model(x)
        assert int8_linears(model) == 2
        out = model(x)
    assert type(model[0]) is Int8Linear and out.shape == reference.shape
    assert 0 < _relative_error(out, reference) < 0.05  # really quantized, and close
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model[0].weight.dtype == torch.float32
    assert float_linears(model) == 2 and type(model[0]) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(model(x), reference)


def test_an_edited_weight_is_quantized_again_and_copies_pickles_and_training_work():
    model = _mlp()
    int8_linears(model)
    x = torch.randn(4, 96)
    with torch.no_grad():
        before = model[0](x)
        model[0].weight.mul_(2.0)
        after = model[0](x)
    bias = model[0].bias
    assert _relative_error(after - bias, 2 * (before - bias)) < 0.05
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(twin(x), model(x))
    loss = model(x).sum()  # autograd: the float weight, exactly
    loss.backward()
    assert model[0].weight.grad is not None


def test_inputs_off_cpu_or_not_in_float32_take_the_float_path(monkeypatch):
    from hsd_rag.kernels import int8_linear as int8_module

    model = _mlp()
    int8_linears(model)
    calls = []
    monkeypatch.setattr(int8_module.F, "linear", lambda *args: calls.append(args) or "float")
    assert model[0](torch.empty(2, 96, device="meta")) == "float"
    assert model[0](torch.randn(2, 96, dtype=torch.float64)) == "float"
    with stock_linears():  # a stock-kernel baseline runs the float weight too
        assert model[0](torch.randn(2, 96)) == "float"
    assert len(calls) == 3
    assert int8_linears(_mlp().to(torch.bfloat16)) == 0  # only fp32 layers are quantized


@pytest.fixture()
def fast_target():
    model = tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=64)
    use_fast_kernels(model)
    return model


def test_an_fp32_head_of_a_fast_cpu_target_drafts_in_int8_and_decoding_stays_lossless(tmp_path, fast_target,
                                                                                        monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_cpu_draft_dtype", lambda: None)  # a CPU without native bf16
    target_linears = packed_linear_count(fast_target)
    head = load_head(save_head(random_eagle3(fast_target), tmp_path / "head"), fast_target)
    head_linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert int8_linear_count(head) == len(head_linears) > 0 and packed_linear_count(head) == 0
    assert head.fc.weight.dtype == torch.float32
    assert packed_linear_count(fast_target) == target_linears and int8_linear_count(fast_target) == 0
    prompt = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7] * 3
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        reference = fast_target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                         do_sample=False, pad_token_id=1)[0, len(prompt):].tolist()
    decoder = HybridSpecDecoder(fast_target, IdTokenizer(), head=head)
    for method in ("eagle", "hybrid-fixed", "hybrid"):
        out = decoder.generate(prompt, documents=[" ".join(map(str, prompt))], method=method, max_new_tokens=40,
                               budget=8)
        assert list(out.token_ids) == reference, method
        if method != "hybrid":  # (adaptive fusion may rank this random head's drafts out of every tree)
            assert sum(n for label, n in out.stats.drafted_by_source.items() if "eagle" in label) > 0, method


def test_a_head_loaded_for_a_target_on_stock_kernels_is_not_quantized(tmp_path, fast_target, monkeypatch):
    folder = save_head(random_eagle3(fast_target), tmp_path / "head")
    stock = tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=64)
    monkeypatch.setattr(checkpoint_module, "_cpu_draft_dtype", lambda: None)
    assert int8_linear_count(load_head(folder, stock)) == 0  # fast_cpu_kernels=False: the head follows the target
    assert int8_linear_count(load_head(folder, fast_target)) > 0


def test_an_int8_head_tunes_under_its_own_profile_key(tmp_path, fast_target, monkeypatch):
    from hsd_rag.tuning import profile_key

    monkeypatch.setattr(checkpoint_module, "_cpu_draft_dtype", lambda: None)
    head = load_head(save_head(random_eagle3(fast_target), tmp_path / "head"), fast_target)
    decoder = HybridSpecDecoder(fast_target, IdTokenizer(), head=head)
    int8_key = profile_key(decoder)
    float_linears(head)
    assert profile_key(decoder) != int8_key  # drafting costs differ between an int8 and a float head
