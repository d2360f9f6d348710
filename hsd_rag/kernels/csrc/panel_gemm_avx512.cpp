// The AVX-512 build of panel_gemm.cpp: the same panels [ceil(N/16)][K][16], each k's 16 weights one zmm register.
//
// Why a second build: on an AVX-512 CPU with full-width FMA units (a 2-core EPYC, Zen 5 class) the AVX2 kernel
// uses half of each FMA and its 12 ymm accumulators hold only 6 rows. Here one zmm accumulator per row lets up to
// 16 rows stay in registers (16 + 1 weight + 1 broadcast of 32 zmm), so a draft tree of up to 16 tokens streams
// each weight line once. Measured there (one thread, the 90 MLP matrices of SmolLM2-135M, 318 MB), AVX-512 vs
// AVX2 build: 1-4 rows 10.4-10.8 ms both (memory-bound), 8 rows 11.7 vs 16.1, 16 rows 17.8 vs 24.7, 32 rows 37.9
// vs 55.2. More rows than 16 re-read 4 KB k-chunks of the panel from L1, as in the AVX2 build.
//
// Each output element is the same fused multiply-add chain over k = 0..K-1 whatever M is and wherever the row
// sits in x, so a row's result does not depend on the batch it is computed in (tree verification gives the
// logits a one-token step would).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kPanel = 16;       // output columns per panel: one 64-byte line per k
constexpr int64_t kRowsInRegs = 16;  // rows of x whose accumulators (one zmm each) stay in registers
constexpr int64_t kRowsPerPass = 64; // rows kept in the on-stack accumulator buffer
constexpr int64_t kChunkK = 64;      // k-chunk (4 KB of panel) re-read from L1 by the next 16 rows
constexpr int64_t kPrefetch = 1024;  // floats ahead (4 KB) in the weight stream

template <int ROWS>
inline void rows_times_panel(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t k0,
                             int64_t k1, float* __restrict acc, bool zero) {
  __m512 a[ROWS];
  for (int m = 0; m < ROWS; ++m) a[m] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * kPanel);
  for (int64_t k = k0; k < k1; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kPanel + kPrefetch), _MM_HINT_T0);
    const __m512 wv = _mm512_loadu_ps(w + k * kPanel);
    for (int m = 0; m < ROWS; ++m) a[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), wv, a[m]);
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(acc + m * kPanel, a[m]);
}

void rows_times_panel(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* acc,
                      bool zero) {
  switch (rows) {
    case 1: rows_times_panel<1>(x, ldx, w, k0, k1, acc, zero); break;
    case 2: rows_times_panel<2>(x, ldx, w, k0, k1, acc, zero); break;
    case 3: rows_times_panel<3>(x, ldx, w, k0, k1, acc, zero); break;
    case 4: rows_times_panel<4>(x, ldx, w, k0, k1, acc, zero); break;
    case 5: rows_times_panel<5>(x, ldx, w, k0, k1, acc, zero); break;
    case 6: rows_times_panel<6>(x, ldx, w, k0, k1, acc, zero); break;
    case 7: rows_times_panel<7>(x, ldx, w, k0, k1, acc, zero); break;
    case 8: rows_times_panel<8>(x, ldx, w, k0, k1, acc, zero); break;
    case 9: rows_times_panel<9>(x, ldx, w, k0, k1, acc, zero); break;
    case 10: rows_times_panel<10>(x, ldx, w, k0, k1, acc, zero); break;
    case 11: rows_times_panel<11>(x, ldx, w, k0, k1, acc, zero); break;
    case 12: rows_times_panel<12>(x, ldx, w, k0, k1, acc, zero); break;
    case 13: rows_times_panel<13>(x, ldx, w, k0, k1, acc, zero); break;
    case 14: rows_times_panel<14>(x, ldx, w, k0, k1, acc, zero); break;
    case 15: rows_times_panel<15>(x, ldx, w, k0, k1, acc, zero); break;
    default: rows_times_panel<16>(x, ldx, w, k0, k1, acc, zero); break;
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
          rows_times_panel(rows, xr, k, w, 0, k, acc, true);
        } else {
          for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
            const int64_t k1 = std::min(k, k0 + kChunkK);
            for (int64_t r = 0; r < rows; r += kRowsInRegs)
              rows_times_panel(std::min(kRowsInRegs, rows - r), xr + r * k, k, w, k0, k1, acc + r * kPanel, k0 == 0);
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
