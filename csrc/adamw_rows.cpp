// The trainer's parameter update of one (F, d) float32 weight matrix in a single pass over its rows:
// the decoder's parallel gradient removed, the clip factor applied, AdamW (torch's fused-AdamW
// arithmetic), the row renormalized, pruned rows left alone. Done as torch ops, that is five or
// six passes over F x d buffers (projection, clip norm, clip scale, AdamW, renorm), each a full trip
// through memory: at F=65536, d=768 about 90 ms of a step on a 2-core CPU, the optimizer's own
// 74 ms not counted. Here each row is read once into L1 and every step runs on it there.
// Contract and reference: hsae_fast/train/optim.py (MaskedAdamW.update and the unfused path).
#include "hsae_cpu.h"
#include "parallel.h"
#include "vector_loops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

namespace hsae_cpu {
namespace {

// Rows per task, tasks taken as threads get free (for_each_chunk): the threads then stream nearby
// rows of the three matrices at once. A static split (each thread its own half) took 24-25 ms for
// W_enc's pass at F=65536, d=768 where these chunks take 18-19 (2-core EPYC, 2 MiB pages).
constexpr int64_t kRowsPerTask = 16;

void check_rows(const at::Tensor& t, const char* name, int64_t F, int64_t d) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == F && t.size(1) == d, name, " must have shape (", F, ", ", d, "), got ",
              t.sizes());
}

// |g - c w|^2 for the clip norm, from one pass over both rows: |g|^2 - c (2 g.w - c |w|^2), the three
// lane sums in float, the rest in double (clamped at 0 where g runs along w). Three passes (g.w, |w|^2,
// then |g - c w|^2) took 6.5 ms for a routed step's 19,281 decoder rows at d=768, this 5.6, and a
// plain |g|^2 2.0: most of it is reading the scattered rows of W.
HSAE_INLINE float projected_sq_norm(const float* g, const float* w, int64_t d) {
  Lanes gg = {}, gw = {}, ww = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    const Lanes a = load_lanes(g + i), b = load_lanes(w + i);
    gg += a * a, gw += a * b, ww += b * b;
  }
  if (i < d) {
    const Lanes a = load_lanes_partial(g + i, d - i), b = load_lanes_partial(w + i, d - i);
    gg += a * a, gw += a * b, ww += b * b;
  }
  const double sgg = reduce_lanes(gg), sgw = reduce_lanes(gw), sww = reduce_lanes(ww);
  const double c = sgw / std::max(sww, 1e-12);
  return static_cast<float>(std::max(0.0, sgg - c * (2.0 * sgw - c * sww)));
}

}  // namespace

HSAE_VECTOR_CLONES float gradient_row_sq_norm(const float* g, const float* w, int64_t d) {
  return w ? projected_sq_norm(g, w, d) : row_dot(g, g, d);
}

namespace {

// out[r] = |g_r - c w_f|^2 (w given) or |g_r|^2, for r0 <= r < r1, where f = rows[r] (rows null: f = r).
void sq_norm_rows(const float* g, const float* w, const int64_t* rows, int64_t d, int64_t r0, int64_t r1,
                  double* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t f = rows ? rows[r] : r;
    out[r] = gradient_row_sq_norm(g + r * d, w ? w + f * d : nullptr, d);
  }
}

// row_grads: g holds the rows `rows` (num_rows of them, possibly none: then rows and g may be null,
// so the flag, not the pointer, says which kind of gradient this is), else every row.
HSAE_VECTOR_CLONES void update_rows(float* p, const float* g, bool row_grads, const int64_t* rows, int64_t num_rows,
                                    float* m, float* v, int64_t d, const bool* keep, int64_t f0, int64_t f1,
                                    const AdamWScalars& s, bool project, bool unit_rows) {
  // r: the first gradient row at or after f0 (row gradients only)
  int64_t r = row_grads && num_rows > 0 ? std::lower_bound(rows, rows + num_rows, f0) - rows : 0;
  for (int64_t f = f0; f < f1; ++f) {
    const float* gf = row_grads ? nullptr : g + f * d;
    if (row_grads) {
      const bool touched = r < num_rows && rows[r] == f;
      gf = touched ? g + r * d : nullptr;
      r += touched;
    }
    if (keep && !keep[f]) continue;  // a pruned feature: its row, moments and all, never moves
    step_row(p + f * d, gf, m + f * d, v + f * d, d, s, project, unit_rows);
  }
}

// A row gradient's rows must be strictly increasing ids below F: the update walks them in order.
void check_gradient_rows(const at::Tensor& rows, int64_t R, int64_t F) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1 &&
                  rows.size(0) == R,
              "grad_rows must be a contiguous int64 CPU tensor of ", R, " entries (one per gradient row), got ",
              rows.scalar_type(), " of shape ", rows.sizes());
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < F && (i == 0 || r[i] > r[i - 1]),
                "grad_rows must be strictly increasing feature ids in [0, ", F, "); entry ", i, " is ", r[i]);
}

}  // namespace

double grad_sq_norm(const at::Tensor& grad, const OptionalTensor& project_onto, const OptionalTensor& grad_rows) {
  const int64_t R = grad.size(0), d = grad.dim() == 2 ? grad.size(1) : 0;
  check_rows(grad, "grad", R, d);
  const int64_t F = project_onto.has_value() ? project_onto->size(0) : R;
  if (project_onto.has_value()) check_rows(*project_onto, "param", F, d);
  if (grad_rows.has_value()) check_gradient_rows(*grad_rows, R, project_onto.has_value() ? F : INT64_MAX);
  TORCH_CHECK(grad_rows.has_value() || R == F, "grad has ", R, " rows and param ", F, ": pass grad_rows");
  const float* g = grad.data_ptr<float>();
  const float* w = project_onto.has_value() ? project_onto->data_ptr<float>() : nullptr;
  const int64_t* ids = grad_rows.has_value() ? grad_rows->data_ptr<int64_t>() : nullptr;
  // One float sum per row, then the rows in order in double: the same value with any thread count
  // (and with row gradients the dense gradient's value: its other rows add exact zeros).
  std::vector<double> sums(R);
  for_each_chunk(R, kRowsPerTask, [&](int64_t r0, int64_t r1) { sq_norm_rows(g, w, ids, d, r0, r1, sums.data()); });
  double total = 0.0;
  for (double r : sums) total += r;
  return total;
}

void adamw_rows(const AdamWRowsArgs& a) {
  const int64_t F = a.param.size(0), d = a.param.dim() == 2 ? a.param.size(1) : 0;
  check_rows(a.param, "param", F, d);
  const int64_t R = a.grad.size(0);
  check_rows(a.grad, "grad", a.grad_rows.has_value() ? R : F, d);
  if (a.grad_rows.has_value()) check_gradient_rows(*a.grad_rows, R, F);
  check_rows(a.exp_avg, "exp_avg", F, d);
  check_rows(a.exp_avg_sq, "exp_avg_sq", F, d);
  const bool* keep = nullptr;
  if (a.keep_rows.has_value()) {
    TORCH_CHECK(a.keep_rows->scalar_type() == at::kBool && a.keep_rows->is_contiguous() && a.keep_rows->numel() == F,
                "keep_rows must be a contiguous bool tensor of ", F, " entries");
    keep = a.keep_rows->data_ptr<bool>();
  }
  TORCH_CHECK(a.bias_correction1 > 0 && a.bias_correction2 > 0, "bias corrections must be > 0 (step >= 1)");
  const AdamWScalars s = adamw_scalars(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.bias_correction1,
                                       a.bias_correction2, a.grad_scale);
  float* p = a.param.data_ptr<float>();
  const float* g = a.grad.data_ptr<float>();
  float* m = a.exp_avg.data_ptr<float>();
  float* v = a.exp_avg_sq.data_ptr<float>();
  const int64_t* rows = a.grad_rows.has_value() ? a.grad_rows->data_ptr<int64_t>() : nullptr;
  for_each_chunk(F, kRowsPerTask, [&](int64_t f0, int64_t f1) {
    update_rows(p, g, a.grad_rows.has_value(), rows, R, m, v, d, keep, f0, f1, s, a.project_parallel, a.unit_rows);
  });
}

HSAE_VECTOR_CLONES void take_pending_rows(float* W, const int64_t* ids, int64_t begin, int64_t end, int64_t d,
                                          const PendingRows& p) {
  for (int64_t i = begin; i < end; ++i) take_pending_row(W, ids ? ids[i] : i, d, p);
}

PendingRows pending_rows(const PendingStep& step, const at::Tensor& W, int64_t offset) {
  PendingRows p;
  if (!step.done.has_value()) return p;
  const int64_t d = W.size(1);
  TORCH_CHECK(step.exp_avg.has_value() && step.exp_avg_sq.has_value() && step.grad.has_value() &&
                  step.grad_index.has_value() && step.scalars.has_value(), "a pending step needs all its tensors");
  const int64_t F = step.exp_avg->size(0);
  check_rows(*step.exp_avg, "exp_avg", F, d);
  check_rows(*step.exp_avg_sq, "exp_avg_sq", F, d);
  TORCH_CHECK(W.scalar_type() == at::kFloat && W.is_contiguous() && offset >= 0 && offset + W.size(0) <= F,
              "a pending step needs a contiguous float32 slice of its matrix");
  TORCH_CHECK(step.grad->scalar_type() == at::kFloat && step.grad->is_contiguous() && step.grad->dim() == 2 &&
                  step.grad->size(1) == d, "pending grad must be contiguous float32 rows of width ", d);
  TORCH_CHECK(step.grad_index->scalar_type() == at::kLong && step.grad_index->numel() == F &&
                  step.grad_index->is_contiguous(), "pending grad_index: int64, one per row");
  TORCH_CHECK(step.done->scalar_type() == at::kByte && step.done->numel() == F && step.done->is_contiguous(),
              "pending done: uint8, one per row");
  TORCH_CHECK(!step.keep.has_value() || (step.keep->scalar_type() == at::kBool && step.keep->numel() == F),
              "pending keep: bool, one per row");
  TORCH_CHECK(step.scalars->scalar_type() == at::kFloat && step.scalars->numel() == kStepScalars,
              "pending scalars: ", kStepScalars, " floats (step_scalars)");
  p.m = step.exp_avg->data_ptr<float>();
  p.v = step.exp_avg_sq->data_ptr<float>();
  p.g = step.grad->data_ptr<float>();
  p.g_index = step.grad_index->data_ptr<int64_t>();
  p.keep = step.keep.has_value() ? step.keep->data_ptr<bool>() : nullptr;
  p.done = step.done->data_ptr<uint8_t>();
  std::memcpy(&p.s, step.scalars->data_ptr<float>(), sizeof(AdamWScalars));
  p.offset = offset;
  return p;
}

void take_pending_step(const at::Tensor& W, int64_t offset, const PendingStep& step) {
  const PendingRows p = pending_rows(step, W, offset);
  if (!p.active()) return;
  float* w = W.data_ptr<float>();
  for_each_chunk(W.size(0), kRowsPerTask, [&](int64_t f0, int64_t f1) { take_pending_rows(w, nullptr, f0, f1, W.size(1), p); });
}

at::Tensor step_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2, double grad_scale) {
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
                                       grad_scale);
  at::Tensor out = at::empty({kStepScalars}, at::kFloat);
  std::memcpy(out.data_ptr<float>(), &s, sizeof(AdamWScalars));
  return out;
}

}  // namespace hsae_cpu
