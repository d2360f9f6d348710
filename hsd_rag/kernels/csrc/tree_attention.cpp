// Attention of a few query tokens (a decode step or a draft tree) over a CPU KV cache, grouped-query aware.
//
// Why: torch's CPU flash-attention kernel is built for long query blocks; for the 1-16 queries of a decode step it
// spends most of its time on setup (on a 2-core EPYC, 137 us per layer for one query over 500 cached tokens, 12 % of
// a 1-token SmolLM2 forward). Two ways here, by how many query rows share one KV head (group heads x n queries):
// - a few (a plain decode step): each row alone, its dot products with 8 keys summed into one register;
// - more (a draft tree): all of them together, their scaled queries transposed to [d][rows] so that each key
//   element is broadcast once and multiplied into a vector of rows (every key read once per layer instead of once
//   per row); the scores stay [key][rows], so the softmax runs down the keys a vector of rows at a time.
// Both multiply P @ V with a tile of the output in registers.
//
// Semantics: out[b, i, h, :] = softmax(scale * q[b, h, i] . k[b, h / group, l] + mask[b, h, i, l]) @ v[b, h / group]
// with an additive float or a bool (true = attend) mask, or none; the layout transformers' attention functions
// return ([b, n, h, d]). Written with GCC vector extensions (vec.h), one build per vector width.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using namespace hsd;

constexpr int MAX_ROW_VECTORS = W == 16 ? 4 : 3;  // rows scored at once = this many vectors (registers allow)
constexpr int RT = W == 16 ? 6 : 2;               // rows per P @ V tile (up to 4 vectors of columns each)
// Rows per KV head below which each row is scored alone: a vector of rows would be mostly empty lanes (measured,
// one SmolLM2 layer, 9 query / 3 KV heads, 500 keys, AVX-512 build: 1 query 21 us alone vs 34 together, 2 queries
// 41 vs 36; the AVX2 build breaks even at 6 queries, 18 rows, and gains from 8 on: 155 vs 137 us).
constexpr int64_t MIN_ROWS_TOGETHER = W == 16 ? 6 : 16;

// ---- each row alone ----------------------------------------------------------------------------------------------

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

// s[l] = scale * q . k[l] (+ mask[l]; -inf where a bool mask forbids), keys [0, L).
void row_scores(const float* q, const float* k, int64_t k_stride, const float* mask, const bool* allowed, int64_t L,
                int64_t d, float scale, float* s) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + (l + j) * k_stride + c), acc[j]);
    }
    _mm256_storeu_ps(s + l, _mm256_mul_ps(sum_lanes8(acc), vscale));
  }
  for (; l < L; ++l) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + l * k_stride + c), acc);
    s[l] = sum8(acc) * scale;
  }
  if (mask)
    for (int64_t t = 0; t < L; ++t) s[t] += mask[t];
  if (allowed)
    for (int64_t t = 0; t < L; ++t)
      if (!allowed[t]) s[t] = -std::numeric_limits<float>::infinity();
}

// ---- the rows of a KV head together --------------------------------------------------------------------------------

// Keys scored per pass for NV row vectors: enough multiply-adds per broadcast key element to hide the loads.
template <int NV>
constexpr int keys_per_pass() { return NV == 1 ? 8 : NV == 4 ? 3 : 4; }

// s[l][0 .. NV W) = qt[.][0 .. NV W) . k[l] for keys [0, L); qt is [d][NV W], s rows are NV W floats.
template <int NV>
void scores(const float* qt, int64_t d, const float* k, int64_t k_stride, int64_t L, float* s) {
  constexpr int KB = keys_per_pass<NV>();
  constexpr int RP = NV * W;
  int64_t l = 0;
  for (; l + KB <= L; l += KB) {
    vec acc[KB][NV] = {};
    const float* kl = k + l * k_stride;
    for (int64_t c = 0; c < d; ++c) {
      vec q[NV];
      for (int v = 0; v < NV; ++v) q[v] = load(qt + c * RP + v * W);
      for (int j = 0; j < KB; ++j) {
        const vec kb = splat(kl[j * k_stride + c]);
        for (int v = 0; v < NV; ++v) acc[j][v] += kb * q[v];
      }
    }
    for (int j = 0; j < KB; ++j)
      for (int v = 0; v < NV; ++v) store(s + (l + j) * RP + v * W, acc[j][v]);
  }
  for (; l < L; ++l) {
    vec acc[NV] = {};
    const float* kl = k + l * k_stride;
    for (int64_t c = 0; c < d; ++c) {
      const vec kb = splat(kl[c]);
      for (int v = 0; v < NV; ++v) acc[v] += kb * load(qt + c * RP + v * W);
    }
    for (int v = 0; v < NV; ++v) store(s + l * RP + v * W, acc[v]);
  }
}

void scores(int nv, const float* qt, int64_t d, const float* k, int64_t k_stride, int64_t L, float* s) {
  switch (nv) {
    case 1: scores<1>(qt, d, k, k_stride, L, s); break;
    case 2: scores<2>(qt, d, k, k_stride, L, s); break;
    case 3: scores<3>(qt, d, k, k_stride, L, s); break;
    default: scores<MAX_ROW_VECTORS>(qt, d, k, k_stride, L, s); break;
  }
}

// Column `col` of s ([L][rp]) gets one query row's mask: added (float) or -inf where not allowed (bool). Chunks of
// keys the mask leaves alone (all 0 / all true: a tree's cached prefix) are skipped after one vector compare.
void apply_mask(const float* m, int64_t L, float* s, int64_t rp, int64_t col) {
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    const auto touched = load(m + l) != 0.0f;
    bool any = false;
    for (int i = 0; i < W; ++i) any |= touched[i] != 0;
    if (!any) continue;
    for (int i = 0; i < W; ++i) s[(l + i) * rp + col] += m[l + i];
  }
  for (; l < L; ++l) s[l * rp + col] += m[l];
}

void apply_mask(const bool* m, int64_t L, float* s, int64_t rp, int64_t col) {
  constexpr uint64_t all_true = 0x0101010101010101ULL;
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    uint64_t word;
    std::memcpy(&word, m + l, 8);
    if (word == all_true) continue;
    for (int i = 0; i < 8; ++i)
      if (!m[l + i]) s[(l + i) * rp + col] = -std::numeric_limits<float>::infinity();
  }
  for (; l < L; ++l)
    if (!m[l]) s[l * rp + col] = -std::numeric_limits<float>::infinity();
}

// Softmax down the keys of every column of s ([L][rp]) in place; inv[col] = 1 / the column's sum.
void softmax_columns(float* s, int64_t L, int64_t rp, float* inv) {
  for (int64_t v = 0; v < rp; v += W) {
    vec mx = splat(-std::numeric_limits<float>::infinity());
    for (int64_t l = 0; l < L; ++l) mx = vmax(mx, load(s + l * rp + v));
    vec sum{};
    for (int64_t l = 0; l < L; ++l) {
      const vec p = exp_vec(load(s + l * rp + v) - mx);
      store(s + l * rp + v, p);
      sum += p;
    }
    store(inv + v, 1.0f / sum);
  }
}

}  // namespace

// q [B, H, n, d]; k, v [B, KV, L, d] (last dim contiguous); mask: broadcastable to [B, H, n, L], additive float or
// bool (true = attend), or undefined. Returns [B, n, H, d].
torch::Tensor tree_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const c10::optional<torch::Tensor>& mask_in, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tree_attention: 4-D q, k, v");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "tree_attention: fp32");
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t KV = k.size(1), L = k.size(2);
  TORCH_CHECK(d % W == 0 && k.size(3) == d && v.size(3) == d && v.size(2) == L, "tree_attention: shapes");
  TORCH_CHECK(H % KV == 0 && k.size(0) == B && v.size(0) == B, "tree_attention: heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "tree_attention: contiguous head dim");
  torch::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK((mask_in->scalar_type() == torch::kFloat32 || mask_in->scalar_type() == torch::kBool) &&
                mask_in->dim() == 4, "tree_attention: a float or bool 4-D mask");
    mask = mask_in->expand({B, H, n, L});  // broadcast dims get stride 0: nothing is copied
    if (mask.stride(3) != 1) mask = mask.contiguous();
  }
  const bool boolean = mask.defined() && mask.scalar_type() == torch::kBool;
  const float fscale = static_cast<float>(scale);
  auto out = torch::empty({B, n, H, d}, q.options());
  float* op = out.data_ptr<float>();
  const int64_t group = H / KV, rows = group * n;  // rows of one KV head: (head in group, query)
  if (rows < MIN_ROWS_TOGETHER) {
    const auto qc = q.contiguous();
    const float* qp = qc.data_ptr<float>();
    std::vector<float> s((L + W - 1) / W * W);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* kp = k.data_ptr<float>() + b * k.stride(0) + (h / group) * k.stride(1);
        const float* vp = v.data_ptr<float>() + b * v.stride(0) + (h / group) * v.stride(1);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t offset = mask.defined() ? b * mask.stride(0) + h * mask.stride(1) + i * mask.stride(2) : 0;
          const float* mp = mask.defined() && !boolean ? mask.data_ptr<float>() + offset : nullptr;
          const bool* ap = mask.defined() && boolean ? mask.data_ptr<bool>() + offset : nullptr;
          row_scores(qp + ((b * H + h) * n + i) * d, kp, k.stride(2), mp, ap, L, d, fscale, s.data());
          float inv = softmax_row(s.data(), L, static_cast<int64_t>(s.size()));
          float* row_out = op + ((b * n + i) * H + h) * d;
          weighted_rows<1>(s.data(), 0, 1, vp, v.stride(2), L, d, &inv, &row_out);
        }
      }
    }
    return out;
  }
  const int64_t chunk = MAX_ROW_VECTORS * W, chunks = (rows + chunk - 1) / chunk;

  at::parallel_for(0, B * KV * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt, s, inv;
    std::vector<float*> outs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (KV * chunks), kvh = item / chunks % KV, r0 = item % chunks * chunk;
      const int64_t count = std::min(chunk, rows - r0);
      const int nv = static_cast<int>((count + W - 1) / W);
      const int64_t rp = nv * W;
      qt.assign(d * rp, 0.0f);
      s.resize(L * rp + RT);  // P @ V tiles may read up to RT - 1 columns past the last row
      inv.assign(rp + RT, 0.0f);
      outs.assign(rp + RT, nullptr);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t h = kvh * group + (r0 + r) / n, i = (r0 + r) % n;
        const float* qr = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
        for (int64_t c = 0; c < d; ++c) qt[c * rp + r] = qr[c * q.stride(3)] * fscale;
        outs[r] = op + ((b * n + i) * H + h) * d;
      }
      const float* kp = k.data_ptr<float>() + b * k.stride(0) + kvh * k.stride(1);
      scores(nv, qt.data(), d, kp, k.stride(2), L, s.data());
      if (mask.defined()) {
        for (int64_t r = 0; r < count; ++r) {
          const int64_t h = kvh * group + (r0 + r) / n, i = (r0 + r) % n;
          const int64_t offset = b * mask.stride(0) + h * mask.stride(1) + i * mask.stride(2);
          if (boolean)
            apply_mask(mask.data_ptr<bool>() + offset, L, s.data(), rp, r);
          else
            apply_mask(mask.data_ptr<float>() + offset, L, s.data(), rp, r);
        }
      }
      softmax_columns(s.data(), L, rp, inv.data());
      const float* vp = v.data_ptr<float>() + b * v.stride(0) + kvh * v.stride(1);
      for (int64_t t = 0; t < count; t += RT)
        weighted_rows<RT>(s.data() + t, 1, rp, vp, v.stride(2), L, d, inv.data() + t, outs.data() + t);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention", &tree_attention, "attention of a few queries over a KV cache, [B, n, H, d] out");
}
