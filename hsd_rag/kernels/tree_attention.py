"""Attention of a decode step's few query tokens over the CPU KV cache (csrc/tree_attention.cpp).

Why: torch's CPU flash-attention kernel is made for long query blocks; for the 1-16 queries of a decode step or a
draft tree it spends most of its time on setup (SmolLM2-135M, 500 cached tokens, one thread on a 2-core EPYC:
137 us per layer for one query, 287 us for eight, 12-18 % of the forward). This kernel scores a plain decode
step's few query rows one at a time (8 keys' dot products summed in one register) and a draft tree's rows that
share a KV head together (their queries transposed, each key element broadcast into a vector of rows, the softmax
run down the keys a vector of rows at a time), then multiplies into V with the output tile in registers. Results
differ from SDPA's only by float rounding (another order of the same sums).

`gqa_attention.py` sends it the forwards it covers (CPU, fp32, at most MAX_QUERIES queries, a float or bool mask,
head size a multiple of the vector width (8 floats with AVX2, 16 with AVX-512), no dropout / softcapping / sinks);
everything else keeps SDPA. Built like the other kernels (cpp_build.py), one build per vector width;
`HSD_RAG_TREE_ATTENTION=0` turns it off.
"""

from __future__ import annotations

from functools import cache

import torch

from hsd_rag.kernels import cpp_build
from hsd_rag.kernels.cpp_build import CSRC

MAX_QUERIES = 16  # a decode step or a draft tree; longer causal query blocks are prompts (prefill_attention.py)
DISABLE_ENV = "HSD_RAG_TREE_ATTENTION"


def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@cache
def extension():
    """The compiled module (function `tree_attention`), or None where it cannot apply or build."""
    return cpp_build.build_vectorized(
        "hsd_rag_tree_attention", CSRC / "tree_attention.cpp", _cpu_capability(), DISABLE_ENV,
        "The tree attention kernel", "attention uses torch's SDPA",
    )


def tree_attention_applies(query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether this attention call is one the kernel covers (see the module docstring)."""
    width = cpp_build.vector_width(_cpu_capability())
    n, d = query.shape[2], query.shape[3]
    if (
        width is None
        or n > MAX_QUERIES
        or dropout
        or d % width
        or query.device.type != "cpu"
        or not query.dtype == key.dtype == value.dtype == torch.float32
        or key.stride(-1) != 1
        or value.stride(-1) != 1
        or query.shape[1] % key.shape[1]
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("s_aux") is not None
        or kwargs.get("output_attentions", False)
    ):
        return False
    if attention_mask is None:
        if n != 1:  # several queries without a mask are causal: SDPA's `is_causal` path
            return False
    elif attention_mask.dim() != 4 or attention_mask.dtype not in (torch.float32, torch.bool):
        return False
    return extension() is not None


def tree_attention(query, key, value, attention_mask, scale: float | None) -> torch.Tensor:
    """query [b, h, n, d], key/value [b, kv_heads, L, d] -> [b, n, h, d] (transformers' attention output)."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]  # transformers' masks may cover a longer cache
    return extension().tree_attention(query, key, value, attention_mask, float(scale))
