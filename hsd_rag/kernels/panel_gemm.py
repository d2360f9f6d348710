"""The skinny fp32 GEMM of csrc/panel_gemm.cpp (AVX2) and csrc/panel_gemm_avx512.cpp: weights in 16-column
panels, compiled once per machine.

Why: on a CPU without AVX-512 a decode step's few rows cost oneDNN's packed kernel ~30 % more per extra row, so a
draft tree paid for every token it verified. This kernel streams each weight once and reuses it from registers
for up to 6 rows; measured on a 2-core AVX2 EPYC (one thread, the 90 MLP matrices of SmolLM2-135M, 319 MB):
1 row 21-23 ms (oneDNN 27-29, stock 26), 4 rows 22-25 (38-42), 8 rows 24-28 (43-44), 16 rows 40 (57-60),
32 rows 62-69 (88), even 300 rows 577 (664). With AVX-512 its own build holds 16 rows in registers
and takes only multiplies of up to 16 rows (`BUILDS`, `panel_rows_limit`); the packed layers keep a oneDNN copy for
the rest (a 500-token prefill: 0.8-0.9 s on oneDNN, 1.3-1.4 s on panels).

It is built with torch's C++ extension loader (a C++ compiler and ninja) into torch's extensions directory
(`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) on first use, ~35 s once per source and torch
version (`scripts/setup.sh` does it up front). Where it cannot build (no compiler or ninja: logged once, with the
fix), with `HSD_RAG_PANEL_GEMM=0`, or on a CPU without AVX2, the packed layers keep oneDNN's kernel.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from hsd_rag.kernels import cpp_build
from hsd_rag.kernels.cpp_build import CSRC

# Per CPU capability (torch's dispatch level): the source, the instruction sets it is compiled for, and the most
# rows of a multiply it takes (None = any number; more go to the oneDNN copy the packed layers then keep).
BUILDS = {
    "AVX2": (CSRC / "panel_gemm.cpp", ["-mavx2", "-mfma"], None),
    "AVX512": (CSRC / "panel_gemm_avx512.cpp", ["-mavx512f", "-mavx2", "-mfma"], 16),
}
DISABLE_ENV = "HSD_RAG_PANEL_GEMM"


def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@cache
def extension():
    """The compiled module (functions `pack_panels`, `panel_linear`), or None where it cannot apply or build."""
    build = BUILDS.get(_cpu_capability())
    if os.environ.get(DISABLE_ENV, "1") == "0" or build is None:
        return None
    source, flags, _ = build
    return cpp_build.build("hsd_rag_panel_gemm", source, flags, "The panel GEMM kernel",
                           "packed layers use oneDNN's kernel")


def panel_gemm_applies(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` are packed into panels here (fp32, an AVX2 or AVX-512 CPU, built)."""
    return dtype == torch.float32 and extension() is not None


@cache
def panel_rows_limit() -> int | None:
    """Most rows of a multiply the kernel takes on this CPU (more go to oneDNN); None: any number."""
    build = BUILDS.get(_cpu_capability())
    return None if build is None else build[2]


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    return extension().pack_panels(weight.detach().contiguous())


def panel_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return extension().panel_linear(x, panels, out_features, bias)

