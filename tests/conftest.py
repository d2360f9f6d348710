"""Shared fixtures: the real embedded default model is loaded once per session (slow tests only)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests run beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
