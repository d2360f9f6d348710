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
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kPanel = 16;       // output columns per panel: one 64-byte line per k
constexpr int64_t kRowsInRegs = 16;  // rows of x whose accumulators (one zmm each) stay in registers
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

}  // namespace

#include "panel_gemm_driver.h"
