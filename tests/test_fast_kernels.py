"""hsd_rag.kernels: packed linear layers, fused sibling projections, copy-free GQA attention and the blocked causal
prefill are drop-ins, and decoding stays lossless.

Lossless here means: the decoder's greedy output equals `model.generate` on the same model object (both run on
the packed kernels), and the packed kernel differs from the stock one only by float rounding.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from hsd_rag import HybridSpecDecoder
from hsd_rag.kernels import (
    PackedLinear,
    fast_kernel_names,
    fuse_projections,
    fused_projection_count,
    pack_linears,
    packed_linear_count,
    stock_linears,
    unfuse_projections,
    unpack_linears,
    use_fast_kernels,
)
from hsd_rag.kernels import packed_linear as packed_module
from hsd_rag.kernels.int8_linear import int8_linear_count
from hsd_rag.kernels.panel_gemm import panel_gemm_applies
from hsd_rag.kernels.prefill_attention import extension as prefill_attention_kernel
from hsd_rag.kernels.tree_attention import extension as tree_attention_kernel
from tests.tiny_models import IdTokenizer, tiny_model

# The names an fp32 model's packed linears report: the panel GEMM joins them where it applies (AVX2 / AVX-512).
PACKED = ["packed-linear", *(["panel-gemm"] if panel_gemm_applies(torch.float32) else [])]
# ... and its grouped-query attention: our few-query kernel joins it where it builds
ATTENTION = [
    "gqa-sdpa",
    *(["prefill-attention"] if prefill_attention_kernel() is not None else []),
    *(["tree-attention"] if tree_attention_kernel() is not None else []),
]

pytestmark = pytest.mark.skipif(not packed_module.onednn_linear_available(), reason="torch built without oneDNN")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.SiLU(), nn.Linear(48, 8, bias=False)).eval()


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_output_matches_stock_up_to_rounding(rows, dtype):
    model = _mlp().to(dtype)
    x = torch.randn(2, rows, 24, dtype=dtype)
    if not packed_module.packable(dtype):  # bf16 on a CPU without native bf16: left on the stock kernels
        with torch.inference_mode():
            reference = model(x)
            assert pack_linears(model) == 0 and torch.equal(model(x), reference)
        return
    with torch.inference_mode():
        reference = model(x)
        assert pack_linears(model) == 2
        out = model(x)
        with stock_linears():
            stock = model(x)
    assert all(type(m) is PackedLinear for m in (model[0], model[2]))
    assert torch.equal(stock, reference)  # the context really runs the stock kernel
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)
    assert not torch.equal(out.float(), torch.zeros_like(out.float()))


def test_swap_is_in_place_and_reversible():
    model = _mlp()
    weight = model[0].weight
    keys = list(model.state_dict())
    pack_linears(model)
    assert model[0].weight is weight and list(model.state_dict()) == keys
    assert packed_linear_count(model) == 2
    assert unpack_linears(model) == 2
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "_packed")
    assert packed_linear_count(model) == 0


def test_a_weight_edited_or_replaced_after_packing_is_repacked():
    model = _mlp()
    x = torch.randn(5, 24)
    pack_linears(model)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: the packed copy is stale
    with torch.inference_mode():
        edited = model(x)
        with stock_linears():
            torch.testing.assert_close(edited, model(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, edited)
    model[2].weight = nn.Parameter(torch.zeros(8, 48))  # replaced
    with torch.inference_mode():
        assert torch.equal(model(x), torch.zeros(5, 8))


def test_a_model_built_under_inference_mode_packs_and_runs():
    """Inference tensors keep no version counter: packing must not ask for one."""
    x = torch.randn(4, 24)
    with torch.inference_mode():
        model = _mlp()
        reference = model(x)
        pack_linears(model)
        assert packed_linear_count(model) == 2
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_copies_and_pickles_drop_the_packed_copy_and_still_work():
    model = _mlp()
    pack_linears(model)
    x = torch.randn(4, 24)
    with torch.inference_mode():
        reference = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone[0]) is PackedLinear
        with torch.inference_mode():
            assert torch.equal(clone(x), reference)


def test_training_falls_back_to_the_stock_kernel_with_gradients():
    model = _mlp()
    pack_linears(model)
    model(torch.randn(3, 24)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_nothing_is_packed_when_memory_is_short(monkeypatch, caplog):
    model = _mlp()
    monkeypatch.setattr(packed_module, "_available_memory", lambda: 1024)
    with caplog.at_level("INFO", logger=packed_module.__name__):
        assert pack_linears(model) == 0
    assert packed_linear_count(model) == 0 and "Not packing" in caplog.text
    assert pack_linears(model, max_memory_share=None) == 2


def test_other_dtypes_and_subclasses_are_left_alone():
    class CustomLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4).half(), CustomLinear(4, 4))
    assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear and type(model[1]) is CustomLinear


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["ngram", "vanilla"])
def test_decoder_on_fast_kernels_equals_generate_on_the_same_model(arch, method):
    model = tiny_model(arch)
    tokenizer = IdTokenizer()
    prompt = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7] * 3
    with torch.inference_mode():
        stock_logits = model(torch.tensor([prompt])).logits
    use_fast_kernels(model)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, stock_logits, atol=1e-4, rtol=1e-4)
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                   pad_token_id=1)[0, len(prompt):].tolist()
    decoder = HybridSpecDecoder(model, tokenizer)
    out = decoder.generate(prompt, documents=[" ".join(map(str, prompt))], method=method, max_new_tokens=40)
    assert list(out.token_ids) == reference
    assert packed_linear_count(model) == len([m for m in model.modules() if isinstance(m, nn.Linear)])
    assert fast_kernel_names(model) == [*PACKED, "fused-projections", "fused-rms-norm", *ATTENTION]


def test_non_cpu_inputs_take_the_stock_path(monkeypatch):
    """Inputs on another device (here: meta) never reach the oneDNN op, which handles CPU tensors only."""
    model = _mlp()
    pack_linears(model)
    calls = []
    monkeypatch.setattr(packed_module.F, "linear", lambda *args: calls.append(args) or "stock")
    assert model[0](torch.empty(2, 24, device="meta")) == "stock" and calls


def test_the_default_model_and_its_head_run_packed_and_tune_separately(default_decoder):
    from hsd_rag.tuning import profile_key

    model, head = default_decoder.model, default_decoder.head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert packed_linear_count(model) == len(linears) > 100
    # the head runs on fast kernels too: packed bf16 where the CPU has native bf16, else int8 (test_int8_head.py)
    assert head is not None and packed_linear_count(head) + int8_linear_count(head) > 0
    assert fast_kernel_names(model) == [*PACKED, "fused-projections", "fused-rms-norm", *ATTENTION]
    packed_key = profile_key(default_decoder)
    unpack_linears(model)
    try:
        assert profile_key(default_decoder) != packed_key  # a tuned profile belongs to one set of kernels
    finally:
        use_fast_kernels(model)
    assert profile_key(default_decoder) == packed_key
    assert fused_projection_count(model) == 2 * model.config.num_hidden_layers
    assert fused_projection_count(head) == (2 if packed_linear_count(head) else 0)


def test_load_target_can_keep_the_stock_kernels(tmp_path):
    from hsd_rag.loading import load_target
    from tests.test_streaming_text import byte_fallback_tokenizer

    tiny_model("llama", layers=1, hidden=32).save_pretrained(tmp_path)
    byte_fallback_tokenizer().save_pretrained(tmp_path)
    fast = load_target(tmp_path, device="cpu")[0]
    assert fast_kernel_names(fast) == [*PACKED, "fused-projections", "fused-rms-norm", *ATTENTION]
    assert packed_linear_count(fast) > 0
    stock = load_target(tmp_path, device="cpu", fast_cpu_kernels=False)[0]
    assert fast_kernel_names(stock) == [] and stock.config._attn_implementation == "sdpa"
    eager = load_target(tmp_path, device="cpu", attn_implementation="eager")[0]
    # a chosen attention implementation is kept
    assert fast_kernel_names(eager) == [*PACKED, "fused-projections", "fused-rms-norm"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gqa_attention_gives_the_same_tree_logits_bit_for_bit(arch, monkeypatch):
    """Broadcasting KV heads in the kernel instead of copying them changes no number (tree forward, mask on); our
    prompt and few-query kernels (prefill_attention.py, tree_attention.py) only round differently."""
    from hsd_rag.attention_layout import AttentionLayout
    from hsd_rag.kernels import gqa_attention, stock_kernels, use_fast_kernels
    from hsd_rag.tree import TokenTree
    from hsd_rag.verify import forward_tree, prefill

    model = tiny_model(arch)
    layout = AttentionLayout.of(model)
    prompt = list(range(2, 60))
    tree = TokenTree.root(5)
    for token, parent in [(6, 0), (7, 1), (8, 0), (9, 2), (10, 3), (11, 1)]:
        tree.add(parent, token, 0.5, 1)

    def logits():
        cache = layout.new_cache()
        with torch.inference_mode():
            prefill(model, cache, prompt)
            return forward_tree(model, cache, tree, len(prompt), layout=layout)

    reference = logits()
    assert "gqa-sdpa" in use_fast_kernels(model)
    with stock_kernels(model):
        assert model.config._attn_implementation == "sdpa" and torch.equal(logits(), reference)
    assert model.config._attn_implementation == "hsd_rag_gqa_sdpa"
    with stock_linears():
        torch.testing.assert_close(logits(), reference, atol=1e-5, rtol=1e-5)  # the tree kernel, where it builds
        monkeypatch.setattr(gqa_attention, "tree_attention_applies", lambda *args: False)
        monkeypatch.setattr(gqa_attention, "prefill_attention_applies", lambda *args: False)
        assert torch.equal(logits(), reference)  # SDPA with broadcast KV heads: bit for bit


def _tree_logits(model, prompt, tree):
    from hsd_rag.attention_layout import AttentionLayout
    from hsd_rag.verify import forward_tree, prefill

    layout = AttentionLayout.of(model)
    cache = layout.new_cache()
    with torch.inference_mode():
        prefill(model, cache, prompt)
        return forward_tree(model, cache, tree, len(prompt), layout=layout)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_projections_give_the_same_logits_bit_for_bit(arch):
    """One [q; k; v] and one [gate; up] matrix per layer: the same numbers as the separate packed layers."""
    from hsd_rag.tree import TokenTree

    model = tiny_model(arch)
    tree = TokenTree.root(5)
    for token, parent in [(6, 0), (7, 1), (8, 0), (9, 2)]:
        tree.add(parent, token, 0.5, 1)
    prompt = list(range(2, 40))
    pack_linears(model)
    separate = _tree_logits(model, prompt, tree)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert fast_kernel_names(model) == [*PACKED, "fused-projections"]
    assert torch.equal(_tree_logits(model, prompt, tree), separate)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj._projection is layer.self_attn.v_proj._projection is not None
    assert all(m._projection._stash is None for m in model.modules() if getattr(m, "_projection", None))
    assert fuse_projections(model) == 0  # already fused
    assert unfuse_projections(model) == 2 * model.config.num_hidden_layers
    assert torch.equal(_tree_logits(model, prompt, tree), separate)
    assert fused_projection_count(model) == 0


class _Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_proj, self.up_proj = nn.Linear(16, 12), nn.Linear(16, 20)


def test_a_fused_member_called_on_another_input_or_after_an_edit_gets_its_own_output():
    model = _Siblings()
    reference = _Siblings()
    pack_linears(model)
    assert fuse_projections(model) == 1
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.inference_mode():
        gate_x = model.gate_proj(x)  # the group keeps up_proj(x) for the next call with x
        torch.testing.assert_close(model.up_proj(y), reference.up_proj(y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate_x, reference.gate_proj(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.up_proj.weight.mul_(-1.0)
        model.gate_proj.bias = nn.Parameter(torch.zeros(12))
    with torch.inference_mode():
        model.gate_proj(x)
        torch.testing.assert_close(model.up_proj(x), -(x @ reference.up_proj.weight.T) + reference.up_proj.bias,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.gate_proj(y), y @ reference.gate_proj.weight.T, atol=1e-5, rtol=1e-5)


def test_fused_models_copy_pickle_train_and_unpack():
    model = _Siblings()
    pack_linears(model)
    fuse_projections(model)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        reference = model.up_proj(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fused_projection_count(clone) == 0  # the copy runs on its own packed weights
        with torch.inference_mode():
            assert torch.equal(clone.up_proj(x), reference)
    (model.gate_proj(x).sum() + model.up_proj(x).sum()).backward()  # gradients take the stock path
    assert model.up_proj.weight.grad is not None
    assert unpack_linears(model) == 2 and fused_projection_count(model) == 0
    assert type(model.up_proj) is nn.Linear and "_projection" not in vars(model.up_proj)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_blocked_causal_prefill_equals_one_causal_call(length, heads):
    from torch.nn import functional as F

    from hsd_rag.kernels.blocked_prefill import blocked_causal_attention

    torch.manual_seed(length)
    q_heads, kv_heads = heads
    query = torch.randn(1, q_heads, length, 16)
    key, value = torch.randn(2, 1, kv_heads, length, 16)
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True, scale=0.3)
    out = blocked_causal_attention(query, key, value, 0.3)
    assert out.shape == (1, length, q_heads, 16) and out.is_contiguous()
    torch.testing.assert_close(out, reference.transpose(1, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["prefill_attention", "blocked_causal_attention"])
def test_a_long_prompt_prefills_on_the_prompt_path_and_decoding_stays_lossless(monkeypatch, path):
    """A long prompt takes the prompt kernel where it builds, else SDPA in query blocks (each path counted), the
    logits match stock attention up to rounding, and the decoder's greedy output equals `generate`."""
    from hsd_rag.kernels import gqa_attention, prefill_attention

    if path == "prefill_attention" and prefill_attention.extension() is None:
        pytest.skip("the prompt kernel needs an AVX2 / AVX-512 CPU and a compiler")
    if path == "blocked_causal_attention":
        monkeypatch.setattr(gqa_attention, "prefill_attention_applies", lambda *a: False)
    model = tiny_model("llama")
    prompt = [int(t) for t in torch.randint(2, 90, (150,), generator=torch.Generator().manual_seed(1))]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        stock = model(ids).logits
    use_fast_kernels(model)
    calls = []
    original = getattr(gqa_attention, path)
    monkeypatch.setattr(gqa_attention, path, lambda *a: calls.append(1) or original(*a))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-4, rtol=1e-4)
        assert len(calls) == model.config.num_hidden_layers
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                   pad_token_id=1)[0, len(prompt):].tolist()
    decoder = HybridSpecDecoder(model, IdTokenizer(), prefix_cache=True)
    out = decoder.generate(prompt, documents=[" ".join(map(str, prompt[:60]))], method="ngram", max_new_tokens=30)
    assert list(out.token_ids) == reference
    # a second prompt sharing the first 100 tokens: the rest prefills after the cached rows, under a causal mask
    second = prompt[:100] + [int(t) for t in torch.randint(2, 90, (90,), generator=torch.Generator().manual_seed(2))]
    ids = torch.tensor([second])
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                   pad_token_id=1)[0, len(second):].tolist()
    calls.clear()
    out = decoder.generate(second, method="ngram", max_new_tokens=30)
    assert out.stats.cached_prompt_tokens == 100 and len(calls) == model.config.num_hidden_layers
    assert list(out.token_ids) == reference


def test_a_prompt_continued_after_cached_rows_prefills_in_blocks_only_under_a_causal_mask():
    """The rest of a prompt after rows an earlier request left gets transformers' boolean causal mask; the
    blocked path takes exactly that mask (offset by the cached rows) and nothing else."""
    from torch.nn import functional as F

    from hsd_rag.kernels.blocked_prefill import _causal_rows, blocked_causal_attention, is_offset_causal_mask

    torch.manual_seed(0)
    past, length = 40, 150
    query = torch.randn(1, 4, length, 16)
    key, value = torch.randn(2, 1, 2, past + length, 16)
    mask = _causal_rows(past, past + length, torch.device("cpu"))[None, None]
    assert is_offset_causal_mask(mask, length, past + length)
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(blocked_causal_attention(query, key, value, None), reference.transpose(1, 2),
                               atol=1e-6, rtol=1e-5)
    padded = mask.clone()
    padded[..., 0] = False  # a padding column: not a plain causal mask
    assert not is_offset_causal_mask(padded, length, past + length)
    assert not is_offset_causal_mask(mask.float(), length, past + length)
    assert not is_offset_causal_mask(mask, length, past + length + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_one_pass_rms_norm_gives_the_same_logits_bit_for_bit_and_copies(arch):
    from hsd_rag.kernels import fuse_rms_norms, fused_rms_norm_count, unfuse_rms_norms
    from hsd_rag.kernels.rms_norm import FusedRMSNormForward
    from hsd_rag.tree import TokenTree

    model = tiny_model(arch)
    tree = TokenTree.root(5)
    for token, parent in [(6, 0), (7, 1), (8, 0)]:
        tree.add(parent, token, 0.5, 1)
    prompt = list(range(2, 40))
    stock = _tree_logits(model, prompt, tree)
    norms = 2 * model.config.num_hidden_layers + 1
    assert fuse_rms_norms(model) == norms == fused_rms_norm_count(model)
    assert isinstance(model.model.norm, FusedRMSNormForward)
    assert torch.equal(_tree_logits(model, prompt, tree), stock)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fused_rms_norm_count(clone) == norms and torch.equal(_tree_logits(clone, prompt, tree), stock)
    with stock_linears():  # the stock path really runs transformers' forward
        calls = []
        handle = torch.nn.functional.rms_norm
        try:
            torch.nn.functional.rms_norm = lambda *a, **k: calls.append(1) or handle(*a, **k)
            _tree_logits(model, prompt, tree)
        finally:
            torch.nn.functional.rms_norm = handle
        assert not calls
    assert fuse_rms_norms(model) == 0 and unfuse_rms_norms(model) == norms
    assert type(model.model.norm).__name__.endswith("RMSNorm") and fused_rms_norm_count(model) == 0
    model.half()  # another dtype: nothing to swap
    assert fuse_rms_norms(model) == 0
