"""The skinny fp32 GEMM (hsd_rag/kernels/panel_gemm.py): same products as `F.linear` up to rounding, row results
independent of the batch, used by packed layers where it applies, and a clean fallback where it cannot build."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hsd_rag.kernels import pack_linears
from hsd_rag.kernels import panel_gemm as panel_module
from hsd_rag.kernels.packed_linear import PackedWeight
from hsd_rag.kernels.panel_gemm import pack_panels, panel_gemm_applies, panel_linear

needs_kernel = pytest.mark.skipif(
    not panel_gemm_applies(torch.float32), reason="the panel GEMM needs an AVX2 / AVX-512 CPU and a compiler"
)


@needs_kernel
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 100, 577])
@pytest.mark.parametrize("in_features", [1, 7, 64, 300])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64, 65, 130])
def test_matches_f_linear(out_features, in_features, rows):
    torch.manual_seed(out_features * 1000 + in_features * 10 + rows)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    panels = pack_panels(weight)
    x = torch.randn(rows, in_features)
    close = {"atol": 2e-4, "rtol": 1e-4}  # sums of up to 300 products of N(0, 1): float rounding is ~1e-5
    torch.testing.assert_close(panel_linear(x, panels, out_features, None), F.linear(x, weight), **close)
    torch.testing.assert_close(panel_linear(x, panels, out_features, bias), F.linear(x, weight, bias), **close)


@needs_kernel
def test_batched_and_strided_inputs_keep_their_shape():
    weight = torch.randn(40, 24)
    panels = pack_panels(weight)
    x = torch.randn(3, 5, 24)
    assert panel_linear(x, panels, 40, None).shape == (3, 5, 40)
    torch.testing.assert_close(panel_linear(x, panels, 40, None), F.linear(x, weight))
    strided = torch.randn(24, 9).t()  # last dim not contiguous
    torch.testing.assert_close(panel_linear(strided, panels, 40, None), F.linear(strided, weight))


@needs_kernel
def test_a_row_gets_the_same_bits_in_any_batch():
    """Why tree verification can trust it: a row's products do not depend on the rows computed beside it."""
    torch.manual_seed(0)
    weight = torch.randn(200, 576)
    panels = pack_panels(weight)
    x = torch.randn(70, 576)
    together = panel_linear(x, panels, 200, None)
    for start, stop in [(0, 1), (3, 4), (0, 6), (5, 12), (20, 70), (69, 70)]:
        assert torch.equal(panel_linear(x[start:stop], panels, 200, None), together[start:stop])


@needs_kernel
def test_packed_layers_use_panels_and_stay_close_to_stock():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8, bias=False))
    x = torch.randn(4, 24)
    with torch.no_grad():
        stock = model(x)
        pack_linears(model)
        assert all(m._packed.panels for m in (model[0], model[2]))
        torch.testing.assert_close(model(x), stock)
        model[0].weight.mul_(2)  # an in-place edit re-packs
        torch.testing.assert_close(model(x), F.linear(F.relu(F.linear(x, model[0].weight, model[0].bias)),
                                                      model[2].weight))


@needs_kernel
def test_with_a_row_limit_larger_multiplies_take_the_onednn_copy(monkeypatch):
    """AVX-512: the panels serve up to `panel_rows_limit()` rows, a oneDNN copy the rest (prompts, big trees)."""
    monkeypatch.setattr("hsd_rag.kernels.packed_linear.panel_rows_limit", lambda: 3)
    calls = []
    real = panel_module.panel_linear

    def counted(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr("hsd_rag.kernels.packed_linear.panel_linear", counted)
    torch.manual_seed(2)
    weight, bias = torch.randn(40, 24), torch.randn(40)
    packed = PackedWeight(weight)
    assert packed.panels and packed.onednn is not None
    for rows in (1, 3, 4, 50):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(packed.multiply(x, bias), F.linear(x, weight, bias), atol=2e-5, rtol=1e-5)
    assert calls == [1, 3]


def test_the_onednn_copy_counts_in_the_memory_check(monkeypatch):
    from hsd_rag.kernels import packed_linear

    monkeypatch.setattr(packed_linear, "panel_gemm_applies", lambda dtype: True)
    monkeypatch.setattr(packed_linear, "panel_rows_limit", lambda: 12)
    assert packed_linear.packed_copies(torch.float32) == 2
    monkeypatch.setattr(packed_linear, "panel_rows_limit", lambda: None)
    assert packed_linear.packed_copies(torch.float32) == 1


def test_other_dtypes_and_disabled_kernel_keep_onednn(monkeypatch):
    assert not panel_gemm_applies(torch.bfloat16)
    monkeypatch.setattr("hsd_rag.kernels.packed_linear.panel_gemm_applies", lambda dtype: False)
    weight = torch.randn(16, 8)
    packed = PackedWeight(weight)
    assert not packed.panels
    x = torch.randn(3, 8)
    torch.testing.assert_close(packed.multiply(x, None), F.linear(x, weight))


def test_switch_turns_it_off():
    env = dict(os.environ, HSD_RAG_PANEL_GEMM="0")
    code = "import torch; from hsd_rag.kernels.panel_gemm import panel_gemm_applies as a; print(a(torch.float32))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_failed_build_falls_back_with_a_message(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(panel_module, "_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    panel_module.extension.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="hsd_rag.kernels.cpp_build"):
            assert panel_module.extension() is None
        assert "could not be built" in caplog.text and "command not found" in caplog.text
    finally:
        panel_module.extension.cache_clear()  # later tests see the real kernel again
