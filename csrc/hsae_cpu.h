// Argument bundles of the four CPU ops (see hsae_cpu.cpp; contracts: hsae_fast/backends/torch_sparse.py).
// Float inputs are float32 except the weight matrices (float32 or bfloat16) and the encode's xc
// (bfloat16 with bfloat16 weights: the GEMM then runs in bfloat16); outputs are written in place.
#pragma once

#include <ATen/ATen.h>

#include "adamw_row.h"

#include <cstdint>
#include <vector>

namespace hsae_cpu {

using OptionalTensor = c10::optional<at::Tensor>;

// An AdamW step of W_enc waiting to be taken row by row as the encode reads the rows (adamw_row.h,
// PendingRows): all absent where there is none.
struct PendingStep {
  OptionalTensor exp_avg, exp_avg_sq, grad, grad_index, keep, done, scalars;
};

// One level's encode. W_enc, b_enc, edge_weight, path_mask, parent are that level's rows only, and
// every id is level-local: parent[f] and parent_idx index the level above, child_ids and the
// returned idx this level (so each level's W_enc gradient is its own slice, not an F x d buffer).
struct EncodeArgs {
  at::Tensor xc, W_enc, b_enc, edge_weight, path_mask, parent;
  OptionalTensor parent_idx, parent_vals, child_ptr, child_ids;
  int64_t max_children, kmax;
  bool routed;
  at::Tensor idx, scores, parent_slot;  // (N, kmax) outputs
  // A dense level may run its GEMM in bfloat16 (oneDNN, bfloat16 output) and score its candidates
  // again with float32 sums (hsae_cpu.cpp, "The bfloat16 screen"): the same result as the float32-sum
  // GEMM's, proven per row. 0: never; 1: where it pays (hsae_cpu.cpp says when); 2: wherever it
  // applies (tests).
  int64_t screen = 0;
  PendingStep pending;      // W_enc's pending step, if any; W_enc is rows pending_offset.. of its matrix
  int64_t pending_offset = 0;
};

// Rows the bfloat16 screen scored since the last reset, and how many of them needed its second pass.
std::vector<int64_t> screen_stats(bool reset);

struct EncodeGrads {
  at::Tensor g_scores, idx, parent_slot, xc, W_enc, edge_weight;
  OptionalTensor parent_vals;
  // Outputs; an absent one is not computed. g_b_enc is always.
  OptionalTensor g_xc, g_W_enc;
  at::Tensor g_b_enc;
  OptionalTensor g_edge, g_parent_vals;
  // W_enc's gradient as its touched rows only (see "Row gradients" below) instead of every row.
  bool compact_W_enc = false;
  // (d,) the sum of g_xc over the tokens, sum_f g_b_enc[f] W_enc[f] (a row per touched feature), where
  // only that sum is wanted: the gradient of b_dec when x takes none (ops/encode.py). Computed when
  // given; g_xc may then be absent.
  OptionalTensor g_xc_sum;
  // (R,) float32, with compact_W_enc: each gradient row's squared norm (gradient_row_sq_norm, plain),
  // computed while the row is in cache. float32 W_enc only.
  OptionalTensor g_W_row_sq_norms;
};

// Row gradients: with compact_W_*, the backward writes a weight's gradient as the rows that some
// slot touches, in a row gradient's form: rows (R,) int64 strictly increasing feature ids (the
// returned tensor), values (R, d) float32 = the first R rows of the g_W buffer given (row r is the
// gradient of feature rows[r]; every other row's gradient is zero). A routed step touches a few
// thousand of F rows: the (F, d) buffer of zeros is neither written nor, by the update, read.

struct DecodeArgs {
  at::Tensor idx, vals, W_dec, level_gain, b_dec;
  std::vector<int64_t> level_widths;
  bool prefixes;
  at::Tensor out;  // (N, d) or (L, N, d), W_dec's dtype
};

struct DecodeGrads {
  // g_out: the output's gradient as given; g_levels: the gradient each level's decode receives
  // ((L, N, d) running sums with prefixes, else g_out itself).
  at::Tensor g_out, g_levels, idx, vals, W_dec, level_gain;
  std::vector<int64_t> level_widths;
  bool prefixes;
  OptionalTensor g_vals, g_W_dec;
  at::Tensor g_level_gain, g_b_dec;
  bool compact_W_dec = false;  // as EncodeGrads::compact_W_enc
  // g_vals only at slots of nonzero value, 0 at the others (callers that discard those: a layer's
  // encode backward keeps the gradient of active slots only).
  bool grad_active_only = false;
  // (R, 2) float32, with compact_W_dec: each gradient row's squared norm as the update's clip norm
  // takes it (gradient_row_sq_norm), plain and projected off its W_dec row, computed while the row
  // is in cache. float32 W_dec only.
  OptionalTensor g_W_row_sq_norms;
};

// A float32 CPU tensor for a weight gradient, from a pool of freed ones (see hsae_cpu.cpp).
at::Tensor pooled_gradient(const std::vector<int64_t>& sizes);
void release_gradient_pool();
int64_t gradient_pool_bytes();

// The trainer's update of one (F, d) float32 weight matrix, row by row (csrc/adamw_rows.cpp):
// g' = (g - c_f w_f) * grad_scale (c_f = 0 unless project_parallel), torch's fused AdamW step with
// g', then w_f / |w_f| if unit_rows; rows with keep_rows[f] false are not touched.
// With grad_rows, grad is a row gradient's values (R, d) and grad_rows its rows; every other row's
// gradient is zero.
struct AdamWRowsArgs {
  at::Tensor param, grad, exp_avg, exp_avg_sq;
  OptionalTensor keep_rows, grad_rows;
  double lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, grad_scale;
  bool project_parallel, unit_rows;
};

// sum_f |g_f - c_f w_f|^2 (w = project_onto, c_f as above; without it |g|^2), in double over rows.
// With grad_rows, grad holds only those rows (as in AdamWRowsArgs).
double grad_sq_norm(const at::Tensor& grad, const OptionalTensor& project_onto, const OptionalTensor& grad_rows);
// One gradient row's squared norm as grad_sq_norm sums it: |g|^2 (w null) or |g - c w|^2 with
// c = (g . w) / max(|w|^2, 1e-12). The backward passes call it on the rows they write, so the update
// can take their sums instead of reading the rows again: the same function, the same bits.
float gradient_row_sq_norm(const float* g, const float* w, int64_t d);
void adamw_rows(const AdamWRowsArgs& args);
// The pending step taken for every row of W (rows offset.. of its matrix) not taken yet.
void take_pending_step(const at::Tensor& W, int64_t offset, const PendingStep& step);
// The step's pointers, checked against W (rows offset.. of its matrix); inactive without a step.
PendingRows pending_rows(const PendingStep& step, const at::Tensor& W, int64_t offset);
// Rows ids[i] (ids null: i) of the slice W, for begin <= i < end, take the pending step (adamw_rows'
// ISA clones: the same bits wherever it is taken).
void take_pending_rows(float* W, const int64_t* ids, int64_t begin, int64_t end, int64_t d, const PendingRows& p);
// The 8 float scalars of one AdamW step, as adamw_rows computes them.
at::Tensor step_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                        double bias_correction2, double grad_scale);

void encode_forward(const EncodeArgs& args);
// The backward passes return the rows of a row gradient when asked for one (compact_W_*).
c10::optional<at::Tensor> encode_backward(const EncodeGrads& grads);
void decode_forward(const DecodeArgs& args);
c10::optional<at::Tensor> decode_backward(const DecodeGrads& grads);

}  // namespace hsae_cpu
