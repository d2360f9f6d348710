"""The few-query attention kernel (hsd_rag/kernels/tree_attention.py): SDPA's result up to float rounding for
every mask kind, head grouping and cache layout it accepts, in both vector-width builds this CPU can run, and the
calls it must leave to SDPA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from hsd_rag.kernels import tree_attention as kernel
from hsd_rag.kernels.tree_attention import MAX_QUERIES, extension, tree_attention, tree_attention_applies
from tests.kernel_builds import build_fixture

needs_kernel = pytest.mark.skipif(extension() is None, reason="the kernel needs an AVX2 / AVX-512 CPU and a compiler")
build = build_fixture(kernel)


def _reference(q, k, v, mask, scale):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _tree_mask(n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] bool: every query sees the cached prefix, itself and a random set of earlier tree nodes."""
    generator = torch.Generator().manual_seed(seed)
    past = length - n
    allowed = torch.zeros(n, length, dtype=torch.bool)
    allowed[:, :past] = True
    for i in range(n):
        allowed[i, past + i] = True
        allowed[i, past : past + i] |= torch.rand(i, generator=generator) < 0.5
    return allowed


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("queries", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("cached", [0, 7, 8, 100, 513])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("mask_kind", ["float", "min", "bool"])
def test_matches_sdpa(build, heads, kv_heads, queries, cached, head_dim, mask_kind):
    torch.manual_seed(heads * 1000 + queries * 100 + cached + head_dim)
    length = cached + queries
    q = torch.randn(1, heads, queries, head_dim)
    k, v = torch.randn(1, kv_heads, length, head_dim), torch.randn(1, kv_heads, length, head_dim)
    allowed = _tree_mask(queries, length, seed=queries + cached)[None, None]
    if mask_kind == "bool":
        mask = allowed
    else:
        blocked = -torch.inf if mask_kind == "float" else torch.finfo(torch.float32).min
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, blocked)
    scale = head_dim**-0.5
    assert tree_attention_applies(q, k, v, mask, 0.0, {})
    torch.testing.assert_close(build.tree_attention(q, k, v, mask, scale), _reference(q, k, v, mask, scale),
                               atol=2e-6, rtol=1e-5)


@needs_kernel
def test_one_query_without_mask_per_head_masks_batches_and_cache_views():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 6, 1, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
    torch.testing.assert_close(tree_attention(q, k, v, None, 0.125), _reference(q, k, v, None, 0.125),
                               atol=2e-6, rtol=1e-5)
    per_head = torch.randn(2, 6, 1, 300)  # an additive bias per batch row and head
    torch.testing.assert_close(tree_attention(q, k, v, per_head, 0.125), _reference(q, k, v, per_head, 0.125),
                               atol=2e-6, rtol=1e-5)
    big_k, big_v = torch.randn(2, 2, 512, 64), torch.randn(2, 2, 512, 64)  # a preallocated cache, 300 rows used
    k_view, v_view = big_k[:, :, :300], big_v[:, :, :300]
    assert not k_view.is_contiguous()
    torch.testing.assert_close(tree_attention(q, k_view, v_view, None, None),
                               _reference(q, k_view.contiguous(), v_view.contiguous(), None, 64**-0.5),
                               atol=2e-6, rtol=1e-5)


def test_calls_it_does_not_cover_stay_on_sdpa():
    q, k, v = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    mask = torch.zeros(1, 1, 3, 10)
    assert not tree_attention_applies(q, k, v, None, 0.0, {})  # several queries, no mask: causal
    assert not tree_attention_applies(torch.randn(1, 4, MAX_QUERIES + 1, 64), k, v, mask, 0.0, {})  # a prompt
    assert not tree_attention_applies(q, k, v, mask, 0.1, {})  # dropout
    assert not tree_attention_applies(q, k, v, mask, 0.0, {"softcap": 30.0})
    assert not tree_attention_applies(q, k, v, mask, 0.0, {"s_aux": torch.zeros(4)})  # attention sinks
    assert not tree_attention_applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), 0.0, {})
    assert not tree_attention_applies(torch.randn(1, 4, 3, 60), torch.randn(1, 2, 10, 60),
                                      torch.randn(1, 2, 10, 60), mask, 0.0, {})  # not a multiple of 8 / 16
    assert not tree_attention_applies(q, k, v, mask.half(), 0.0, {})


def test_switch_turns_it_off():
    env = dict(os.environ, HSD_RAG_TREE_ATTENTION="0")
    code = "from hsd_rag.kernels.tree_attention import extension; print(extension())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
