"""`hsae_fast::encode_level`: one level's scores and each token's kmax best candidates, with its
sparse backward. The dense (top / ungated) and routed (gated) variants share the op and the
backward: both return the kept slots' global ids and the slot of each one's parent."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import get_backend
from ..backends.common import accumulation_dtype

@torch.library.custom_op("hsae_fast::encode_level", mutates_args=())
def encode_level(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    edge_weight: Tensor,
    path_mask: Tensor,
    parent: Tensor,
    parent_idx: Optional[Tensor],
    parent_vals: Optional[Tensor],
    child_ptr: Optional[Tensor],
    child_ids: Optional[Tensor],
    max_children: int,
    kmax: int,
    routed: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """xc (N, d) -> scores (N, kmax) float32/64, idx (N, kmax) int64, parent_slot (N, kmax) int64.
    W_enc, b_enc, edge_weight, path_mask, parent are one level's rows, every id level-local.
    See `torch_sparse.encode_forward` for the contract every backend implements (it returns idx
    first; the op puts the differentiable output first, as opcheck's autograd test expects)."""
    idx, scores, parent_slot = get_backend(backend).encode_forward(
        xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals, child_ptr, child_ids,
        max_children, kmax, routed,
    )
    return scores, idx, parent_slot


@encode_level.register_fake
def _(xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals, child_ptr, child_ids,
      max_children, kmax, routed, backend):
    N = xc.shape[0]
    acc = accumulation_dtype(xc.dtype)
    return (xc.new_empty((N, kmax), dtype=acc), xc.new_empty((N, kmax), dtype=torch.int64),
            xc.new_empty((N, kmax), dtype=torch.int64))


@torch.library.custom_op("hsae_fast::encode_level_backward", mutates_args=())
def encode_level_backward(
    g_scores: Tensor,
    idx: Tensor,
    parent_slot: Tensor,
    xc: Tensor,
    W_enc: Tensor,
    edge_weight: Tensor,
    parent_vals: Optional[Tensor],
    need_xc: bool,
    need_W_enc: bool,
    need_edge: bool,
    need_parent_vals: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of xc, W_enc, b_enc, edge_weight, parent_vals; an empty tensor where not needed."""
    grads = get_backend(backend).encode_backward(
        g_scores.contiguous(), idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
        need_xc, need_W_enc, need_edge, need_parent_vals,
    )
    return tuple(g if g is not None else xc.new_empty(0) for g in grads)


@encode_level_backward.register_fake
def _(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals, need_xc, need_W_enc, need_edge,
      need_parent_vals, backend):
    acc = accumulation_dtype(xc.dtype)
    empty = xc.new_empty((0,), dtype=acc)
    return (
        xc.new_empty(xc.shape, dtype=acc) if need_xc else empty,
        xc.new_empty(W_enc.shape, dtype=acc) if need_W_enc else empty,
        xc.new_empty((W_enc.shape[0],), dtype=acc),
        xc.new_empty((W_enc.shape[0],), dtype=acc) if need_edge and parent_vals is not None else empty,
        xc.new_empty(parent_vals.shape, dtype=acc) if need_parent_vals and parent_vals is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    xc, W_enc, _b, edge_weight, _m, _p, _pi, parent_vals = inputs[:8]
    ctx.backend = inputs[-1]
    _scores, idx, parent_slot = output
    ctx.save_for_backward(xc, W_enc, edge_weight, parent_vals, idx, parent_slot)


def _backward(ctx, g_scores, _g_idx, _g_slot):
    xc, W_enc, edge_weight, parent_vals, idx, parent_slot = ctx.saved_tensors
    need = ctx.needs_input_grad
    has_parent = parent_vals is not None
    g_xc, g_W, g_b, g_edge, g_parent = encode_level_backward(
        g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
        need[0], need[1], need[3] and has_parent, need[7] and has_parent, ctx.backend,
    )
    return (
        g_xc.to(xc.dtype) if need[0] else None,
        g_W.to(W_enc.dtype) if need[1] else None,
        g_b.to(W_enc.dtype) if need[2] else None,
        (g_edge.to(edge_weight.dtype) if has_parent else torch.zeros_like(edge_weight)) if need[3] else None,
        None, None, None,
        g_parent.to(parent_vals.dtype) if need[7] and has_parent else None,
        None, None, None, None, None, None,
    )


encode_level.register_autograd(_backward, setup_context=_setup_context)
