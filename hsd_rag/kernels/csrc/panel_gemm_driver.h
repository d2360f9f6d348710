// The part of the panel GEMM every build shares (included by panel_gemm.cpp and panel_gemm_avx512.cpp): the panel
// layout, the row/k blocking around the kernel and the Python bindings.
//
// The including source defines, before this include, `kPanel` (16: output columns per panel), `kRowsInRegs` (rows
// its kernel holds in registers) and
//   template <int ROWS> void rows_times_panel(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1,
//                                            float* acc, bool zero);
// which adds x[0..ROWS)[k0..k1) @ panel[k0..k1) into acc[ROWS][16] (starting from zero when `zero`).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kRowsPerPass = 64; // rows kept in the on-stack accumulator buffer
constexpr int64_t kChunkK = 64;      // k-chunk (4 KB of panel) re-read from L1 by the next rows

// rows_times_panel<min(rows, N)> for a runtime row count
template <int N>
inline void rows_times_panel_n(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1,
                               float* acc, bool zero) {
  if constexpr (N == 1) {
    rows_times_panel<1>(x, ldx, w, k0, k1, acc, zero);
  } else {
    if (rows >= N) rows_times_panel<N>(x, ldx, w, k0, k1, acc, zero);
    else rows_times_panel_n<N - 1>(rows, x, ldx, w, k0, k1, acc, zero);
  }
}

}  // namespace

// weight [N, K] fp32 -> panels [ceil(N/16), K, 16], zero-padded past column N.
torch::Tensor pack_panels(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "pack_panels: a 2-D fp32 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t panels = (n + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && panels.scalar_type() == torch::kFloat32, "panel_linear: fp32");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.is_contiguous(), "panel_linear: panels");
  const int64_t k = panels.size(1);
  TORCH_CHECK(x.size(-1) == k, "panel_linear: x has ", x.size(-1), " features, the weight ", k);
  const auto xc = x.contiguous();
  const int64_t m_total = k == 0 ? 0 : xc.numel() / k;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  auto y = torch::empty(out_sizes, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous().to(torch::kFloat32);
    TORCH_CHECK(bias_c.numel() == n, "panel_linear: bias size");
    bp = bias_c.data_ptr<float>();
  }
  const int64_t n_panels = panels.size(0);
  at::parallel_for(0, n_panels, 4, [&](int64_t p0, int64_t p1) {
    alignas(64) float acc[kRowsPerPass * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const float* w = wp + p * k * kPanel;
      const int64_t col0 = p * kPanel, cols = std::min(kPanel, n - col0);
      for (int64_t m0 = 0; m0 < m_total; m0 += kRowsPerPass) {
        const int64_t rows = std::min(kRowsPerPass, m_total - m0);
        const float* xr = xp + m0 * k;
        if (rows <= kRowsInRegs) {
          rows_times_panel_n<kRowsInRegs>(rows, xr, k, w, 0, k, acc, true);
        } else {
          for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
            const int64_t k1 = std::min(k, k0 + kChunkK);
            for (int64_t r = 0; r < rows; r += kRowsInRegs)
              rows_times_panel_n<kRowsInRegs>(std::min<int64_t>(kRowsInRegs, rows - r), xr + r * k, k, w, k0, k1,
                                              acc + r * kPanel, k0 == 0);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* out = yp + (m0 + r) * n + col0;
          const float* a = acc + r * kPanel;
          if (bp) for (int64_t j = 0; j < cols; ++j) out[j] = a[j] + bp[col0 + j];
          else std::copy(a, a + cols, out);
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &pack_panels, "weight [N, K] -> panels [ceil(N/16), K, 16]");
  m.def("panel_linear", &panel_linear, "x @ weight^T (+ bias) from panels");
}
