// Python bindings of the CPU ops: positional arguments in torch_sparse.py's order, outputs last.
#include <torch/extension.h>

#include "hsae_cpu.h"

namespace {

using hsae_cpu::OptionalTensor;
using at::Tensor;

void encode_forward(Tensor xc, Tensor W_enc, Tensor b_enc, Tensor edge_weight, Tensor path_mask, Tensor parent,
                    OptionalTensor parent_idx, OptionalTensor parent_vals, OptionalTensor child_ptr,
                    OptionalTensor child_ids, int64_t max_children, int64_t kmax, bool routed, int64_t screen, Tensor idx,
                    Tensor scores, Tensor parent_slot, OptionalTensor pending_exp_avg, OptionalTensor pending_exp_avg_sq,
                    OptionalTensor pending_grad, OptionalTensor pending_grad_index, OptionalTensor pending_keep,
                    OptionalTensor pending_done, OptionalTensor pending_scalars, int64_t pending_offset) {
  hsae_cpu::encode_forward({xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals, child_ptr,
                            child_ids, max_children, kmax, routed, idx, scores, parent_slot, screen,
                            {pending_exp_avg, pending_exp_avg_sq, pending_grad, pending_grad_index, pending_keep,
                             pending_done, pending_scalars},
                            pending_offset});
}

void take_pending_step(Tensor W, int64_t offset, OptionalTensor exp_avg, OptionalTensor exp_avg_sq, OptionalTensor grad,
                       OptionalTensor grad_index, OptionalTensor keep, OptionalTensor done, OptionalTensor scalars) {
  hsae_cpu::take_pending_step(W, offset, {exp_avg, exp_avg_sq, grad, grad_index, keep, done, scalars});
}

// compact_W_enc: g_W_enc's first R rows receive a row gradient, whose rows are returned (else None).
OptionalTensor encode_backward(Tensor g_scores, Tensor idx, Tensor parent_slot, Tensor xc, Tensor W_enc,
                               Tensor edge_weight, OptionalTensor parent_vals, OptionalTensor g_xc,
                               OptionalTensor g_W_enc, Tensor g_b_enc, OptionalTensor g_edge,
                               OptionalTensor g_parent_vals, bool compact_W_enc, OptionalTensor g_xc_sum,
                               OptionalTensor g_W_row_sq_norms) {
  return hsae_cpu::encode_backward({g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals, g_xc, g_W_enc,
                                    g_b_enc, g_edge, g_parent_vals, compact_W_enc, g_xc_sum, g_W_row_sq_norms});
}

void decode_forward(Tensor idx, Tensor vals, Tensor W_dec, Tensor level_gain, Tensor b_dec,
                    std::vector<int64_t> level_widths, bool prefixes, Tensor out) {
  hsae_cpu::decode_forward({idx, vals, W_dec, level_gain, b_dec, level_widths, prefixes, out});
}

OptionalTensor decode_backward(Tensor g_out, Tensor g_levels, Tensor idx, Tensor vals, Tensor W_dec,
                               Tensor level_gain, std::vector<int64_t> level_widths, bool prefixes,
                               OptionalTensor g_vals, OptionalTensor g_W_dec, Tensor g_level_gain, Tensor g_b_dec,
                               bool compact_W_dec, bool grad_active_only, OptionalTensor g_W_row_sq_norms) {
  return hsae_cpu::decode_backward({g_out, g_levels, idx, vals, W_dec, level_gain, level_widths, prefixes, g_vals,
                                    g_W_dec, g_level_gain, g_b_dec, compact_W_dec, grad_active_only,
                                    g_W_row_sq_norms});
}

void adamw_rows(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_sq, OptionalTensor keep_rows,
                OptionalTensor grad_rows, double lr, double beta1, double beta2, double eps, double weight_decay,
                double bias_correction1, double bias_correction2, double grad_scale, bool project_parallel,
                bool unit_rows) {
  hsae_cpu::adamw_rows({param, grad, exp_avg, exp_avg_sq, keep_rows, grad_rows, lr, beta1, beta2, eps, weight_decay,
                        bias_correction1, bias_correction2, grad_scale, project_parallel, unit_rows});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "hsae_fast's C++ CPU backend: fused top-k encode, routed encode, sparse decode, sparse backward, row-wise AdamW update";
  // Bumped whenever a binding's signature changes: hsae_fast/backends/cpp.py refuses an older build.
  m.def("abi_version", []() { return 8; });
  m.def("pooled_gradient", &hsae_cpu::pooled_gradient);
  m.def("release_gradient_pool", &hsae_cpu::release_gradient_pool);
  m.def("gradient_pool_bytes", &hsae_cpu::gradient_pool_bytes);
  m.def("encode_forward", &encode_forward, release_gil, py::arg("xc"), py::arg("W_enc"), py::arg("b_enc"),
        py::arg("edge_weight"), py::arg("path_mask"), py::arg("parent"), py::arg("parent_idx"),
        py::arg("parent_vals"), py::arg("child_ptr"), py::arg("child_ids"), py::arg("max_children"),
        py::arg("kmax"), py::arg("routed"), py::arg("screen"), py::arg("idx"), py::arg("scores"),
        py::arg("parent_slot"), py::arg("pending_exp_avg") = py::none(), py::arg("pending_exp_avg_sq") = py::none(),
        py::arg("pending_grad") = py::none(), py::arg("pending_grad_index") = py::none(),
        py::arg("pending_keep") = py::none(), py::arg("pending_done") = py::none(),
        py::arg("pending_scalars") = py::none(), py::arg("pending_offset") = 0);
  m.def("take_pending_step", &take_pending_step, release_gil);
  m.def("step_scalars", &hsae_cpu::step_scalars);
  m.def("screen_stats", &hsae_cpu::screen_stats, py::arg("reset") = false);
  m.def("encode_backward", &encode_backward, release_gil);
  m.def("decode_forward", &decode_forward, release_gil);
  m.def("decode_backward", &decode_backward, release_gil);
  m.def("grad_sq_norm", &hsae_cpu::grad_sq_norm, release_gil);
  m.def("adamw_rows", &adamw_rows, release_gil);
}
