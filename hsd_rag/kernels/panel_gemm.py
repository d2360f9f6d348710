"""The skinny fp32 GEMM of csrc/panel_gemm.cpp: weights in 16-column panels, compiled once per machine.

Why: on a CPU without AVX-512 a decode step's few rows cost oneDNN's packed kernel ~30 % more per extra row, so a
draft tree paid for every token it verified. This kernel streams each weight once and reuses it from registers
for up to 6 rows; measured on a 2-core AVX2 EPYC (one thread, the 90 MLP matrices of SmolLM2-135M, 319 MB):
1 row 21-23 ms (oneDNN 27-29, stock 26), 4 rows 22-25 (38-42), 8 rows 24-28 (43-44), 16 rows 40 (57-60),
32 rows 62-69 (88), even 300 rows 577 (664). With AVX-512 oneDNN's own kernel is kept (not measured against).

It is built with torch's C++ extension loader (a C++ compiler and ninja) into torch's extensions directory
(`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) on first use, ~35 s once per source and torch
version (`scripts/setup.sh` does it up front). Where it cannot build (no compiler or ninja: logged once, with the
fix), with `HSD_RAG_PANEL_GEMM=0`, or on a CPU that is not AVX2-only, the packed layers keep oneDNN's kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "panel_gemm.cpp"
DISABLE_ENV = "HSD_RAG_PANEL_GEMM"


def _cpu_has_avx2_only() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _add_pip_ninja_to_path() -> None:
    """torch finds ninja on PATH; the `ninja` wheel puts it in the venv's bin, which a script need not have on
    PATH (e.g. `.venv/bin/python app.py` without activating)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@cache
def extension():
    """The compiled module (functions `pack_panels`, `panel_linear`), or None where it cannot apply or build."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not _cpu_has_avx2_only():
        return None
    from torch.utils import cpp_extension

    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    _add_pip_ninja_to_path()
    try:
        return cpp_extension.load(
            name=f"hsd_rag_panel_gemm_{tag}",  # a new source or torch gets its own build
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, ValueError) as exc:  # no compiler / ninja, or a failed build
        log.info(
            "The panel GEMM kernel could not be built (%s); packed layers use oneDNN's kernel instead. Install a C++ "
            "compiler (e.g. `apt install g++`) for faster decoding on this CPU.", str(exc).splitlines()[0][:200],
        )
        return None


def panel_gemm_applies(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` are packed into panels here (fp32, an AVX2 CPU without AVX-512, built)."""
    return dtype == torch.float32 and extension() is not None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    return extension().pack_panels(weight.detach().contiguous())


def panel_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return extension().panel_linear(x, panels, out_features, bias)

