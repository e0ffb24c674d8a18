// One row of the trainer's AdamW step (csrc/adamw_rows.cpp takes every row of a matrix in one pass;
// the routed encode can take a pending step's rows as it reads them): shared so both run the same
// arithmetic, bit for bit.
#pragma once

#include "vector_loops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace hsae_cpu {

// <a, b> in kLanes partial sums (reduce_lanes: the same bits on every machine width).
HSAE_INLINE float row_dot(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  for (int64_t l = 0; i + l < d; ++l) acc[l] += a[i + l] * b[i + l];
  return reduce_lanes(acc);
}

// c = (g . w) / max(|w|^2, 1e-12): the share of g along w that the projection removes.
HSAE_INLINE float parallel_coef(const float* g, const float* w, int64_t d) {
  return row_dot(g, w, d) / std::max(row_dot(w, w, d), 1e-12f);
}

struct AdamWScalars {
  float decay, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction2_sqrt, step_size, eps, grad_scale;
};
// A step's scalars as floats in a tensor (step_scalars, a pending step): the struct's fields in order.
constexpr int64_t kStepScalars = sizeof(AdamWScalars) / sizeof(float);
static_assert(sizeof(AdamWScalars) == kStepScalars * sizeof(float), "AdamWScalars holds floats only");

// A step's scalars as adamw_rows computes them from its double arguments (the same floats wherever
// the step is taken).
inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  double bias_correction1, double bias_correction2, double grad_scale) {
  return AdamWScalars{
      static_cast<float>(1.0 - lr * weight_decay),
      static_cast<float>(1.0 - beta1),
      static_cast<float>(beta2),
      static_cast<float>(1.0 - beta2),
      static_cast<float>(1.0 / std::sqrt(bias_correction2)),
      static_cast<float>(lr / bias_correction1),
      static_cast<float>(eps),
      static_cast<float>(grad_scale),
  };
}

// torch's fused AdamW per element (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, ADAMW mode) with
// g = (g - c * w) * grad_scale first: the projected, clipped gradient of the unfused path. Then,
// with unit_rows, the row divided by its norm while it is still in L1. Two of torch's divisions
// (by sqrt(bias_correction2), and the renorm's) are products with the reciprocal here: a division
// costs several multiplies' time, and the pass is bound by them, not by memory (measured: 121 ms
// with three divisions per element at F=65536, d=768). That changes the last bit, no more.
//
// With row gradients (rows given), g holds the touched rows only (row r is feature rows[r]'s) and
// every other row steps with gradient zero: the same arithmetic on a zero (projected and scaled, a
// zero gradient stays +0), so the result is the one of the dense gradient with its zero rows.
HSAE_INLINE void update_row(float* pf, const float* gf, float* mf, float* vf, int64_t d, const AdamWScalars& s,
                            bool project, bool unit_rows) {
  const float c = project && gf ? parallel_coef(gf, pf, d) : 0.f;
  for (int64_t i = 0; i < d; ++i) {
    const float grad = gf ? (gf[i] - c * pf[i]) * s.grad_scale : 0.f;
    const float param = pf[i] * s.decay;
    const float avg = mf[i] + s.one_minus_beta1 * (grad - mf[i]);  // lerp(m, grad, 1 - beta1), weight < 0.5
    const float avg_sq = vf[i] * s.beta2 + grad * grad * s.one_minus_beta2;
    const float denom = std::sqrt(avg_sq) * s.inv_bias_correction2_sqrt + s.eps;
    mf[i] = avg;
    vf[i] = avg_sq;
    pf[i] = param - s.step_size * avg / denom;
  }
  if (unit_rows) {
    const float inv_norm = 1.f / std::max(std::sqrt(row_dot(pf, pf, d)), 1e-12f);
    for (int64_t i = 0; i < d; ++i) pf[i] *= inv_norm;
  }
}

// update_row for a row with gradient row gf or none (gf null): two calls with the branch outside, so
// each inlined copy is compiled for its case (the gradient-free one loads no gradient, projects nothing).
HSAE_INLINE void step_row(float* pf, const float* gf, float* mf, float* vf, int64_t d, const AdamWScalars& s,
                          bool project, bool unit_rows) {
  if (gf) {
    update_row(pf, gf, mf, vf, d, s, project, unit_rows);
  } else {
    update_row(pf, nullptr, mf, vf, d, s, project, unit_rows);
  }
}

// An AdamW step of W_enc not yet taken (MaskedAdamW.encoder_step_in_forward): each row's share is
// taken once, before the row is next read. Row f of the whole matrix: moments m, v (F, d), gradient
// row g + g_index[f] * d (g_index[f] < 0: none), stepped only where keep[f]; done[f] says taken.
struct PendingRows {
  float* m = nullptr;
  float* v = nullptr;
  const float* g = nullptr;
  const int64_t* g_index = nullptr;
  const bool* keep = nullptr;
  uint8_t* done = nullptr;
  AdamWScalars s{};
  int64_t offset = 0;  // the first row of the slice the caller passes (a level of W_enc)
  bool active() const { return done != nullptr; }
};

// Row `row` of the slice W (offset rows into the matrix) takes its pending step, if not taken yet.
// Exactly adamw_rows' step for W_enc (no projection, no renorm), so the same bits.
HSAE_INLINE void take_pending_row(float* W, int64_t row, int64_t d, const PendingRows& p) {
  const int64_t f = p.offset + row;
  if (p.done[f]) return;
  p.done[f] = 1;
  if (p.keep && !p.keep[f]) return;
  const int64_t gi = p.g_index[f];
  step_row(W + row * d, gi >= 0 ? p.g + gi * d : nullptr, p.m + f * d, p.v + f * d, d, p.s, false, false);
}

}  // namespace hsae_cpu
