"""The `triton` backend: dispatch glue from the four backend ops to the kernels in `kernels/`.

Signatures and semantics are those of `torch_sparse.py` (read its docstrings). Runs on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before the kernels were imported
(the tests do that). Gated levels use the routed encode (`kernels/encode_routed.py`); the top
level and ungated levels the dense encode with its running top-k (`kernels/encode_dense.py`).
Set `kernels.DETERMINISTIC = True` or HSAE_DETERMINISTIC=1 for bit-reproducible gradients.
Importing this module imports triton; the registry reports a failed import as "not available".
"""
from __future__ import annotations

import contextlib

import torch

import kernels
from kernels.decode import decode_backward as _decode_backward
from kernels.decode import decode_forward as _decode_forward
from kernels.encode_backward import encode_backward as _encode_backward
from kernels.encode_dense import encode_dense
from kernels.encode_routed import encode_routed

NAME = "triton"
BACKWARD_OPTIONS = ("grad_active_only",)  # taken natively (hsae_fast.backends.common.native_options)


def available() -> tuple[bool, str]:
    where = "CUDA tensors and CPU tensors (TRITON_INTERPRET=1)" if kernels.INTERPRETED else "CUDA tensors"
    return True, f"triton kernels for {where}"


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRETED)


def _on(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def encode_forward(xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals,
                   child_ptr, child_ids, max_children: int, kmax: int, routed: bool):
    """See `torch_sparse.encode_forward`."""
    with _on(xc.device):
        if routed:
            return encode_routed(xc, W_enc, b_enc, edge_weight, parent_idx, parent_vals, child_ptr, child_ids,
                                 max_children, kmax)
        return encode_dense(xc, W_enc, b_enc, path_mask, kmax,
                            edge_weight, parent, parent_idx, parent_vals)


def encode_backward(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
                    need_xc: bool, need_W_enc: bool, need_edge: bool, need_parent_vals: bool):
    """See `torch_sparse.encode_backward`."""
    with _on(xc.device):
        return _encode_backward(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
                                need_xc, need_W_enc, need_edge, need_parent_vals)


def decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths: list[int], prefixes: bool):
    """See `torch_sparse.decode_forward`."""
    with _on(W_dec.device):
        return _decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths, prefixes)


def decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths: list[int], prefixes: bool,
                    need_vals: bool, need_W_dec: bool, need_gain: bool, grad_active_only: bool = False):
    """See `torch_sparse.decode_backward`; `grad_active_only`: the vals gradient only where vals != 0,
    0 elsewhere (those slots' rows are not read)."""
    with _on(W_dec.device):
        return _decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths, prefixes,
                                need_vals, need_W_dec, need_gain, grad_active_only)
