"""The prompt attention kernel (hsd_rag/kernels/prefill_attention.py): SDPA's causal result up to float rounding
for the prompt lengths, cached rows, head groupings, head sizes and layouts it accepts, in both vector-width builds
this CPU can run, and the calls it must leave to SDPA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from hsd_rag.kernels import prefill_attention as kernel
from tests.kernel_builds import build_fixture

needs_kernel = pytest.mark.skipif(kernel.extension() is None,
                                  reason="the kernel needs an AVX2 / AVX-512 CPU and a compiler")
build = build_fixture(kernel)


def _reference(q, k, v, scale):
    n, length = q.shape[2], k.shape[2]
    causal = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("queries", [17, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("cached", [0, 5, 64])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_matches_causal_sdpa(build, heads, kv_heads, queries, cached, head_dim):
    torch.manual_seed(heads * 1000 + queries * 10 + cached + head_dim)
    length = cached + queries
    q = torch.randn(1, heads, queries, head_dim)
    k, v = torch.randn(1, kv_heads, length, head_dim) * 2, torch.randn(1, kv_heads, length, head_dim)
    scale = head_dim**-0.5
    out = build.prefill_attention(q, k, v, scale)
    assert out.shape == (1, queries, heads, head_dim) and out.is_contiguous()
    torch.testing.assert_close(out, _reference(q, k, v, scale), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_batches_transposed_queries_and_cache_views(build):
    """transformers passes queries as a transposed view of [b, n, h, d] and keys/values as views of a longer
    preallocated cache; a batch of two prompts is two independent causal attentions."""
    torch.manual_seed(4)
    q = torch.randn(2, 120, 6, 64).transpose(1, 2)  # [2, 6, 120, 64], not contiguous
    big_k, big_v = torch.randn(2, 2, 256, 64), torch.randn(2, 2, 256, 64)
    k, v = big_k[:, :, :150], big_v[:, :, :150]  # 30 cached rows + the 120 prompt rows
    assert not q.is_contiguous() and not k.is_contiguous()
    torch.testing.assert_close(build.prefill_attention(q, k, v, 0.125),
                               _reference(q.contiguous(), k.contiguous(), v.contiguous(), 0.125), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_large_scores_are_stable():
    """Scores far above exp's range (a max-subtracted softmax) give SDPA's result, not inf / nan."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 40, 64) * 30, torch.randn(1, 2, 40, 64) * 30, torch.randn(1, 2, 40, 64)
    out = kernel.prefill_attention(q, k, v, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k, v, 64**-0.5), atol=1e-5, rtol=1e-5)


def test_calls_it_does_not_cover_stay_on_sdpa(monkeypatch):
    q, k, v = torch.randn(1, 4, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    monkeypatch.setattr(kernel, "extension", lambda: object())  # decide on the call alone
    assert kernel.prefill_attention_applies(q, k, v)
    assert not kernel.prefill_attention_applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not kernel.prefill_attention_applies(torch.randn(1, 4, 40, 60), torch.randn(1, 2, 40, 60),
                                                torch.randn(1, 2, 40, 60))  # head size not a multiple of 8 / 16
    assert not kernel.prefill_attention_applies(torch.randn(1, 3, 40, 64), k, v)  # 3 heads over 2 KV heads
    assert not kernel.prefill_attention_applies(torch.randn(1, 4, 41, 64), k, v)  # more queries than keys
    monkeypatch.setattr(kernel, "_cpu_capability", lambda: "DEFAULT")
    assert not kernel.prefill_attention_applies(q, k, v)  # no build for a CPU without AVX2


def test_switch_turns_it_off():
    env = dict(os.environ, HSD_RAG_PREFILL_ATTENTION="0")
    code = "from hsd_rag.kernels.prefill_attention import extension; print(extension())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
