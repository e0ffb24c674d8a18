// The four ops of hsae_fast/backends/torch_sparse.py for CPU: same contracts, float32 accumulation,
// no N x F buffer, deterministic run to run (every sum has one fixed order, whatever the threads).
//
// Shapes: N tokens, d model width, F features (all levels), K slots per token, kp parent slots.
// Inputs arrive contiguous from hsae_fast/backends/cpp.py: activations and small vectors in float32,
// weight matrices in float32 or bfloat16 (read as they are, converted in registers). Outputs are
// allocated by the glue (poisonable in tests) and every element of them is written here.
//
// Threads: ATen's pool through at::parallel_for (built with -fopenmp, see csrc/build_config.py: the
// same OpenMP runtime and threads as torch's ops). Hot loops are compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time (HSAE_VECTOR_CLONES), so one build runs on any x86-64 CPU.
#include "hsae_cpu.h"
#include "parallel.h"
#include "vector_loops.h"

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace hsae_cpu {
namespace {

using at::BFloat16;
using at::Tensor;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------ vector kernels
// Weight rows are float or bfloat16; `load` widens one element to float (bfloat16: the top 16 bits).
HSAE_INLINE float load(const float* p, int64_t i) { return p[i]; }
HSAE_INLINE float load(const BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// out[c] = <x, W[rows[c]]> for c < count (rows: global feature ids). Four rows share each load of x.
template <typename W_t>
HSAE_INLINE void dot_rows_impl(const float* x, const W_t* W, int64_t d, const int64_t* rows, int64_t count, float* out) {
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    const W_t* w0 = W + rows[c] * d;
    const W_t* w1 = W + rows[c + 1] * d;
    const W_t* w2 = W + rows[c + 2] * d;
    const W_t* w3 = W + rows[c + 3] * d;
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float xv = x[i + l];
        a0[l] += xv * load(w0, i + l);
        a1[l] += xv * load(w1, i + l);
        a2[l] += xv * load(w2, i + l);
        a3[l] += xv * load(w3, i + l);
      }
    }
    for (int64_t l = 0; i + l < d; ++l) {
      a0[l] += x[i + l] * load(w0, i + l);
      a1[l] += x[i + l] * load(w1, i + l);
      a2[l] += x[i + l] * load(w2, i + l);
      a3[l] += x[i + l] * load(w3, i + l);
    }
    out[c] = reduce_lanes(a0);
    out[c + 1] = reduce_lanes(a1);
    out[c + 2] = reduce_lanes(a2);
    out[c + 3] = reduce_lanes(a3);
  }
  for (; c < count; ++c) {
    const W_t* w = W + rows[c] * d;
    float a[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) a[l] += x[i + l] * load(w, i + l);
    for (int64_t l = 0; i + l < d; ++l) a[l] += x[i + l] * load(w, i + l);
    out[c] = reduce_lanes(a);
  }
}

// y += sum_c alpha[c] * W[rows[c]] (rows of a (*, d) matrix). Four rows per pass over y: a quarter
// of the loads and stores of y, and four independent streams of rows in flight.
template <typename W_t>
HSAE_INLINE void axpy_rows_impl(float* y, const float* alpha, const W_t* W, int64_t d, const int64_t* rows,
                                int64_t count) {
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    const W_t* w0 = W + rows[c] * d;
    const W_t* w1 = W + rows[c + 1] * d;
    const W_t* w2 = W + rows[c + 2] * d;
    const W_t* w3 = W + rows[c + 3] * d;
    const float a0 = alpha[c], a1 = alpha[c + 1], a2 = alpha[c + 2], a3 = alpha[c + 3];
    for (int64_t i = 0; i < d; ++i) y[i] += a0 * load(w0, i) + a1 * load(w1, i) + a2 * load(w2, i) + a3 * load(w3, i);
  }
  for (; c < count; ++c) {
    const W_t* w = W + rows[c] * d;
    for (int64_t i = 0; i < d; ++i) y[i] += alpha[c] * load(w, i);
  }
}

HSAE_VECTOR_CLONES void dot_rows(const float* x, const float* W, int64_t d, const int64_t* rows, int64_t n, float* out) {
  dot_rows_impl(x, W, d, rows, n, out);
}
HSAE_VECTOR_CLONES void dot_rows(const float* x, const BFloat16* W, int64_t d, const int64_t* rows, int64_t n, float* out) {
  dot_rows_impl(x, W, d, rows, n, out);
}
HSAE_VECTOR_CLONES void axpy_rows(float* y, const float* alpha, const float* W, int64_t d, const int64_t* rows, int64_t n) {
  axpy_rows_impl(y, alpha, W, d, rows, n);
}
HSAE_VECTOR_CLONES void axpy_rows(float* y, const float* alpha, const BFloat16* W, int64_t d, const int64_t* rows,
                                  int64_t n) {
  axpy_rows_impl(y, alpha, W, d, rows, n);
}

// The (row, weight) terms of one weighted sum of rows, gathered before one axpy_rows call.
struct RowTerms {
  std::vector<int64_t> rows;
  std::vector<float> alpha;
  void clear() { rows.clear(), alpha.clear(); }
  void add(int64_t row, float a) { rows.push_back(row), alpha.push_back(a); }
  template <typename W_t>
  void accumulate_into(float* y, const W_t* W, int64_t d) const {
    axpy_rows(y, alpha.data(), W, d, rows.data(), static_cast<int64_t>(rows.size()));
  }
};

HSAE_VECTOR_CLONES void widen_rows(const BFloat16* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = load(src, i);
}

// `count` weights as floats: float32 ones are used in place, bfloat16 ones widened into `buffer`.
inline const float* as_floats(const float* src, float* /*buffer*/, int64_t /*count*/) { return src; }
inline const float* as_floats(const BFloat16* src, float* buffer, int64_t count) {
  widen_rows(src, buffer, count);
  return buffer;
}

// ------------------------------------------------------------------------------------ bfloat16 screen
// A dense level scored at bfloat16 GEMM speed with the float32-sum answer (see encode_dense_impl):
// x and W rounded to bfloat16 (round to nearest even, as c10::BFloat16 does), one GEMM, then an upper
// bound of every float32 score from the bfloat16 one, which picks the few candidates to score again
// exactly. These are the bounds' pieces.
HSAE_INLINE uint16_t bf16_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// out = bf16(v), *norm = |v| and *rounding_norm = |v - bf16(v)| for one row of n floats (lane sums).
HSAE_VECTOR_CLONES void narrow_with_norms(const float* v, int64_t n, BFloat16* out, float* norm, float* rounding_norm) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  float acc[kLanes] = {}, acc_lo[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float x = v[i + l];
      bits[i + l] = bf16_bits(x);
      const float lo = x - load(out, i + l);
      acc[l] += x * x, acc_lo[l] += lo * lo;
    }
  for (int64_t l = 0; i + l < n; ++l) {
    const float x = v[i + l];
    bits[i + l] = bf16_bits(x);
    const float lo = x - load(out, i + l);
    acc[l] += x * x, acc_lo[l] += lo * lo;
  }
  *norm = std::sqrt(reduce_lanes(acc));
  *rounding_norm = std::sqrt(reduce_lanes(acc_lo));
}

// *norm = |v| for one row of n bfloat16 values (lane sums).
HSAE_VECTOR_CLONES void bf16_row_norm(const BFloat16* v, int64_t n, float* norm) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += load(v, i + l) * load(v, i + l);
  for (int64_t l = 0; i + l < n; ++l) acc[l] += load(v, i + l) * load(v, i + l);
  *norm = std::sqrt(reduce_lanes(acc));
}

// out[j] = s[j] + kappa |s[j]| + a lo[j] + c hi[j]: s the bfloat16 GEMM's (rounded) score, lo and hi
// per-feature norms, a and c per-token factors (encode_dense_impl says what each covers).
HSAE_VECTOR_CLONES void screen_upper_bounds(const BFloat16* s, const float* lo, const float* hi, float kappa, float a,
                                            float c, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = load(s, j);
    out[j] = v + kappa * std::fabs(v) + a * lo[j] + c * hi[j];
  }
}

// Rows screened and rows that needed the second pass, a row counted once per feature split (tests and
// benchmarks read these).
std::atomic<int64_t> g_screened_rows{0}, g_screen_second_passes{0};

// A gradient row that no slot touches is all zeros: those are written with non-temporal stores,
// which skip the read-for-ownership of every cache line and leave the cache to the rows that are
// accumulated. Most of a routed step's F x d gradients are such rows. A task that streamed ends
// with streaming_fence(), so the zeros are ordered before anything written after it.
inline void zero_row_streaming(float* p, int64_t n) {
#if defined(__x86_64__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 15); ++i) p[i] = 0.f;
  const __m128 zero = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) _mm_stream_ps(p + i, zero);
  for (; i < n; ++i) p[i] = 0.f;
#else
  std::fill(p, p + n, 0.f);
#endif
}

// dst[0..n) = src[0..n) with non-temporal stores: a row finished in L1 goes to a cold F x d output
// without the read for ownership a plain store makes of every line first.
inline void store_row_streaming(float* dst, const float* src, int64_t n) {
#if defined(__x86_64__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15); ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::copy(src, src + n, dst);
#endif
}

// Asks for `bytes` from p into L2 (a line per 64 bytes) ahead of their use. Not into L1: a row asked
// for a run ahead would push out the rows in use (a T0 prefetch there made the routed encode 0.8x).
inline void prefetch_to_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 1);
}

inline void streaming_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------------------------ running top-k
// Candidates scoring above a row's current threshold are appended to a buffer (a vector compress
// with AVX-512, branch-free elsewhere); when the buffer fills, a selection keeps the k best and
// raises the threshold. A row's k-th best rises fast, so after the first tiles few scores pass,
// and no per-candidate heap update sits in the scan. Order: higher score first, then smaller key,
// a strict total order, so the kept set never depends on the order candidates arrive in.
struct Candidate {
  float score;
  int32_t key;
};

inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.key < b.key);
}

// Appends (v, first + j) for every v = scores[j] (+ bias[j]) > threshold, j < n; returns how many.
// Writes up to kLanes - 1 slots past the last kept one.
using AppendAbove = int64_t (*)(const float*, const float*, int64_t, int32_t, float, float*, int32_t*);

int64_t append_above_generic(const float* scores, const float* bias, int64_t n, int32_t first, float threshold,
                             float* out_score, int32_t* out_key) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = bias ? scores[j] + bias[j] : scores[j];
    out_score[count] = v;
    out_key[count] = first + static_cast<int32_t>(j);
    count += v > threshold;  // NaN and -inf (pruned, no candidate) never pass
  }
  return count;
}

#if defined(__x86_64__) && defined(__GNUC__)
// A vector compress keeps the passing lanes; other x86-64 CPUs take the generic loop.
__attribute__((target("avx512f"))) int64_t append_above_avx512(const float* scores, const float* bias, int64_t n,
                                                                int32_t first, float threshold, float* out_score,
                                                                int32_t* out_key) {
  const __m512 t = _mm512_set1_ps(threshold);
  __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(16);
  int64_t count = 0, j = 0;
  for (; j + 16 <= n; j += 16, keys = _mm512_add_epi32(keys, step)) {
    __m512 v = _mm512_loadu_ps(scores + j);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    const __mmask16 pass = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
    _mm512_storeu_ps(out_score + count, _mm512_maskz_compress_ps(pass, v));
    _mm512_storeu_si512(out_key + count, _mm512_maskz_compress_epi32(pass, keys));
    count += __builtin_popcount(pass);
  }
  return count + append_above_generic(scores + j, bias ? bias + j : nullptr, n - j, first + static_cast<int32_t>(j),
                                      threshold, out_score + count, out_key + count);
}
#endif

AppendAbove pick_append_above() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) return append_above_avx512;
#endif
  return append_above_generic;
}

// Float -> uint32 with the same order (-0 counted as +0); NaN never reaches a top-k buffer.
HSAE_INLINE uint32_t order_bits(float v) {
  uint32_t b;
  const float x = v + 0.f;
  std::memcpy(&b, &x, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// out[i] = order_bits(v[i]); returns the largest.
HSAE_VECTOR_CLONES uint32_t float_order_bits(const float* v, int64_t n, uint32_t* out) {
  uint32_t largest = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = order_bits(v[i]);
    largest = std::max(largest, out[i]);
  }
  return largest;
}

HSAE_VECTOR_CLONES int64_t count_at_least(const uint32_t* bits, int64_t n, uint32_t t) {
  int32_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += bits[i] >= t;
  return count;
}

// The k-th largest of n >= k values, known to lie in [lo, largest]: the largest t with at least
// k values >= t, by bisection.
uint32_t kth_largest(const uint32_t* bits, int64_t n, int64_t k, uint64_t lo, uint32_t largest) {
  uint64_t hi = uint64_t(largest) + 1;  // count(>= lo) >= k > count(>= hi)
  while (hi - lo > 1) {
    const uint64_t mid = (lo + hi) / 2;
    (count_at_least(bits, n, static_cast<uint32_t>(mid)) >= k ? lo : hi) = mid;
  }
  return static_cast<uint32_t>(lo);
}

// One row's running top-k over a buffer of capacity_for(k) slots: the k kept, then room for kRoom
// appended candidates before a compaction (scores are offered kStep at a time).
class TopKBuffer {
 public:
  static constexpr int64_t kRoom = 512;
  static constexpr int64_t kStep = 64;
  static int64_t capacity_for(int64_t k) { return k + kRoom + kLanes; }

  // Work space of compactions, shared by the buffers one thread runs.
  struct Scratch {
    std::vector<uint32_t> bits;
    std::vector<Candidate> ties;
    std::vector<std::pair<uint64_t, float>> ranked;
  };

  TopKBuffer(float* score, int32_t* key, int64_t k, Scratch* scratch)
      : score_(score), key_(key), k_(k), scratch_(scratch) {}

  // Offers scores[j] (+ bias[j]) under keys first + j, for j < n.
  void offer(const float* scores, const float* bias, int64_t n, int32_t first) {
    static const AppendAbove append_above = pick_append_above();
    for (int64_t j = 0; j < n; j += kStep) {
      const int64_t m = std::min(kStep, n - j);
      if (count_ + m > k_ + kRoom) compact();
      count_ += append_above(scores + j, bias ? bias + j : nullptr, m, first + static_cast<int32_t>(j), threshold_,
                             score_ + count_, key_ + count_);
    }
  }

  // The kept candidates, best first; returns how many (at most k).
  // Sorted by one 64-bit rank each, the score's order bits inverted above the key: ascending ranks
  // are the order `better` gives (keys are unique within a row), compared without branches on floats
  // (sorting the Candidates with `better` was most of a routed level's top-k).
  int64_t finish(std::vector<Candidate>& out) {
    compact();
    std::vector<std::pair<uint64_t, float>>& ranked = scratch_->ranked;
    ranked.resize(count_);
    for (int64_t i = 0; i < count_; ++i)
      ranked[i] = {(uint64_t(~order_bits(score_[i])) << 32) | uint32_t(key_[i]), score_[i]};
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    out.resize(count_);
    for (int64_t i = 0; i < count_; ++i) out[i] = {ranked[i].second, int32_t(uint32_t(ranked[i].first))};
    return count_;
  }

 private:
  // Keeps the k best; the threshold becomes the k-th best score once k are held. The k-th best is
  // found by bisection on the scores' order-preserving bits between the old threshold (everything
  // held is at least that) and the largest (vectorized counts, no branches on data); its equals
  // are set aside and a branch-free in-place pass keeps what beats it.
  void compact() {
    if (count_ < k_) return;
    std::vector<uint32_t>& bits = scratch_->bits;
    bits.resize(count_);
    const uint32_t largest = float_order_bits(score_, count_, bits.data());
    const uint32_t kth = kth_largest(bits.data(), count_, k_, threshold_ > kNegInf ? order_bits(threshold_) : 0, largest);
    std::vector<Candidate>& ties = scratch_->ties;
    ties.clear();
    for (int64_t i = 0; i < count_; ++i)
      if (bits[i] == kth) ties.push_back({score_[i], key_[i]});
    int64_t kept = 0;
    for (int64_t i = 0; i < count_; ++i) {
      score_[kept] = score_[i], key_[kept] = key_[i];
      kept += bits[i] > kth;
    }
    std::sort(ties.begin(), ties.end(), better);
    for (size_t i = 0; kept < k_; ++i) score_[kept] = ties[i].score, key_[kept] = ties[i].key, ++kept;
    count_ = k_;
    threshold_ = ties.front().score;
  }

  float* score_;
  int32_t* key_;
  int64_t k_;
  Scratch* scratch_;
  int64_t count_ = 0;
  float threshold_ = kNegInf;
};

// Fixed-size row chunks for sums over tokens: the partial sums and their order do not depend on
// how many threads run, so reductions give the same bits with 1 or 64 threads.
constexpr int64_t kReduceRows = 64;

// Entries (flat slot positions n * K + j) grouped by feature id, each group in ascending position:
// the order every per-feature sum of the backward passes runs in.
struct FeatureGroups {
  std::vector<int64_t> start;  // (F + 1,)
  std::vector<int64_t> entry;
};

template <typename Keep>
FeatureGroups group_by_feature(const int64_t* idx, int64_t entries, int64_t F, Keep keep) {
  FeatureGroups g;
  g.start.assign(F + 1, 0);
  for (int64_t e = 0; e < entries; ++e) {
    TORCH_CHECK(idx[e] >= 0 && idx[e] < F, "idx holds feature id ", idx[e], " outside [0, ", F, ")");
    if (keep(e)) ++g.start[idx[e] + 1];
  }
  for (int64_t f = 0; f < F; ++f) g.start[f + 1] += g.start[f];
  g.entry.resize(g.start[F]);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t e = 0; e < entries; ++e)
    if (keep(e)) g.entry[fill[idx[e]]++] = e;
  return g;
}

// Where each feature's gradient row goes: row f of an (F, d) buffer, or with a row gradient (see
// hsae_cpu.h) the position of f among the features with entries, which are then the only rows.
struct GradientRows {
  float* base = nullptr;        // null: no weight gradient asked for
  std::vector<int64_t> row_of;  // compact only: f -> its row, -1 for a feature without entries
  c10::optional<Tensor> rows;   // compact only: the returned rows
  float* row(int64_t f, int64_t d) const { return base + (row_of.empty() ? f : row_of[f]) * d; }
  bool compact() const { return !row_of.empty(); }
};

// touched(f): whether feature f gets a gradient row (compact only; f has entries).
template <typename Touched>
GradientRows gradient_rows(const FeatureGroups& g, int64_t F, float* base, bool compact, Touched touched) {
  GradientRows out;
  out.base = base;
  if (!base || !compact) return out;
  out.row_of.assign(F, -1);
  int64_t R = 0;
  for (int64_t f = 0; f < F; ++f)
    if (g.start[f + 1] > g.start[f] && touched(f)) out.row_of[f] = R++;
  out.rows = at::empty({R}, at::kLong);
  int64_t* rows = out.rows->data_ptr<int64_t>();
  for (int64_t f = 0; f < F; ++f)
    if (out.row_of[f] >= 0) rows[out.row_of[f]] = f;
  return out;
}

// The two kinds of work of a backward in one parallel region (each barrier costs a time slice on a
// loaded machine): feature_body(f0, f1) over feature ranges of about equal work (entries + one row
// write each, so a few popular top-level features do not make one task the longest) and
// row_body(r0, r1) over fixed chunks of kReduceRows rows.
template <typename FeatureBody, typename RowBody>
void for_features_and_rows(const FeatureGroups& g, int64_t F, const FeatureBody& feature_body, int64_t rows,
                           const RowBody& row_body) {
  const int64_t feature_tasks = std::max<int64_t>(1, std::min<int64_t>(F, 8 * at::get_num_threads()));
  const int64_t row_tasks = (rows + kReduceRows - 1) / kReduceRows;
  const double per_task = double(g.start[F] + F) / double(feature_tasks);
  auto boundary = [&](int64_t t) -> int64_t {
    if (t >= feature_tasks) return F;
    const double target = per_task * double(t);
    int64_t lo = 0, hi = F;  // first f with start[f] + f >= target
    while (lo < hi) {
      int64_t mid = (lo + hi) / 2;
      if (double(g.start[mid] + mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  for_each_task(feature_tasks + row_tasks, [&](int64_t t) {
    if (t < feature_tasks) {
      feature_body(boundary(t), boundary(t + 1));
    } else {
      const int64_t r0 = (t - feature_tasks) * kReduceRows;
      row_body(r0, std::min(rows, r0 + kReduceRows));
    }
  });
}

// A fresh (F, d) gradient is tens of MB that no page of has been touched yet; on Linux with
// transparent huge pages in "madvise" mode, asking for 2 MB pages before the first write turns
// thousands of page faults into a few dozen (the same advice torch gives with THP_MEM_ALLOC_ENABLE).
void advise_huge_pages(const c10::optional<Tensor>& t) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.has_value() || t->nbytes() < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t->data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t->data_ptr()) + t->nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename T>
T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------------ BLAS threads
// A function of MKL, which torch's x86 builds carry inside libtorch_cpu, by name; null where
// torch's BLAS is another one (everything that uses one has a path without it).
void* mkl_symbol(const char* name) {
  if (void* fn = dlsym(RTLD_DEFAULT, name)) return fn;
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return torch_cpu ? dlsym(torch_cpu, name) : nullptr;
}

// torch turns MKL's dynamic threading off, so a GEMM called inside a parallel region would open a
// nested team of its own. Where torch's BLAS is MKL, each task pins its calls to its own thread.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(set_local() ? set_local()(1) : 0) {}
  ~SingleThreadedBlas() {
    if (set_local()) set_local()(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal set_local() {
    static const SetLocal fn = reinterpret_cast<SetLocal>(mkl_symbol("MKL_Set_Num_Threads_Local"));
    return fn;
  }
  int previous_;
};

// bfloat16 x bfloat16 -> float32 GEMM of MKL (AMX or AVX512-BF16 where the CPU has them; products
// exact, float32 accumulation). Row-major C (m, n) = A (m, k) . B (n, k)^T.
using GemmBf16 = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const void* a,
                          int lda, const void* b, int ldb, float beta, float* c, int ldc);
GemmBf16 mkl_gemm_bf16() {
  static const GemmBf16 fn = reinterpret_cast<GemmBf16>(mkl_symbol("cblas_gemm_bf16bf16f32"));
  return fn;
}
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// ------------------------------------------------------------------------------------ dense encode
// Rows of the score tile one task computes at a time, and features per tile: a (rows x tile) float
// block and the tile of W stay in L2 while the top-k merge reads them.
constexpr int64_t kDenseRows = 512;
constexpr int64_t kDenseTile = 512;

// Writes one token's kept slots: ids, scores, and the slot of each feature's parent among the
// token's active parents (the first one holding it; -1 with no parent level or none active).
void write_dense_row(const std::vector<Candidate>& best, int64_t n, int64_t K, const int64_t* parent,
                     const int64_t* pidx, const float* pvals, int64_t kp, int64_t* out_idx, float* out_score,
                     int64_t* out_slot) {
  for (int64_t j = 0; j < K; ++j) {
    const bool filled = j < static_cast<int64_t>(best.size());
    const int64_t id = filled ? best[j].key : 0;
    out_idx[n * K + j] = id;
    out_score[n * K + j] = filled ? best[j].score : kNegInf;
    int64_t slot = -1;
    for (int64_t s = 0; filled && pidx && s < kp; ++s)
      if (pidx[n * kp + s] == parent[id] && pvals[n * kp + s] != 0.f) { slot = s; break; }
    out_slot[n * K + j] = slot;
  }
}

// The bfloat16 screen of a dense level (EncodeArgs::screen). With x~, w~ the bfloat16 roundings of a
// token and a feature row, x_lo = x - x~ and w_lo = w - w~ (exactly; 0 where the input is bfloat16
// already), x.w = x~.w~ + x~.w_lo + x_lo.w, so
//   |x.w - x~.w~| <= |x~| |w_lo| + |x_lo| |w|   (Cauchy-Schwarz; |x_lo| <= 2^-8 |x| per element).
// The GEMM sums x~.w~ in float32 (products of bfloat16 values are exact in float32) and rounds the sum
// to bfloat16 (relative error under 2^-8): s' with |s' - x~.w~| <= kappa |s'| + gamma_d |x~| |w~|.
// The exact score the level selects by is s = fl32(dot(x, w)) + b (dot_rows' fixed order, within
// gamma_d |x| |w| of x.w; for bfloat16 inputs the float32 sum of their exact products, what the
// float32-accumulating bfloat16 GEMM computes). So every s is at most
//   U = s' + kappa |s'| + a |w_lo| + c |w| + b (1 + 2^-20 sign b)
// with a = |x~| and c = |x_lo| + (3 gamma_d + 2^-20) |x|, both scaled by 1 + 2^-10 + 2 gamma_d for the
// float32 rounding of the norms and of U itself. Each row keeps the M best U; all other features
// have U <= the M-th best U, so if that is below the K-th best exact score among the kept, the K best
// of the kept, scored exactly, are the K best of the level: the same set, the same scores and the same
// order as scoring every feature with float32 sums. Otherwise (near-equal scores at the row's cut) a
// second pass scores every feature whose bound reaches the row's K-th exact score. Typical scores
// spread as |x| |w| / sqrt(d); the bound is about 2^-8 |x| |w|, so only features within a few
// hundredths of that spread of the K-th join the K best.
struct ScreenBounds {
  static constexpr float kKappa = 1.f / 256.f + 1.f / 16384.f;
  std::vector<float> w_norm, w_lo_norm;  // per feature of the level
  std::vector<float> a, c;               // per token
  std::vector<float> bias_up;            // b (1 + 2^-20 sign b), -inf where pruned
  Tensor xb;                             // (N, d) bfloat16 tokens
  Tensor wb_storage;                     // the level's (Fl, d) bfloat16 weights, in float32 storage
  const BFloat16* wb = nullptr;
};

// float32 weights are rounded into a pooled bfloat16 copy; bfloat16 weights are used as they are
// (w_lo = 0), and so are bfloat16 tokens (x_lo comes out 0).
template <typename W_t>
ScreenBounds screen_bounds(const float* xc, int64_t N, const W_t* W, int64_t Fl, int64_t d, const float* b_enc,
                           const bool* keep) {
  ScreenBounds sb;
  const double gamma = d * std::ldexp(1.0, -24) / (1.0 - d * std::ldexp(1.0, -24));
  const float scale = static_cast<float>(1.0 + std::ldexp(1.0, -10) + 2 * gamma);
  const float c_abs = static_cast<float>(3 * gamma + std::ldexp(1.0, -20));
  sb.w_norm.resize(Fl), sb.w_lo_norm.resize(Fl), sb.bias_up.resize(Fl), sb.a.resize(N), sb.c.resize(N);
  sb.xb = at::empty({N, d}, at::kBFloat16);
  BFloat16* wb = nullptr;
  if constexpr (std::is_same<W_t, float>::value) {
    // The bfloat16 weights are as big as a gradient and made every step: pooled like one (no page faults).
    const int64_t floats = (Fl * d + 1) / 2;
    sb.wb_storage = floats * 4 >= (int64_t(4) << 20) ? pooled_gradient({floats}) : at::empty({floats}, at::kFloat);
    wb = reinterpret_cast<BFloat16*>(sb.wb_storage.data_ptr<float>());
    sb.wb = wb;
  } else {
    sb.wb = W;
  }
  for_each_chunk(Fl, 256, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      if constexpr (std::is_same<W_t, float>::value) {
        narrow_with_norms(W + f * d, d, wb + f * d, &sb.w_norm[f], &sb.w_lo_norm[f]);
      } else {
        bf16_row_norm(W + f * d, d, &sb.w_norm[f]);
        sb.w_lo_norm[f] = 0.f;
      }
      sb.bias_up[f] = keep[f] ? b_enc[f] + std::fabs(b_enc[f]) * 0x1p-20f : kNegInf;
    }
  });
  BFloat16* xb = sb.xb.data_ptr<BFloat16>();
  for_each_chunk(N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float x_norm, x_lo_norm;
      narrow_with_norms(xc + n * d, d, xb + n * d, &x_norm, &x_lo_norm);
      sb.a[n] = scale * (x_norm + x_lo_norm);  // |x~| <= |x| + |x_lo|
      sb.c[n] = scale * (x_lo_norm + c_abs * x_norm);
    }
  });
  return sb;
}

// Scores of a whole level: a GEMM per (row block, feature tile), then bias, pruned mask and the edge
// term of gating "none", merged into a running top-k per row while the tile is in cache. With fewer
// row blocks than threads (small N) the features are split too and the partial top-ks merged. With
// the screen, each tile is a bfloat16 GEMM whose upper bounds (ScreenBounds above) feed a running
// top-M, and each row's M are scored again exactly at the end.
template <typename W_t>
void encode_dense_impl(const EncodeArgs& a) {
  const int64_t N = a.xc.size(0), d = a.xc.size(1), K = a.kmax, Fl = a.W_enc.size(0);
  // Unscreened, bfloat16 inputs and weights take MKL's bfloat16 GEMM when there is one (float32 sums;
  // on the AMD EPYC here it runs slower than the float32 GEMM); otherwise the weight tile is widened
  // and the float32 GEMM runs.
  const bool gemm_bf16 = std::is_same<W_t, BFloat16>::value && a.xc.scalar_type() == at::kBFloat16 && mkl_gemm_bf16();
  TORCH_CHECK(d <= std::numeric_limits<int>::max() && Fl <= std::numeric_limits<int>::max(), "shapes exceed BLAS ints");
  const Tensor xc_float = a.xc.to(at::kFloat).contiguous();
  const float* xc = xc_float.data_ptr<float>();
  const W_t* W = a.W_enc.data_ptr<W_t>();
  const float* b_enc = a.b_enc.data_ptr<float>();
  const bool* keep = a.path_mask.data_ptr<bool>();
  const float* edge = a.edge_weight.data_ptr<float>();
  const int64_t* pidx = ptr_or_null<int64_t>(a.parent_idx);
  const float* pvals = ptr_or_null<float>(a.parent_vals);
  const int64_t* child_ptr = ptr_or_null<int64_t>(a.child_ptr);
  const int64_t* child_ids = ptr_or_null<int64_t>(a.child_ids);
  const int64_t kp = pidx ? a.parent_idx->size(1) : 0;
  TORCH_CHECK(Fl < std::numeric_limits<int32_t>::max(), "level_size ", Fl, " does not fit the 32-bit candidate keys");

  // Bias with the pruned mask folded in: a pruned feature scores -inf and never enters a top-k.
  std::vector<float> bias(Fl);
  for (int64_t f = 0; f < Fl; ++f) bias[f] = keep[f] ? b_enc[f] : kNegInf;
  bool use_edges = false;
  for (int64_t f = 0; pidx && child_ptr && f < Fl && !use_edges; ++f) use_edges = edge[f] != 0.f;
  // The screen pays when the M candidates are a small part of the level: scoring a candidate again
  // gathers its row (about 100 ns at d=768 here) where the bfloat16 GEMM saves about 6 ns per feature,
  // and a token whose cut its candidates cannot settle costs a second pass (bench/bench_screen.py; a
  // trained flat SAE on Gemma activations, F = 27 M, needed one for 14% of tokens and gained nothing
  // in the step). It also needs enough tokens and width to repay rounding W to bfloat16 and the bound
  // pass (at N=64, d=32 it took 1.9x the float32 GEMM's time; at N=64, d=768 and at N=1024, d=64 it
  // still gained 1.1-1.3x). d < 2^16 keeps gamma_d small.
  const int64_t M = std::min(Fl, 2 * K + 16);
  const bool pays = Fl >= 32 * M && N >= 32 && d >= 64;
  const bool screen = (a.screen == 2 || (a.screen == 1 && pays)) && !use_edges && d < (int64_t(1) << 16);
  const ScreenBounds sb = screen ? screen_bounds(xc, N, W, Fl, d, b_enc, keep) : ScreenBounds{};
  const int64_t kept_per_row = screen ? M : K;

  const int64_t row_blocks = (N + kDenseRows - 1) / kDenseRows;
  const int64_t tiles = (Fl + kDenseTile - 1) / kDenseTile;
  const int64_t splits = std::min(tiles, std::max<int64_t>(1, at::get_num_threads() / row_blocks));
  // The best K of every (row, feature split), best first; a row is written once all its splits are in.
  std::vector<std::vector<Candidate>> parts(N * splits);
  const int64_t capacity = TopKBuffer::capacity_for(kept_per_row);
  int64_t* out_idx = a.idx.data_ptr<int64_t>();
  float* out_score = a.scores.data_ptr<float>();
  int64_t* out_slot = a.parent_slot.data_ptr<int64_t>();
  const int64_t* parent = a.parent.data_ptr<int64_t>();
  auto write_row = [&](int64_t n) {
    std::vector<Candidate>& best = parts[n * splits];
    for (int64_t p = n * splits + 1; p < (n + 1) * splits; ++p) best.insert(best.end(), parts[p].begin(), parts[p].end());
    if (splits > 1) {  // the union's best K under the strict (score, key) order
      std::sort(best.begin(), best.end(), better);
      best.resize(std::min<size_t>(best.size(), K));
    }
    write_dense_row(best, n, K, parent, pidx, pvals, kp, out_idx, out_score, out_slot);
  };

  for_each_task(row_blocks * splits, [&](int64_t task) {
    SingleThreadedBlas blas_on_this_thread;
    const Tensor tile_buffer = at::empty({kDenseRows, kDenseTile}, at::kFloat);  // 64-byte aligned
    float* tile = tile_buffer.data_ptr<float>();
    std::vector<float> w_tile(std::is_same<W_t, float>::value || gemm_bf16 ? 0 : kDenseTile * d);
    // The screen's bfloat16 GEMM output, and the two steps both of its passes take per tile: the GEMM
    // of some tokens' bfloat16 rows with the tile's, and a token's upper bounds from its scores.
    const Tensor s_tile_bf16 = at::empty({screen ? kDenseRows * kDenseTile : 0}, at::kBFloat16);
    auto bf16_scores = [&](const Tensor& x_rows, int64_t f0, int64_t T) {
      BFloat16* out = s_tile_bf16.data_ptr<BFloat16>();
      Tensor s_blk = at::from_blob(out, {x_rows.size(0), T}, at::kBFloat16);
      at::mm_out(s_blk, x_rows, at::from_blob(const_cast<BFloat16*>(sb.wb + f0 * d), {T, d}, at::kBFloat16).t());
      return out;
    };
    auto upper_bounds = [&](const BFloat16* s_row, int64_t n, int64_t f0, int64_t T, float* out) {
      screen_upper_bounds(s_row, sb.w_lo_norm.data() + f0, sb.w_norm.data() + f0, ScreenBounds::kKappa, sb.a[n],
                          sb.c[n], T, out);
    };
    // Per row of the block, the (local feature, edge_weight * parent value) pairs of its active
    // parents' children, sorted by feature so each tile consumes a contiguous run.
    std::vector<std::vector<std::pair<int64_t, float>>> bonus(use_edges ? kDenseRows : 0);
    std::vector<size_t> cursor(kDenseRows);
    std::vector<float> buffer_s(kDenseRows * capacity);
    std::vector<int32_t> buffer_k(kDenseRows * capacity);
    TopKBuffer::Scratch scratch;
    const int64_t blk = task / splits, split = task % splits;
    const int64_t r0 = blk * kDenseRows, rows = std::min(kDenseRows, N - r0);
    const int64_t tile0 = tiles * split / splits, tile1 = tiles * (split + 1) / splits;
    std::vector<TopKBuffer> tops;
    for (int64_t r = 0; r < rows; ++r)
      tops.emplace_back(buffer_s.data() + r * capacity, buffer_k.data() + r * capacity, kept_per_row, &scratch);
    std::fill(cursor.begin(), cursor.end(), 0);
    for (int64_t r = 0; r < rows && use_edges; ++r) {
      bonus[r].clear();
      const int64_t n = r0 + r;
      for (int64_t j = 0; j < kp; ++j) {
        const float pv = pvals[n * kp + j];
        if (pv == 0.f) continue;
        const int64_t p = pidx[n * kp + j];
        for (int64_t c = child_ptr[p]; c < child_ptr[p + 1]; ++c)
          bonus[r].emplace_back(child_ids[c], edge[child_ids[c]] * pv);
      }
      std::stable_sort(bonus[r].begin(), bonus[r].end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    }
    const Tensor x_blk = at::from_blob(const_cast<float*>(xc + r0 * d), {rows, d}, at::kFloat);
    for (int64_t t = tile0; t < tile1; ++t) {
      const int64_t f0 = t * kDenseTile, T = std::min(kDenseTile, Fl - f0);
      if (screen) {
        const BFloat16* scores = bf16_scores(sb.xb.narrow(0, r0, rows), f0, T);
        for (int64_t r = 0; r < rows; ++r) {
          upper_bounds(scores + r * T, r0 + r, f0, T, tile + r * T);
          tops[r].offer(tile + r * T, sb.bias_up.data() + f0, T, static_cast<int32_t>(f0));
        }
        continue;
      }
      if (gemm_bf16) {
        mkl_gemm_bf16()(kCblasRowMajor, kCblasNoTrans, kCblasTrans, static_cast<int>(rows), static_cast<int>(T),
                        static_cast<int>(d), 1.f, a.xc.data_ptr<BFloat16>() + r0 * d, static_cast<int>(d),
                        W + f0 * d, static_cast<int>(d), 0.f, tile, static_cast<int>(T));
      } else {
        const float* w_rows = as_floats(W + f0 * d, w_tile.data(), T * d);
        Tensor s_blk = at::from_blob(tile, {rows, T}, at::kFloat);
        at::mm_out(s_blk, x_blk, at::from_blob(const_cast<float*>(w_rows), {T, d}, at::kFloat).t());
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = tile + r * T;
        if (use_edges) {
          size_t& i = cursor[r];
          for (; i < bonus[r].size() && bonus[r][i].first < f0 + T; ++i)
            if (bonus[r][i].first >= f0) srow[bonus[r][i].first - f0] += bonus[r][i].second;
        }
        tops[r].offer(srow, bias.data() + f0, T, static_cast<int32_t>(f0));
      }
    }
    if (!screen) {
      for (int64_t r = 0; r < rows; ++r) {
        tops[r].finish(parts[(r0 + r) * splits + split]);
        if (splits == 1) write_row(r0 + r);
      }
      return;
    }
    // Each row's candidates scored exactly; its K best are proven when the M-th best bound is below
    // the K-th best exact score (or fewer than M features had a finite bound: all were kept).
    std::vector<int64_t> ids;
    std::vector<float> w_row(std::is_same<W_t, float>::value ? 0 : d);
    std::vector<float> exact;
    // out = the best K of (dot + bias, id) over count candidates, as offer() would keep them.
    auto best_of = [&](int64_t count, const float* dots, auto id_of, std::vector<Candidate>& out) {
      out.clear();
      for (int64_t i = 0; i < count; ++i) {
        const float v = dots[i] + bias[id_of(i)];
        if (v > kNegInf) out.push_back({v, static_cast<int32_t>(id_of(i))});
      }
      const int64_t best = std::min<int64_t>(K, out.size());
      std::partial_sort(out.begin(), out.begin() + best, out.end(), better);
      out.resize(best);
    };
    auto rescore = [&](int64_t n, int64_t count, std::vector<Candidate>& out) {  // ids[0..count) -> out
      exact.resize(count);
      dot_rows(xc + n * d, W, d, ids.data(), count, exact.data());
      best_of(count, exact.data(), [&](int64_t i) { return ids[i]; }, out);
    };
    std::vector<int64_t> unsettled;  // rows of the block
    std::vector<float> floors;       // their K-th best exact score so far (-inf with fewer than K)
    // The block's candidates scored feature by feature: each candidate row of W is read once for all
    // the tokens that have it (rows x M reads of scattered rows would be most of the rescoring's
    // time). dot_rows sums a pair in the same order either way round, so the scores are the bits
    // rescore() gives.
    std::vector<std::vector<Candidate>> kept_rows(rows);
    std::vector<int64_t> group_start(Fl + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      tops[r].finish(kept_rows[r]);
      for (const Candidate& c : kept_rows[r]) ++group_start[c.key + 1];
    }
    for (int64_t f = 0; f < Fl; ++f) group_start[f + 1] += group_start[f];
    const int64_t pairs = group_start[Fl];
    std::vector<int64_t> pair_token(pairs), pair_slot(pairs);  // by feature: the token, and r * M + i
    {
      std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1);
      for (int64_t r = 0; r < rows; ++r)
        for (size_t i = 0; i < kept_rows[r].size(); ++i) {
          const int64_t at = fill[kept_rows[r][i].key]++;
          pair_token[at] = r0 + r, pair_slot[at] = r * M + static_cast<int64_t>(i);
        }
    }
    std::vector<float> pair_exact(pairs), slot_exact(rows * M);
    for (int64_t f = 0; f < Fl; ++f) {
      const int64_t b = group_start[f], m = group_start[f + 1] - b;
      if (m) dot_rows(as_floats(W + f * d, w_row.data(), d), xc, d, pair_token.data() + b, m, pair_exact.data() + b);
    }
    for (int64_t p = 0; p < pairs; ++p) slot_exact[pair_slot[p]] = pair_exact[p];
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<Candidate>& out = parts[(r0 + r) * splits + split];
      const std::vector<Candidate>& kept = kept_rows[r];
      const int64_t count = static_cast<int64_t>(kept.size());
      best_of(count, slot_exact.data() + r * M, [&](int64_t i) { return int64_t(kept[i].key); }, out);
      const bool full = static_cast<int64_t>(out.size()) == K;
      if (!(count < M || (full && kept[M - 1].score < out[K - 1].score))) {
        unsettled.push_back(r);
        floors.push_back(full ? out[K - 1].score : kNegInf);
      }
    }
    g_screened_rows.fetch_add(rows, std::memory_order_relaxed);
    g_screen_second_passes.fetch_add(static_cast<int64_t>(unsettled.size()), std::memory_order_relaxed);
    // A second pass over the unsettled rows (near-equal scores at their cut): every feature whose bound
    // reaches the row's floor is scored exactly. A feature below it scores below the floor, and the
    // floor is the K-th best exact score of features that are all among the new candidates.
    if (!unsettled.empty()) {
      const int64_t R = static_cast<int64_t>(unsettled.size());
      const Tensor x_rows = at::empty({R, d}, at::kBFloat16);
      for (int64_t i = 0; i < R; ++i)
        std::memcpy(x_rows.data_ptr<BFloat16>() + i * d, sb.xb.data_ptr<BFloat16>() + (r0 + unsettled[i]) * d,
                    d * sizeof(BFloat16));
      std::vector<std::vector<int64_t>> found(R);
      for (int64_t t = tile0; t < tile1; ++t) {
        const int64_t f0 = t * kDenseTile, T = std::min(kDenseTile, Fl - f0);
        const BFloat16* scores = bf16_scores(x_rows, f0, T);  // R <= kDenseRows rows fit its buffer
        for (int64_t i = 0; i < R; ++i) {
          float* bound = tile;  // the block's float tile is free now
          upper_bounds(scores + i * T, r0 + unsettled[i], f0, T, bound);
          for (int64_t j = 0; j < T; ++j)
            if (bound[j] + sb.bias_up[f0 + j] >= floors[i]) found[i].push_back(f0 + j);  // as offer() adds it
        }
      }
      for (int64_t i = 0; i < R; ++i) {
        ids = std::move(found[i]);
        rescore(r0 + unsettled[i], static_cast<int64_t>(ids.size()), parts[(r0 + unsettled[i]) * splits + split]);
      }
    }
    for (int64_t r = 0; r < rows && splits == 1; ++r) write_row(r0 + r);
  });
  if (splits > 1) {
    for_each_chunk(N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) write_row(n);
    });
  }
}

// ------------------------------------------------------------------------------------ routed encode
// Candidates of token n are the children of its active parents; candidate (j, c) is child c of the
// parent in slot j. Work runs over (token, slot) pairs sorted by parent, split into equal runs, so a
// parent's block of W_enc rows stays in L1 while its tokens pass and a popular parent is shared.
template <typename W_t>
void encode_routed_impl(const EncodeArgs& a) {
  const int64_t N = a.xc.size(0), d = a.xc.size(1), K = a.kmax;
  const int64_t kp = a.parent_idx->size(1), C = a.max_children, width = kp * C;
  const int64_t P = a.child_ptr->size(0) - 1;
  TORCH_CHECK(width < std::numeric_limits<int32_t>::max(), "kmax of the parent level x max_children = ", width,
              " does not fit the 32-bit candidate keys");
  const Tensor xc_float = a.xc.to(at::kFloat).contiguous();
  const float* xc = xc_float.data_ptr<float>();
  const W_t* W = a.W_enc.data_ptr<W_t>();
  const float* b_enc = a.b_enc.data_ptr<float>();
  const float* edge = a.edge_weight.data_ptr<float>();
  const int64_t* pidx = a.parent_idx->data_ptr<int64_t>();
  const float* pvals = a.parent_vals->data_ptr<float>();
  const int64_t* child_ptr = a.child_ptr->data_ptr<int64_t>();
  const int64_t* child_ids = a.child_ids->data_ptr<int64_t>();
  int64_t* out_idx = a.idx.data_ptr<int64_t>();
  float* out_score = a.scores.data_ptr<float>();
  int64_t* out_slot = a.parent_slot.data_ptr<int64_t>();

  // (token, slot) pairs of active parents, counting-sorted by parent.
  std::vector<int64_t> start(P + 1, 0);
  for (int64_t e = 0; e < N * kp; ++e) {
    if (pvals[e] == 0.f) continue;
    const int64_t p = pidx[e];
    TORCH_CHECK(p >= 0 && p < P, "parent_idx holds ", pidx[e], ", not a feature of the level above");
    ++start[p + 1];
  }
  for (int64_t p = 0; p < P; ++p) start[p + 1] += start[p];
  std::vector<int64_t> pairs(start[P]), position(N * kp);  // position[e]: where pair e sits in pairs
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < N * kp; ++e)
      if (pvals[e] != 0.f) position[e] = fill[pidx[e]], pairs[fill[pidx[e]]++] = e;
  }

  // Candidate scores by pair, in pairs' order: (pairs, C), row r the children of pair r's parent.
  // A run writes one contiguous block (a token-major buffer took a cache miss per score); only the
  // first `count` columns of a row are written, and only those are read back.
  std::unique_ptr<float[]> cand(new float[pairs.size() * C]);
  // A run of pairs with one parent is a small GEMM (its tokens x its children): each child row is
  // read once per run and dotted with all the run's tokens (four tokens share each load of it, and
  // the tokens' rows stay in L1), not once per (token, parent) pair from L2.
  // W_enc's pending step (if any) is taken for each child row just before the run that reads it.
  // Tasks hold whole runs, so no row is taken by two threads.
  const PendingRows pending = pending_rows(a.pending, a.W_enc, a.pending_offset);
  constexpr bool float_weights = std::is_same<W_t, float>::value;
  TORCH_CHECK(!pending.active() || float_weights, "a pending step needs float32 weights");
  // Where this level reads most of its rows (3/4 of its parents active), each row takes the step as
  // its run reads it: the step rides on the encode's pass. Where it reads fewer (the SPEC default
  // tree's bottom level, about half), the rows scattered here and the rest in the finishing pass cost
  // more than one pass in row order: every row of the level takes it first, in that order.
  int64_t active_parents = 0;
  for (int64_t p = 0; p < P; ++p) active_parents += start[p + 1] > start[p];
  const bool take_here = pending.active() && 4 * active_parents >= 3 * P;
  if (pending.active() && !take_here) take_pending_step(a.W_enc, a.pending_offset, a.pending);
  std::vector<int64_t> task_start(1, 0);
  for (int64_t r = 1; r < static_cast<int64_t>(pairs.size()); ++r)
    if (pidx[pairs[r]] != pidx[pairs[r - 1]] && r - task_start.back() >= 64) task_start.push_back(r);
  task_start.push_back(static_cast<int64_t>(pairs.size()));
  for_each_task(static_cast<int64_t>(task_start.size()) - 1, [&](int64_t task) {
    const int64_t e0 = task_start[task], e1 = task_start[task + 1];
    std::vector<int64_t> tokens;
    std::vector<float> dots, w_row(d), edge_term;
    for (int64_t r0 = e0, r1; r0 < e1; r0 = r1) {
      const int64_t p = pidx[pairs[r0]], first = child_ptr[p], count = child_ptr[p + 1] - first;
      for (r1 = r0 + 1; r1 < e1 && pidx[pairs[r1]] == p;) ++r1;
      const int64_t m = r1 - r0;
      tokens.resize(m), dots.resize(m), edge_term.resize(m);
      for (int64_t i = 0; i < m; ++i) tokens[i] = pairs[r0 + i] / kp, edge_term[i] = pvals[pairs[r0 + i]];
      float* run_scores = cand.get() + r0 * C;
      // The next run's child rows (its parent's block, about 100 KB at d=768) asked for into L2, a
      // child at a time, while this run computes (the hardware prefetcher alone left the dots
      // waiting on memory: 1.04-1.085x on the bottom level of the wide tree, three runs).
      const int64_t next_first = r1 < e1 ? child_ptr[pidx[pairs[r1]]] : 0;
      const int64_t next_count = r1 < e1 ? child_ptr[pidx[pairs[r1]] + 1] - next_first : 0;
      if (take_here)
        take_pending_rows(reinterpret_cast<float*>(const_cast<W_t*>(W)), child_ids + first, 0, count, d, pending);
      for (int64_t c = 0; c < count; ++c) {
        const int64_t id = child_ids[first + c];
        if (c < next_count) prefetch_to_l2(W + child_ids[next_first + c] * d, d * static_cast<int64_t>(sizeof(W_t)));
        dot_rows(as_floats(W + id * d, w_row.data(), d), xc, d, tokens.data(), m, dots.data());
        const float b = b_enc[id], e = edge[id];
        for (int64_t i = 0; i < m; ++i) run_scores[i * C + c] = dots[i] + b + e * edge_term[i];
      }
    }
  });

  // Each token's best K of its candidates, offered slot by slot (active slots, their parent's
  // children only); key q = j * C + c.
  for_each_chunk(N, 32, [&](int64_t n0, int64_t n1) {
    const int64_t capacity = TopKBuffer::capacity_for(K);
    std::vector<float> buffer_s(capacity);
    std::vector<int32_t> buffer_k(capacity);
    std::vector<Candidate> best;
    TopKBuffer::Scratch scratch;
    for (int64_t n = n0; n < n1; ++n) {
      TopKBuffer top(buffer_s.data(), buffer_k.data(), K, &scratch);
      for (int64_t j = 0; j < kp; ++j) {
        if (pvals[n * kp + j] == 0.f) continue;
        const int64_t p = pidx[n * kp + j];
        top.offer(cand.get() + position[n * kp + j] * C, nullptr, child_ptr[p + 1] - child_ptr[p],
                  static_cast<int32_t>(j * C));
      }
      const int64_t kept = top.finish(best);
      for (int64_t s = 0; s < K; ++s) {
        const bool filled = s < kept;
        const int64_t q = filled ? best[s].key : 0, j = q / C;
        out_idx[n * K + s] = filled ? child_ids[child_ptr[pidx[n * kp + j]] + q % C] : 0;
        out_score[n * K + s] = filled ? best[s].score : kNegInf;
        out_slot[n * K + s] = filled ? j : -1;
      }
    }
  });
}

// ------------------------------------------------------------------------------------ encode backward
// out = sum over the tokens of g_xc = sum_f g_b[f] W[f] over the features with entries: one read of
// each touched row in id order, where g_xc itself gathers a row per kept slot (half the routed
// backward's time at F=65536, N=1024). Partial sums over fixed chunks of those features, added in
// chunk order: the same bits with any thread count.
template <typename W_t>
void xc_sum_from_features(const FeatureGroups& groups, int64_t F, const float* g_b, const W_t* W, int64_t d, float* out) {
  constexpr int64_t kFeaturesPerChunk = 256;
  std::vector<int64_t> touched;
  for (int64_t f = 0; f < F; ++f)
    if (groups.start[f + 1] > groups.start[f]) touched.push_back(f);
  const int64_t T = static_cast<int64_t>(touched.size()), chunks = (T + kFeaturesPerChunk - 1) / kFeaturesPerChunk;
  std::vector<float> partial(chunks * d, 0.f);
  for_each_chunk(T, kFeaturesPerChunk, [&](int64_t t0, int64_t t1) {
    std::vector<float> alpha(t1 - t0);
    for (int64_t t = t0; t < t1; ++t) alpha[t - t0] = g_b[touched[t]];
    axpy_rows(partial.data() + (t0 / kFeaturesPerChunk) * d, alpha.data(), W, d, touched.data() + t0, t1 - t0);
  });
  std::fill(out, out + d, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < d; ++i) out[i] += partial[c * d + i];
}

template <typename W_t>
c10::optional<Tensor> encode_backward_impl(const EncodeGrads& a) {
  const int64_t N = a.g_scores.size(0), K = a.g_scores.size(1), d = a.xc.size(1), F = a.W_enc.size(0);
  const float* g = a.g_scores.data_ptr<float>();
  const int64_t* idx = a.idx.data_ptr<int64_t>();
  const int64_t* slot = a.parent_slot.data_ptr<int64_t>();
  const float* xc = a.xc.data_ptr<float>();
  const W_t* W = a.W_enc.data_ptr<W_t>();
  const float* edge = a.edge_weight.data_ptr<float>();
  const float* pvals = ptr_or_null<float>(a.parent_vals);
  const int64_t kp = pvals ? a.parent_vals->size(1) : 0;
  float* g_xc = ptr_or_null<float>(a.g_xc);
  TORCH_CHECK(!a.compact_W_enc || a.g_W_enc.has_value(), "compact_W_enc needs the g_W_enc buffer");
  if (!a.compact_W_enc) advise_huge_pages(a.g_W_enc);
  float* g_b = a.g_b_enc.data_ptr<float>();
  float* g_edge = ptr_or_null<float>(a.g_edge);
  float* g_parent = ptr_or_null<float>(a.g_parent_vals);

  // A slot with zero gradient adds nothing anywhere: only the kept slots are visited.
  const FeatureGroups groups = group_by_feature(idx, N * K, F, [&](int64_t e) { return g[e] != 0.f; });
  const GradientRows g_W =
      gradient_rows(groups, F, ptr_or_null<float>(a.g_W_enc), a.compact_W_enc, [](int64_t) { return true; });
  float* row_norms = nullptr;
  if (a.g_W_row_sq_norms.has_value() && g_W.compact()) {
    TORCH_CHECK(a.g_W_row_sq_norms->numel() >= a.g_W_enc->size(0), "g_W_row_sq_norms: a float per row");
    row_norms = a.g_W_row_sq_norms->data_ptr<float>();
  }
  auto parent_val = [&](int64_t e) {
    const int64_t s = slot[e];
    return s >= 0 ? pvals[(e / K) * kp + s] : 0.f;
  };
  auto per_feature = [&](int64_t f0, int64_t f1) {
    RowTerms terms;  // g_W_enc[f] = sum over f's slots of g * xc[n]
    std::vector<float> row(d);
    for (int64_t f = f0; f < f1; ++f) {
      terms.clear();
      float sum_g = 0.f, sum_edge = 0.f;
      for (int64_t i = groups.start[f]; i < groups.start[f + 1]; ++i) {
        const int64_t e = groups.entry[i];
        sum_g += g[e];
        if (g_edge) sum_edge += g[e] * parent_val(e);
        terms.add(e / K, g[e]);
      }
      if (g_W.base && groups.start[f] == groups.start[f + 1]) {
        if (!g_W.compact()) zero_row_streaming(g_W.row(f, d), d);
      } else if (g_W.base) {
        // Built in L1, then streamed out: the output's lines are never read.
        std::fill(row.begin(), row.end(), 0.f);
        terms.accumulate_into(row.data(), xc, d);
        if (row_norms) row_norms[g_W.row_of[f]] = gradient_row_sq_norm(row.data(), nullptr, d);
        store_row_streaming(g_W.row(f, d), row.data(), d);
      }
      g_b[f] = sum_g;
      if (g_edge) g_edge[f] = sum_edge;
    }
    streaming_fence();
  };
  auto per_token = [&](int64_t n0, int64_t n1) {
    RowTerms terms;  // g_xc[n] = sum over n's kept slots of g * W_enc[idx]
    for (int64_t n = n0; n < n1; ++n) {
      terms.clear();
      if (g_parent) std::fill(g_parent + n * kp, g_parent + (n + 1) * kp, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = n * K + j;
        if (g[e] == 0.f) continue;
        terms.add(idx[e], g[e]);
        if (g_parent && slot[e] >= 0) g_parent[n * kp + slot[e]] += g[e] * edge[idx[e]];
      }
      if (g_xc) {
        std::fill(g_xc + n * d, g_xc + (n + 1) * d, 0.f);
        terms.accumulate_into(g_xc + n * d, W, d);
      }
    }
  };
  for_features_and_rows(groups, F, per_feature, g_xc || g_parent ? N : 0, per_token);
  if (a.g_xc_sum.has_value()) xc_sum_from_features(groups, F, g_b, W, d, a.g_xc_sum->data_ptr<float>());
  return g_W.rows;
}

// ------------------------------------------------------------------------------------ decode
// Slots are the levels' widths side by side, bottom first: level l owns slots stops[l]..stops[l+1].
std::vector<int64_t> level_stops(const std::vector<int64_t>& widths) {
  std::vector<int64_t> stops(1, 0);
  for (int64_t w : widths) stops.push_back(stops.back() + w);
  return stops;
}

std::vector<int64_t> slot_levels(const std::vector<int64_t>& widths) {
  std::vector<int64_t> level;
  for (size_t l = 0; l < widths.size(); ++l) level.insert(level.end(), widths[l], static_cast<int64_t>(l));
  return level;
}

template <typename W_t, typename Out_t>
void decode_forward_impl(const DecodeArgs& a) {
  const int64_t N = a.idx.size(0), K = a.idx.size(1), d = a.W_dec.size(1), F = a.W_dec.size(0);
  const int64_t L = static_cast<int64_t>(a.level_widths.size());
  const int64_t* idx = a.idx.data_ptr<int64_t>();
  const float* vals = a.vals.data_ptr<float>();
  const W_t* W = a.W_dec.data_ptr<W_t>();
  const float* gain = a.level_gain.data_ptr<float>();
  const float* b_dec = a.b_dec.data_ptr<float>();
  Out_t* out = a.out.data_ptr<Out_t>();
  const std::vector<int64_t> level = slot_levels(a.level_widths), stops = level_stops(a.level_widths);
  for (int64_t e = 0; e < N * K; ++e)
    TORCH_CHECK(idx[e] >= 0 && idx[e] < F, "idx holds feature id ", idx[e], " outside [0, ", F, ")");

  for_each_chunk(N, 32, [&](int64_t n0, int64_t n1) {
    std::vector<float> sum(d), running(d);
    RowTerms terms;
    // sum = sum over token n's slots j0..j1 with a nonzero value of vals * W_dec[idx] (* gain_l).
    auto sum_slots = [&](int64_t n, int64_t j0, int64_t j1, bool times_gain) {
      terms.clear();
      for (int64_t j = j0; j < j1; ++j)
        if (vals[n * K + j] != 0.f) terms.add(idx[n * K + j], vals[n * K + j] * (times_gain ? gain[level[j]] : 1.f));
      std::fill(sum.begin(), sum.end(), 0.f);
      terms.accumulate_into(sum.data(), W, d);
    };
    for (int64_t n = n0; n < n1; ++n) {
      if (!a.prefixes) {  // x_hat = b_dec + sum_j gain_l(j) * vals[n, j] * W_dec[idx[n, j]]
        sum_slots(n, 0, K, true);
        for (int64_t i = 0; i < d; ++i) out[n * d + i] = static_cast<Out_t>(sum[i] + b_dec[i]);
        continue;
      }
      // P_m = b_dec + sum_{l >= m} gain_l * D_l, built from the top level down.
      std::copy(b_dec, b_dec + d, running.begin());
      for (int64_t l = L - 1; l >= 0; --l) {
        sum_slots(n, stops[l], stops[l + 1], false);
        for (int64_t i = 0; i < d; ++i) running[i] += gain[l] * sum[i];
        Out_t* dst = out + (l * N + n) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<Out_t>(running[i]);
      }
    }
  });
}

template <typename W_t>
c10::optional<Tensor> decode_backward_impl(const DecodeGrads& a) {
  const int64_t N = a.idx.size(0), K = a.idx.size(1), d = a.W_dec.size(1), F = a.W_dec.size(0);
  const int64_t L = static_cast<int64_t>(a.level_widths.size());
  // g_levels[l]: the gradient reaching level l's decode, (L, N, d) with prefixes (a running sum of
  // the prefixes' gradients, computed by the glue) else the one (N, d) gradient of x_hat.
  const float* g_levels = a.g_levels.data_ptr<float>();
  const int64_t* idx = a.idx.data_ptr<int64_t>();
  const float* vals = a.vals.data_ptr<float>();
  const W_t* W = a.W_dec.data_ptr<W_t>();
  const float* gain = a.level_gain.data_ptr<float>();
  float* g_vals = ptr_or_null<float>(a.g_vals);
  TORCH_CHECK(!a.compact_W_dec || a.g_W_dec.has_value(), "compact_W_dec needs the g_W_dec buffer");
  const bool need_W = a.g_W_dec.has_value();
  if (!a.compact_W_dec) advise_huge_pages(a.g_W_dec);
  float* g_gain = a.g_level_gain.data_ptr<float>();
  float* g_b = a.g_b_dec.data_ptr<float>();
  const std::vector<int64_t> level = slot_levels(a.level_widths);
  // The row of g_levels, viewed as one (L * N, d) matrix (L = 1 without prefixes), slot e reads.
  auto g_row_id = [&](int64_t e) { return (a.prefixes ? level[e % K] * N : 0) + e / K; };

  // One pass over the slots grouped by feature: W_dec[f] is read once (into L1) for all its slots,
  // each slot's gradient row g_l[n] once for both its dot product (-> g_vals) and, where the value
  // is nonzero, its share of g_W_dec[f] = sum gain_l * vals * g_l[n].
  const bool need_dots = g_vals != nullptr;
  std::vector<float> dots(need_dots ? N * K : 0);
  // active_only: g_vals only where the value is nonzero (0 elsewhere), so a slot of value 0 needs
  // nothing at all. A layer's inactive candidate slots (most of them under batch selection) then
  // cost neither a dot product nor a read of their feature's row.
  if (need_dots && a.grad_active_only) std::fill(g_vals, g_vals + N * K, 0.f);
  const FeatureGroups groups = group_by_feature(idx, N * K, F, [&](int64_t e) {
    return vals[e] != 0.f ? need_dots || need_W : need_dots && !a.grad_active_only;
  });
  // The groups also hold slots of value 0 when dots are needed (empty slots among them, whose id
  // may name any feature, a pruned one too): a row is only for a feature with a nonzero value.
  const GradientRows g_W = gradient_rows(groups, F, ptr_or_null<float>(a.g_W_dec), a.compact_W_dec, [&](int64_t f) {
    for (int64_t i = groups.start[f]; i < groups.start[f + 1]; ++i)
      if (vals[groups.entry[i]] != 0.f) return true;
    return false;
  });
  float* row_norms = nullptr;
  if (a.g_W_row_sq_norms.has_value() && g_W.compact() && std::is_same<W_t, float>::value) {
    TORCH_CHECK(a.g_W_row_sq_norms->numel() >= 2 * a.g_W_dec->size(0), "g_W_row_sq_norms: 2 floats per row");
    row_norms = a.g_W_row_sq_norms->data_ptr<float>();
  }
  auto per_feature = [&](int64_t f0, int64_t f1) {
    std::vector<float> w_row(d), row_dots, row(d);
    std::vector<int64_t> rows;
    RowTerms terms;
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t first = groups.start[f], count = groups.start[f + 1] - first;
      if (count == 0) {
        if (g_W.base && !g_W.compact()) zero_row_streaming(g_W.row(f, d), d);
        continue;
      }
      // The next feature with entries: its W_dec row (scattered, cold) asked for while this one runs.
      for (int64_t next = f + 1; next < f1; ++next)
        if (groups.start[next + 1] > groups.start[next]) {
          prefetch_to_l2(W + next * d, d * static_cast<int64_t>(sizeof(W_t)));
          break;
        }
      // The gradient row is built in L1 (`row`), then streamed out to `out_row` (its lines never read).
      float* out_row = g_W.base && (!g_W.compact() || g_W.row_of[f] >= 0) ? g_W.row(f, d) : nullptr;
      if (need_dots) {
        rows.resize(count);
        for (int64_t i = 0; i < count; ++i) rows[i] = g_row_id(groups.entry[first + i]);
        row_dots.resize(count);
        dot_rows(as_floats(W + f * d, w_row.data(), d), g_levels, d, rows.data(), count, row_dots.data());
        for (int64_t i = 0; i < count; ++i) {
          const int64_t e = groups.entry[first + i];
          dots[e] = row_dots[i];
          g_vals[e] = row_dots[i] * gain[level[e % K]];
        }
      }
      if (!out_row) continue;
      terms.clear();
      for (int64_t i = 0; i < count; ++i) {
        const int64_t e = groups.entry[first + i];
        if (vals[e] != 0.f) terms.add(g_row_id(e), vals[e] * gain[level[e % K]]);
      }
      std::fill(row.begin(), row.end(), 0.f);
      terms.accumulate_into(row.data(), g_levels, d);
      if (row_norms) {  // the finished row and its W_dec row are both in L1
        const int64_t r = g_W.row_of[f];
        row_norms[2 * r] = gradient_row_sq_norm(row.data(), nullptr, d);
        row_norms[2 * r + 1] = gradient_row_sq_norm(row.data(), reinterpret_cast<const float*>(W) + f * d, d);
      }
      store_row_streaming(out_row, row.data(), d);
    }
    streaming_fence();
  };
  // g_b_dec sums every row of the output's gradient: partial sums over fixed chunks of rows.
  const float* g_out = a.g_out.data_ptr<float>();
  const int64_t out_rows = a.g_out.numel() / std::max<int64_t>(d, 1);
  std::vector<float> b_part(((out_rows + kReduceRows - 1) / kReduceRows) * d, 0.f);
  auto per_row_chunk = [&](int64_t r0, int64_t r1) {
    float* part = b_part.data() + (r0 / kReduceRows) * d;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < d; ++i) part[i] += g_out[r * d + i];
  };
  for_features_and_rows(groups, F, per_feature, out_rows, per_row_chunk);

  std::fill(g_b, g_b + d, 0.f);
  for (size_t c = 0; c < b_part.size(); c += d)
    for (int64_t i = 0; i < d; ++i) g_b[i] += b_part[c + i];
  // g_gain[l] = sum vals * <g_l, W_dec[idx]> over all N * K slots, in slot order, summed in double:
  // a float32 running sum of 32k terms drifts by ~1e-5 relative, above float32's tolerance.
  std::vector<double> gain_sum(L, 0.0);
  for (int64_t e = 0; need_dots && e < N * K; ++e) gain_sum[level[e % K]] += double(vals[e]) * double(dots[e]);
  for (int64_t l = 0; l < L; ++l) g_gain[l] = static_cast<float>(gain_sum[l]);
  return g_W.rows;
}

// ------------------------------------------------------------------------------------ gradient pool
// Weight gradients are F x d float32 buffers that a training loop drops every step (zero_grad sets
// them to None) and the next step allocates again. Large allocations are fresh mmap'd pages, and the
// first write faults through every one of them: a fresh 50 MB buffer took 40-80 ms to fill here,
// as long as the sparse kernel that fills it. A gradient freed by the caller comes back to this
// pool instead, still mapped (with huge pages advised), and the next gradient of that size reuses it.
class GradientPool {
 public:
  static GradientPool& instance() {
    static GradientPool* pool = new GradientPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(block != nullptr, "out of memory allocating a ", bytes, "-byte gradient");
#if defined(MADV_HUGEPAGE)
    madvise(block, bytes, MADV_HUGEPAGE);
#endif
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::vector<void*>& same = free_[bytes];
      // A step holds a few gradients of one size (W_enc's, W_dec's); more are not worth keeping.
      if (same.size() < kPerSize && cached_bytes_ + bytes <= kMaxCachedBytes) {
        same.push_back(block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : free_)
      for (void* block : entry.second) std::free(block);
    free_.clear();
    cached_bytes_ = 0;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  static constexpr size_t kHugePage = size_t(2) << 20;

 private:
  static constexpr size_t kPerSize = 4;
  static constexpr size_t kMaxCachedBytes = size_t(16) << 30;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_bytes_ = 0;
};

}  // namespace

Tensor pooled_gradient(const std::vector<int64_t>& sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t huge = GradientPool::kHugePage;
  const size_t bytes = ((std::max<int64_t>(numel, 1) * sizeof(float) + huge - 1) / huge) * huge;
  void* block = GradientPool::instance().take(bytes);
  return at::from_blob(block, sizes, [bytes](void* p) { GradientPool::instance().give(p, bytes); },
                       at::TensorOptions().dtype(at::kFloat));
}

void release_gradient_pool() { GradientPool::instance().release(); }

int64_t gradient_pool_bytes() { return static_cast<int64_t>(GradientPool::instance().cached_bytes()); }

// ------------------------------------------------------------------------------------ entry points
std::vector<int64_t> screen_stats(bool reset) {
  const std::vector<int64_t> out = {g_screened_rows.load(), g_screen_second_passes.load()};
  if (reset) g_screened_rows = 0, g_screen_second_passes = 0;
  return out;
}

void encode_forward(const EncodeArgs& args) {
  // A dense level reads every row: its share of a pending step is taken first, in one pass.
  if (!args.routed || args.max_children == 0) take_pending_step(args.W_enc, args.pending_offset, args.pending);
  if (args.kmax == 0 || args.xc.size(0) == 0) return;
  const bool bf16 = args.W_enc.scalar_type() == at::kBFloat16;
  if (args.routed) {
    if (args.max_children == 0) {
      args.idx.fill_(0), args.scores.fill_(kNegInf), args.parent_slot.fill_(-1);
      return;
    }
    bf16 ? encode_routed_impl<BFloat16>(args) : encode_routed_impl<float>(args);
  } else {
    bf16 ? encode_dense_impl<BFloat16>(args) : encode_dense_impl<float>(args);
  }
}

c10::optional<Tensor> encode_backward(const EncodeGrads& grads) {
  return grads.W_enc.scalar_type() == at::kBFloat16 ? encode_backward_impl<BFloat16>(grads)
                                                    : encode_backward_impl<float>(grads);
}

void decode_forward(const DecodeArgs& args) {
  const bool bf16 = args.W_dec.scalar_type() == at::kBFloat16;
  bf16 ? decode_forward_impl<BFloat16, BFloat16>(args) : decode_forward_impl<float, float>(args);
}

c10::optional<Tensor> decode_backward(const DecodeGrads& grads) {
  return grads.W_dec.scalar_type() == at::kBFloat16 ? decode_backward_impl<BFloat16>(grads)
                                                    : decode_backward_impl<float>(grads);
}

}  // namespace hsae_cpu
