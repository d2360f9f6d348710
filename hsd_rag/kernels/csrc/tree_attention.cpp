// Attention of a few query tokens (a decode step or a draft tree) over a CPU KV cache, grouped-query aware.
//
// Why: torch's CPU flash-attention kernel is built for long query blocks; for the 1-16 queries of a decode step it
// spends most of its time on setup, so on a 2-core EPYC attention was 12 % of a 1-token SmolLM2 forward over 500
// cached tokens (137 us per layer) and 18 % of an 8-token one (287 us), for a few hundred thousand multiply-adds.
// Here every query row of the heads that share one KV head is scored against each key (8 keys at a time, their
// 8 dot products summed into one register), softmaxed with a vectorised exp, and multiplied into V, reading each
// KV head once from L2 per row.
//
// Semantics: out[b, i, h, :] = softmax(scale * q[b, h, i] . k[b, h / group, l] + mask[b, h, i, l]) @ v[b, h / group]
// with an additive float mask (or none), the layout transformers' attention functions return ([b, n, h, d]).
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// exp(x) for 8 floats: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (Cephes expf), ~1 ulp;
// inputs below the float range give exactly 0 (masked keys).
inline __m256 exp8(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// The 8 sums of 8 vectors' lanes, as one vector (lane j = sum of a[j]).
inline __m256 sum_lanes8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: s0123 = [a0 a1 a2 a3 | a0 a1 a2 a3] halves (low 128: first halves, high: second halves)
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// out[0 .. 8C) = vinv * sum_t p[t] * v[t][0 .. 8C), skipping masked keys (p = 0).
template <int C>
inline void weighted_sum(const float* p, const float* v, int64_t v_stride, int64_t L, __m256 vinv, float* out) {
  __m256 o[C];
  for (int c = 0; c < C; ++c) o[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (p[t] == 0.0f) continue;
    const __m256 pt = _mm256_set1_ps(p[t]);
    const float* vr = v + t * v_stride;
    for (int c = 0; c < C; ++c) o[c] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + c * 8), o[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + c * 8, _mm256_mul_ps(o[c], vinv));
}

inline void weighted_sum(int64_t chunks, const float* p, const float* v, int64_t v_stride, int64_t L, __m256 vinv,
                         float* out) {
  switch (chunks) {
    case 1: weighted_sum<1>(p, v, v_stride, L, vinv, out); break;
    case 2: weighted_sum<2>(p, v, v_stride, L, vinv, out); break;
    case 3: weighted_sum<3>(p, v, v_stride, L, vinv, out); break;
    case 4: weighted_sum<4>(p, v, v_stride, L, vinv, out); break;
    case 5: weighted_sum<5>(p, v, v_stride, L, vinv, out); break;
    case 6: weighted_sum<6>(p, v, v_stride, L, vinv, out); break;
    case 7: weighted_sum<7>(p, v, v_stride, L, vinv, out); break;
    default: weighted_sum<8>(p, v, v_stride, L, vinv, out); break;
  }
}

// One query row: scores into `s` (length L, padded to a multiple of 8), then softmax @ V into `out` (d floats).
void attend_row(const float* q, const float* k, int64_t k_stride, const float* v, int64_t v_stride, const float* mask,
                const bool* allowed, int64_t L, int64_t d, float scale, float* s, float* out) {
  const int64_t chunks = d / 8;
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256 qc = _mm256_loadu_ps(q + c * 8);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + (l + j) * k_stride + c * 8), acc[j]);
    }
    __m256 sc = _mm256_mul_ps(sum_lanes8(acc), vscale);
    if (mask) sc = _mm256_add_ps(sc, _mm256_loadu_ps(mask + l));
    _mm256_storeu_ps(s + l, sc);
    if (allowed)
      for (int j = 0; j < 8; ++j)
        if (!allowed[l + j]) s[l + j] = -std::numeric_limits<float>::infinity();
    vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + l));
  }
  float m = -std::numeric_limits<float>::infinity();
  {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, vmax);
    for (float t : tmp) m = std::max(m, t);
  }
  for (; l < L; ++l) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 8), _mm256_loadu_ps(k + l * k_stride + c * 8), acc);
    s[l] = sum8(acc) * scale + (mask ? mask[l] : 0.0f);
    if (allowed && !allowed[l]) s[l] = -std::numeric_limits<float>::infinity();
    m = std::max(m, s[l]);
  }
  // probabilities (unnormalised) and their sum; padded tail lanes are -inf -> 0
  const int64_t padded = (L + 7) / 8 * 8;
  for (int64_t t = L; t < padded; ++t) s[t] = -std::numeric_limits<float>::infinity();
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t t = 0; t < padded; t += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  const float inv = 1.0f / sum8(vsum);
  // out = sum_l p_l v_l / sum, 8 chunks (64 floats) of out at a time so its accumulators stay in registers
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t c0 = 0; c0 < chunks; c0 += 8)
    weighted_sum(std::min<int64_t>(8, chunks - c0), s, v + c0 * 8, v_stride, L, vinv, out + c0 * 8);
}

}  // namespace

// q [B, H, n, d]; k, v [B, KV, L, d] (last dim contiguous); mask: broadcastable to [B, H, n, L], additive float or
// bool (true = attend), or undefined. Returns [B, n, H, d].
torch::Tensor tree_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                             const c10::optional<torch::Tensor>& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tree_attention: 4-D q, k, v");
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "tree_attention: fp32");
  const int64_t B = q_in.size(0), H = q_in.size(1), n = q_in.size(2), d = q_in.size(3);
  const int64_t KV = k.size(1), L = k.size(2);
  TORCH_CHECK(d % 8 == 0 && d <= 256 && k.size(3) == d && v.size(3) == d && v.size(2) == L, "tree_attention: shapes");
  TORCH_CHECK(H % KV == 0 && k.size(0) == B && v.size(0) == B, "tree_attention: heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "tree_attention: contiguous head dim");
  const auto q = q_in.contiguous();
  torch::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK((mask_in->scalar_type() == torch::kFloat32 || mask_in->scalar_type() == torch::kBool) &&
                mask_in->dim() == 4, "tree_attention: a float or bool 4-D mask");
    mask = mask_in->expand({B, H, n, L});  // broadcast dims get stride 0: nothing is copied
    if (mask.stride(3) != 1) mask = mask.contiguous();
  }
  const bool boolean = mask.defined() && mask.scalar_type() == torch::kBool;
  auto out = torch::empty({B, n, H, d}, q.options());
  const int64_t group = H / KV;
  std::vector<float> scores((L + 7) / 8 * 8 + 8);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      const float* kp = k.data_ptr<float>() + b * k.stride(0) + kvh * k.stride(1);
      const float* vp = v.data_ptr<float>() + b * v.stride(0) + kvh * v.stride(1);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t offset = mask.defined() ? b * mask.stride(0) + h * mask.stride(1) + i * mask.stride(2) : 0;
        const float* mp = mask.defined() && !boolean ? mask.data_ptr<float>() + offset : nullptr;
        const bool* ap = mask.defined() && boolean ? mask.data_ptr<bool>() + offset : nullptr;
        attend_row(qp + ((b * H + h) * n + i) * d, kp, k.stride(2), vp, v.stride(2), mp, ap, L, d,
                   static_cast<float>(scale), scores.data(), op + ((b * n + i) * H + h) * d);
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention", &tree_attention, "attention of a few queries over a KV cache, [B, n, H, d] out");
}
