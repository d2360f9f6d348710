"""Shared fixtures: the real embedded default model is loaded once per session (slow tests only)."""

from __future__ import annotations

import os

import pytest
import torch

# One thread by default: the tests' models are small (an OpenMP barrier per op costs more than a second core
# gives), and beside other work two threads per process oversubscribe the cores badly. HSD_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("HSD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def default_decoder():
    from hsd_rag import HybridSpecDecoder

    return HybridSpecDecoder.from_pretrained()


@pytest.fixture(scope="session")
def rag_examples():
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import load_builtin, split

    _, heldout = split(load_builtin("en"), HELDOUT_FRACTION)
    return heldout
