// W-float vectors for the attention kernels, written with GCC vector extensions so that one source compiles to
// AVX2 (HSD_VEC_BYTES 32) or AVX-512 (64) registers; the compiler fuses a * b + c into one FMA
// (-ffp-contract=fast, set by the builds in hsd_rag/kernels).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifndef HSD_VEC_BYTES
#define HSD_VEC_BYTES 32
#endif

namespace hsd {

constexpr int W = HSD_VEC_BYTES / 4;  // floats per vector

typedef float vec __attribute__((vector_size(HSD_VEC_BYTES)));
typedef int ivec __attribute__((vector_size(HSD_VEC_BYTES)));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return vec{} + x; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// exp(x) of every lane of a float vector V: 2^n * p(r), r = x - n ln2, degree-6 polynomial (Cephes expf), ~1 ulp;
// inputs below the float range (a masked key's score minus the row's max) give exactly 0, as SDPA's exp does.
template <typename V>
inline V exp_of(V x) {
  typedef int IV __attribute__((vector_size(sizeof(V))));
  const auto underflow = x < -87.33654f;
  x = x < -87.33654f ? V{} - 87.33654f : x;
  x = x > 88.72283f ? V{} + 88.72283f : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  const V result = p * (V)bits;  // a vector cast reinterprets the bits: 2^n
  return underflow ? V{} : result;
}

inline vec exp_vec(vec x) { return exp_of(x); }

inline float lanes_max(vec v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}
inline float lanes_sum(vec v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// One row's scores s[0, padded): s[0, limit) -> exp(s - max) (the keys it may see), s[limit, padded) -> 0;
// returns 1 / the sum.
inline float softmax_row(float* s, int64_t limit, int64_t padded) {
  const int64_t full = limit / W * W;
  float m = -__builtin_inff();
  if (full) {
    vec vm = load(s);
    for (int64_t j = W; j < full; j += W) vm = vmax(vm, load(s + j));
    m = lanes_max(vm);
  }
  for (int64_t j = full; j < limit; ++j) m = std::max(m, s[j]);
  const vec row_max = splat(m);
  vec sum{};
  for (int64_t j = 0; j < full; j += W) {
    const vec p = exp_vec(load(s + j) - row_max);
    store(s + j, p);
    sum += p;
  }
  if (full < limit) {  // the partial vector: keys past the limit get exactly 0
    vec p = exp_vec(load(s + full) - row_max);
    for (int i = static_cast<int>(limit - full); i < W; ++i) p[i] = 0.0f;
    store(s + full, p);
    sum += p;
  }
  std::fill(s + (limit + W - 1) / W * W, s + padded, 0.0f);
  return 1.0f / lanes_sum(sum);
}

// out[r][c0 .. c0 + CV W) = inv[r] * sum_j p(r, j) v[j][c0 ..] for RT rows, keys [0, keys), where
// p(r, j) = p[r * row_stride + j * key_stride]; rows whose out is null are computed and dropped.
template <int RT, int CV>
inline void weighted_tile(const float* p, int64_t row_stride, int64_t key_stride, const float* v, int64_t v_stride,
                          int64_t keys, int64_t c0, const float* inv, float* const* out) {
  vec acc[RT][CV] = {};
  const float* vr = v + c0;
  const float* pj = p;
  for (int64_t j = 0; j < keys; ++j, vr += v_stride, pj += key_stride) {
    vec vv[CV];
    for (int c = 0; c < CV; ++c) vv[c] = load(vr + c * W);
    for (int r = 0; r < RT; ++r) {
      const vec pb = splat(pj[r * row_stride]);
      for (int c = 0; c < CV; ++c) acc[r][c] += pb * vv[c];
    }
  }
  for (int r = 0; r < RT; ++r)
    if (out[r])
      for (int c = 0; c < CV; ++c) store(out[r] + c0 + c * W, acc[r][c] * inv[r]);
}

// weighted_tile over all d columns (d a multiple of W), in the widest column tiles d and the registers allow
// (RT x CV accumulators: up to 8 vectors of columns for one or two rows, else 4).
template <int RT>
inline void weighted_rows(const float* p, int64_t row_stride, int64_t key_stride, const float* v, int64_t v_stride,
                          int64_t keys, int64_t d, const float* inv, float* const* out) {
  if (RT <= 2 && d % (8 * W) == 0) {
    for (int64_t c0 = 0; c0 < d; c0 += 8 * W)
      weighted_tile<RT, 8>(p, row_stride, key_stride, v, v_stride, keys, c0, inv, out);
  } else if (d % (4 * W) == 0) {
    for (int64_t c0 = 0; c0 < d; c0 += 4 * W)
      weighted_tile<RT, 4>(p, row_stride, key_stride, v, v_stride, keys, c0, inv, out);
  } else if (d % (2 * W) == 0) {
    for (int64_t c0 = 0; c0 < d; c0 += 2 * W)
      weighted_tile<RT, 2>(p, row_stride, key_stride, v, v_stride, keys, c0, inv, out);
  } else {
    for (int64_t c0 = 0; c0 < d; c0 += W)
      weighted_tile<RT, 1>(p, row_stride, key_stride, v, v_stride, keys, c0, inv, out);
  }
}

}  // namespace hsd
