"""Faster CPU kernels for the target's own layers, swapped in without changing any model class.

`use_fast_kernels(model)` gives a CPU model's linear layers pre-packed weights (packed_linear.py: 16-column
panels for our skinny GEMM on AVX2 / AVX-512 CPUs, panel_gemm.py; oneDNN's layout elsewhere and for large
multiplies), multiplies sibling projections that read the same input as one matrix (fused_projections.py),
computes its RMSNorm layers in one pass (rms_norm.py) and lets its grouped-query attention broadcast KV heads
instead of copying them, a prompt's causal attention and a decode step's few queries running on our own kernels
(gqa_attention.py, prefill_attention.py, tree_attention.py; SDPA in blocks of query rows where the prompt kernel
does not build, blocked_prefill.py); `load_target` does this by default. `stock_kernels(model)` runs a block on
transformers' own kernels (e.g. a benchmark's HF baseline).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from hsd_rag.kernels.fused_projections import fuse_projections, fused_projection_count, unfuse_projections
from hsd_rag.kernels.gqa_attention import GQA_SDPA, use_gqa_attention, use_stock_attention
from hsd_rag.kernels.packed_linear import (
    PackedLinear,
    PackedWeight,
    pack_linears,
    packed_linear_count,
    stock_linears,
    unpack_linears,
)
from hsd_rag.kernels.panel_gemm import panel_gemm_applies
from hsd_rag.kernels.prefill_attention import extension as _prefill_attention_kernel
from hsd_rag.kernels.rms_norm import fuse_rms_norms, fused_rms_norm_count, unfuse_rms_norms
from hsd_rag.kernels.tree_attention import extension as _tree_attention_kernel


def _uses_panel_gemm(model) -> bool:
    return panel_gemm_applies(torch.float32) and any(
        type(m) is PackedLinear and m.weight.dtype == torch.float32 for m in model.modules()
    )


def use_fast_kernels(model) -> list[str]:
    """Switch a model to the fast CPU kernels that apply to it; returns their names (empty: none applied)."""
    names = []
    if pack_linears(model):
        names.append("packed-linear")
        if _uses_panel_gemm(model):
            names.append("panel-gemm")
        if fuse_projections(model):
            names.append("fused-projections")
    if fuse_rms_norms(model):
        names.append("fused-rms-norm")
    if use_gqa_attention(model):
        names.append("gqa-sdpa")
        if _prefill_attention_kernel() is not None:
            names.append("prefill-attention")
        if _tree_attention_kernel() is not None:
            names.append("tree-attention")
    return names


def fast_kernel_names(model) -> list[str]:
    """The fast kernels a model runs on now (part of a tuned cost profile's key)."""
    names = []
    if packed_linear_count(model):
        names.append("packed-linear")
        if _uses_panel_gemm(model):
            names.append("panel-gemm")
    if fused_projection_count(model):
        names.append("fused-projections")
    if fused_rms_norm_count(model):
        names.append("fused-rms-norm")
    if getattr(model.config, "_attn_implementation", None) == GQA_SDPA:
        names.append("gqa-sdpa")
        if _prefill_attention_kernel() is not None:
            names.append("prefill-attention")
        if _tree_attention_kernel() is not None:
            names.append("tree-attention")
    return names


@contextmanager
def stock_kernels(model):
    """Run a block on transformers' stock kernels (linear and attention), then switch back."""
    gqa = getattr(model.config, "_attn_implementation", None) == GQA_SDPA
    if gqa:
        use_stock_attention(model)
    try:
        with stock_linears():
            yield model
    finally:
        if gqa:
            use_gqa_attention(model)


__all__ = [
    "PackedLinear",
    "PackedWeight",
    "fast_kernel_names",
    "fuse_projections",
    "fuse_rms_norms",
    "fused_projection_count",
    "fused_rms_norm_count",
    "pack_linears",
    "packed_linear_count",
    "stock_kernels",
    "stock_linears",
    "unfuse_projections",
    "unfuse_rms_norms",
    "unpack_linears",
    "use_fast_kernels",
]
