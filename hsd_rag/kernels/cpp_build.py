"""Compile one of our C++ kernels (hsd_rag/kernels/csrc) once per machine with torch's C++ extension loader.

Why one place: every kernel needs the same things — a build named after its source, the headers beside it and
the torch version (a new source or torch gets its own build in torch's extensions directory,
`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), ninja found even in a venv that is not activated,
and a failed build (no compiler) that leaves the stock path in place with one log line saying how to get the fast
one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# The attention kernels are written once with vector extensions (csrc/vec.h) and built per CPU capability (torch's
# dispatch level): its flags and floats per vector.
VECTOR_BUILDS = {
    "AVX2": (["-mavx2", "-mfma", "-DHSD_VEC_BYTES=32"], 8),
    "AVX512": (["-mavx512f", "-mavx2", "-mfma", "-DHSD_VEC_BYTES=64"], 16),
}


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


def build(name: str, source: Path, flags: list[str], what: str, fallback: str):
    """The compiled module of `source`, or None (logged: `what` could not be built, `fallback` is used instead)."""
    from torch.utils import cpp_extension

    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    tag = hashlib.sha256(source.read_bytes() + headers + torch.__version__.encode()).hexdigest()[:12]
    _add_pip_ninja_to_path()
    try:
        return cpp_extension.load(name=f"{name}_{tag}", sources=[str(source)], extra_cflags=["-O3", *flags],
                                  verbose=False)
    except (RuntimeError, OSError, ImportError, ValueError) as exc:  # no compiler / ninja, or a failed build
        log.info(
            "%s could not be built (%s); %s instead. Install a C++ compiler (e.g. `apt install g++`) for faster "
            "decoding on this CPU.", what, str(exc).splitlines()[0][:200], fallback,
        )
        return None


def build_vectorized(name: str, source: Path, capability: str, disable_env: str, what: str, fallback: str):
    """`build` of a vec.h kernel for `capability` (torch's CPU dispatch level), a * b + c compiled as one FMA;
    None where the capability has no build (no AVX2) or `disable_env` is set to 0."""
    if os.environ.get(disable_env, "1") == "0" or capability not in VECTOR_BUILDS:
        return None
    flags, _ = VECTOR_BUILDS[capability]
    return build(f"{name}_{capability.lower()}", source, [*flags, "-ffp-contract=fast"], what, fallback)


def vector_width(capability: str) -> int | None:
    """Floats per vector of the vec.h build for `capability`; None: no build."""
    build_spec = VECTOR_BUILDS.get(capability)
    return None if build_spec is None else build_spec[1]
