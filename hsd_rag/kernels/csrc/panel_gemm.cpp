// Skinny fp32 GEMM for CPU decode steps: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W kept in 16-column panels.
//
// Why: a decode or tree-verification step multiplies a few rows (1..64) by every weight matrix of the model, so
// its cost is streaming the weights from memory once. The panel layout [ceil(N/16)][K][16] makes that stream
// one sequential read; each 64-byte line (16 weights of one k) is loaded once, prefetched a few KB ahead, and
// used by every row of x while it is in registers (up to 6 rows at a time, the rest from L1 in k-chunks).
// On a 2-core AVX2 EPYC this runs 1..6 rows at the cost of one (memory-bound), where oneDNN's packed kernel pays
// ~30 % per extra row.
//
// Each output element is the same fused multiply-add chain over k = 0..K-1 whatever M is and wherever the row
// sits in x, so a row's result does not depend on the batch it is computed in (tree verification gives the
// logits a one-token step would).
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kPanel = 16;       // output columns per panel: one 64-byte line per k
constexpr int64_t kRowsInRegs = 6;   // rows of x whose 2x8 accumulators fit the 16 ymm registers
constexpr int64_t kPrefetch = 1024;  // floats ahead (4 KB) in the weight stream

template <int ROWS>
inline void rows_times_panel(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t k0,
                             int64_t k1, float* __restrict acc, bool zero) {
  __m256 lo[ROWS], hi[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    lo[m] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + m * kPanel);
    hi[m] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + m * kPanel + 8);
  }
  for (int64_t k = k0; k < k1; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kPanel + kPrefetch), _MM_HINT_T0);
    const __m256 w_lo = _mm256_loadu_ps(w + k * kPanel);
    const __m256 w_hi = _mm256_loadu_ps(w + k * kPanel + 8);
    for (int m = 0; m < ROWS; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
      lo[m] = _mm256_fmadd_ps(xv, w_lo, lo[m]);
      hi[m] = _mm256_fmadd_ps(xv, w_hi, hi[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    _mm256_storeu_ps(acc + m * kPanel, lo[m]);
    _mm256_storeu_ps(acc + m * kPanel + 8, hi[m]);
  }
}

}  // namespace

#include "panel_gemm_driver.h"
