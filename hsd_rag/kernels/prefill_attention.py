"""Causal attention of a prompt's queries on CPU (csrc/prefill_attention.cpp), fp32, one build per vector width.

Why: a RAG request spends about half its wall time in the prefill of a long prompt, and torch's CPU flash kernel
ran that prefill's attention at a quarter of the core's multiply-add peak (SmolLM2-135M, 430 tokens, one thread
on a 2-core AVX-512 EPYC: 120 ms of a 660 ms prefill, even in the query blocks of blocked_prefill.py). The kernel
keeps a block of query rows' scores in registers over the head dimension, softmaxes each row exactly and multiplies
into V with the output tile in registers. Results differ from SDPA's only by float rounding.

`gqa_attention.py` sends it the causal prompt forwards blocked_prefill.py would take (a fresh prompt, or the rest of
one after prefix-cached rows) when they are fp32 with a head size that is a multiple of the vector width; anything
else keeps SDPA. Built like the other kernels (cpp_build.py) for AVX2 or AVX-512; `HSD_RAG_PREFILL_ATTENTION=0`
turns it off.
"""

from __future__ import annotations

from functools import cache

import torch

from hsd_rag.kernels import cpp_build
from hsd_rag.kernels.cpp_build import CSRC

DISABLE_ENV = "HSD_RAG_PREFILL_ATTENTION"


def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@cache
def extension():
    """The compiled module (function `prefill_attention`), or None where it cannot apply or build."""
    return cpp_build.build_vectorized(
        "hsd_rag_prefill_attention", CSRC / "prefill_attention.cpp", _cpu_capability(), DISABLE_ENV,
        "The prefill attention kernel", "prompt attention uses torch's SDPA",
    )


def prefill_attention_applies(query, key, value) -> bool:
    """Whether the kernel takes this causal prompt forward (fp32 on CPU, head size a multiple of its width)."""
    width = cpp_build.vector_width(_cpu_capability())
    if (
        width is None
        or query.device.type != "cpu"
        or not query.dtype == key.dtype == value.dtype == torch.float32
        or query.shape[-1] % width
        or query.stride(-1) != 1
        or key.stride(-1) != 1
        or value.stride(-1) != 1
        or query.shape[1] % key.shape[1]
        or key.shape[2] < query.shape[2]
    ):
        return False
    return extension() is not None


def prefill_attention(query, key, value, scale: float | None) -> torch.Tensor:
    """query [b, h, n, d] at the last n of key/value [b, kv_heads, L, d] -> [b, n, h, d], causal."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return extension().prefill_attention(query, key, value, float(scale))
