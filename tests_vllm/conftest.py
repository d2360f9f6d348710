"""tests_vllm/ runs in .venv-vllm (`make vllm-test`): vLLM's CPU build with this package installed --no-deps.

The proposer's unit tests need only hsd_rag; the end-to-end test needs vLLM and the de-quantised default model,
which the project's own suite creates (`make test` runs first in CI).
"""

from __future__ import annotations

import os

import pytest

# vLLM binds its OpenMP threads to cores by default; on a shared CI box leave placement to the OS.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@pytest.fixture(scope="session")
def model_dir() -> str:
    from hsd_rag.engines.vllm.model_dir import vllm_model_dir
    from hsd_rag.loading import DEFAULT_MODEL_NAME, cache_dir

    snapshot = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (snapshot / "model.safetensors").exists():
        pytest.fail(f"The de-quantised default model is missing at {snapshot}: run `make test` first (its "
                    "slow tests create it), or `python -m hsd_rag.cli qa examples/docs 'hi'` in the project venv.")
    return vllm_model_dir(None)
