"""The vector-width builds of a vec.h kernel (hsd_rag/kernels/cpp_build.VECTOR_BUILDS) that this CPU can run, as a
pytest fixture: the AVX2 build also runs on an AVX-512 CPU, so both are tested there."""

from __future__ import annotations

import pytest


def builds_here(kernel) -> list[str]:
    capability = kernel._cpu_capability()
    return ["AVX2", "AVX512"] if capability == "AVX512" else [capability]


def build_fixture(kernel):
    """A fixture giving the compiled module of each build in turn (the module's own cached choice left alone)."""

    @pytest.fixture(params=builds_here(kernel))
    def build(request, monkeypatch):
        monkeypatch.setattr(kernel, "_cpu_capability", lambda: request.param)
        ext = kernel.extension.__wrapped__()
        if ext is None:
            pytest.skip(f"no {request.param} build here (no such build, or no compiler)")
        return ext

    return build
