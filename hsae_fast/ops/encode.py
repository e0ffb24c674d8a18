"""`hsae_fast::encode_tree`: the whole top-down encode of SPEC 4 (every level's scores, selection
and activations) in one op, with its sparse backward.

Why one op for all levels: the backward then makes one backend call over every level's slots
(global ids), which writes the gradients of W_enc, b_enc and edge_weight once, as one buffer each.
With an op per level, each level returns a gradient of its own rows and autograd concatenates
them: one more full pass over an F x d buffer, most of it page faults on fresh memory, which was
a quarter of a wide tree's training step on CPU. The forward still runs level by level through
the backend's `encode_forward` (one level's rows, level-local ids: see `torch_sparse.py`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import get_backend
from ..backends.common import accumulation_dtype, level_stops, new_output
from ..selection import activations, select_candidates


@torch.library.custom_op("hsae_fast::encode_tree", mutates_args=())
def encode_tree(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    edge_weight: Tensor,
    path_mask: Tensor,
    threshold: Tensor,
    local_parent: list[Tensor],
    child_ptr: list[Tensor],
    child_ids: list[Tensor],
    level_sizes: list[int],
    k: list[int],
    kmax: list[int],
    max_children: list[int],
    selection: str,
    hard_gating: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """xc = x - b_dec (N, d) -> vals (N, K) activations, scores (N, K) pre-selection scores (-inf:
    no candidate), idx (N, K) int64 global ids, parent_slot (N, K) int64: the column of each slot's
    parent in these same outputs (-1: none). K = sum(kmax): the levels' slots side by side, bottom
    first (the float outputs come first, as opcheck's autograd test expects). Levels are encoded top first; level l's inputs from the tree plan: local_parent[l],
    child_ptr[l], child_ids[l], max_children[l] (the last three for the L - 1 lower levels)."""
    impl = get_backend(backend)
    L = len(level_sizes)
    offsets, stops = level_stops(level_sizes), level_stops(kmax)
    N, K = xc.shape[0], stops[-1]
    acc = accumulation_dtype(xc.dtype)
    idx = new_output((N, K), torch.int64, xc.device)
    vals = new_output((N, K), acc, xc.device)
    scores = new_output((N, K), acc, xc.device)
    parent_slot = new_output((N, K), torch.int64, xc.device)
    above_idx = above_vals = None  # the level above's local ids and activations
    for l in reversed(range(L)):
        rows, cols, top = slice(offsets[l], offsets[l + 1]), slice(stops[l], stops[l + 1]), l == L - 1
        l_idx, l_scores, l_slot = impl.encode_forward(
            xc, W_enc[rows], b_enc[rows], edge_weight[rows], path_mask[rows], local_parent[l], above_idx, above_vals,
            None if top else child_ptr[l], None if top else child_ids[l], 0 if top else max_children[l],
            kmax[l], hard_gating and not top,
        )
        l_vals = activations(l_scores, select_candidates(l_scores, k[l], selection, threshold[l]))
        idx[:, cols] = l_idx + offsets[l]
        vals[:, cols], scores[:, cols] = l_vals, l_scores
        parent_slot[:, cols] = torch.where(l_slot >= 0, l_slot + stops[min(l + 1, L)], -1)
        above_idx, above_vals = l_idx, l_vals
    return vals, scores, idx, parent_slot


@encode_tree.register_fake
def _(xc, W_enc, b_enc, edge_weight, path_mask, threshold, local_parent, child_ptr, child_ids, level_sizes, k,
      kmax, max_children, selection, hard_gating, backend):
    N, K = xc.shape[0], sum(kmax)
    acc = accumulation_dtype(xc.dtype)
    return (xc.new_empty((N, K), dtype=acc), xc.new_empty((N, K), dtype=acc),
            xc.new_empty((N, K), dtype=torch.int64), xc.new_empty((N, K), dtype=torch.int64))


@torch.library.custom_op("hsae_fast::encode_tree_backward", mutates_args=())
def encode_tree_backward(
    g_vals: Tensor,
    idx: Tensor,
    vals: Tensor,
    parent_slot: Tensor,
    xc: Tensor,
    W_enc: Tensor,
    edge_weight: Tensor,
    level_widths: list[int],
    need_xc: bool,
    need_W_enc: bool,
    need_edge: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of xc (N, d), W_enc (F, d), b_enc (F,), edge_weight (F,) in the accumulation
    dtype; an empty tensor where not needed."""
    acc = accumulation_dtype(xc.dtype)
    live = vals != 0  # kept with a positive score: the straight-through path of SPEC 4
    g = torch.where(live, g_vals.to(acc), 0)
    edges = edge_weight.to(acc)
    has_parents = len(level_widths) > 1
    if has_parents and bool(edges.any()):
        # A child's score holds edge * (its parent's activation), so its gradient reaches the
        # parent's activation, and through it the parent's score. Bottom level first: a level
        # passes its gradient up only once it has received all of its own.
        stops = level_stops(level_widths)
        for l in range(len(level_widths) - 1):
            cols = slice(stops[l], stops[l + 1])
            slot = parent_slot[:, cols]
            up = (g[:, cols] * edges[idx[:, cols]]).masked_fill(slot < 0, 0)
            g = g + torch.zeros_like(g).scatter_add_(1, slot.clamp(min=0), up) * live
    grads = get_backend(backend).encode_backward(
        g.contiguous(), idx, parent_slot, xc, W_enc, edge_weight, vals if has_parents else None,
        need_xc, need_W_enc, need_edge and has_parents, False,
    )
    g_xc, g_W, g_b, g_edge, _ = grads
    if need_edge and g_edge is None:  # one level: no edges to learn
        g_edge = torch.zeros(W_enc.shape[0], dtype=acc, device=xc.device)
    return tuple(t if t is not None else xc.new_empty(0) for t in (g_xc, g_W, g_b, g_edge))


@encode_tree_backward.register_fake
def _(g_vals, idx, vals, parent_slot, xc, W_enc, edge_weight, level_widths, need_xc, need_W_enc, need_edge, backend):
    acc = accumulation_dtype(xc.dtype)
    empty = xc.new_empty((0,), dtype=acc)
    F = W_enc.shape[0]
    return (
        xc.new_empty(xc.shape, dtype=acc) if need_xc else empty,
        xc.new_empty(W_enc.shape, dtype=acc) if need_W_enc else empty,
        xc.new_empty((F,), dtype=acc),
        xc.new_empty((F,), dtype=acc) if need_edge else empty,
    )


def _setup_context(ctx, inputs, output):
    xc, W_enc, _b, edge_weight = inputs[:4]
    ctx.kmax, ctx.backend = list(inputs[11]), inputs[-1]
    # The backward returns the inputs' structure as torch.library flattens it: a list of Nones for
    # a list of tensors (an empty list counts as one), one None for anything else.
    ctx.no_grads = [[None] * len(a) if isinstance(a, list) and all(isinstance(t, Tensor) for t in a) else None
                    for a in inputs[4:]]
    vals, scores, idx, parent_slot = output
    ctx.mark_non_differentiable(scores)  # selection inputs: losses and metrics use vals
    ctx.save_for_backward(xc, W_enc, edge_weight, idx, vals, parent_slot)


def _backward(ctx, g_vals, _g_scores, _g_idx, _g_slot):
    xc, W_enc, edge_weight, idx, vals, parent_slot = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_vals is None:
        g_vals = torch.zeros_like(vals)
    g_xc, g_W, g_b, g_edge = encode_tree_backward(
        g_vals, idx, vals, parent_slot, xc, W_enc, edge_weight, ctx.kmax, need[0], need[1], need[3], ctx.backend,
    )
    return (
        g_xc.to(xc.dtype) if need[0] else None,
        g_W.to(W_enc.dtype) if need[1] else None,
        g_b.to(W_enc.dtype) if need[2] else None,
        g_edge.to(edge_weight.dtype) if need[3] else None,
        *ctx.no_grads,
    )


encode_tree.register_autograd(_backward, setup_context=_setup_context)
