"""`hsae_fast::encode_tree`: the whole top-down encode of SPEC 4 (every level's scores, selection
and activations) in one op, with its sparse backward.

Why one op for all levels: the backward then makes one backend call over every level's slots
(global ids), which writes the gradients of W_enc, b_enc and edge_weight once, as one buffer each.
With an op per level, each level returns a gradient of its own rows and autograd concatenates
them: one more full pass over an F x d buffer, most of it page faults on fresh memory, which was
a quarter of a wide tree's training step on CPU. The forward still runs level by level through
the backend's `encode_forward` (one level's rows, level-local ids: see `torch_sparse.py`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import get_backend
from ..backends.common import accumulation_dtype, level_stops, native_options, to_row_gradient
from ..selection import activations, select_candidates
from . import row_norms


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
    row_grads: bool,
    b_dec: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """xc = x - b_dec (N, d) -> vals (N, K) activations, scores (N, K) pre-selection scores (-inf:
    no candidate), idx (N, K) int64 global ids, parent_slot (N, K) int64: the column of each slot's
    parent in these same outputs (-1: none). K = sum(kmax): the levels' slots side by side, bottom
    first (the float outputs come first, as opcheck's autograd test expects). Levels are encoded top first; level l's inputs from the tree plan: local_parent[l],
    child_ptr[l], child_ids[l], max_children[l] (the last three for the L - 1 lower levels).
    `row_grads`: W_enc's gradient leaves the backward as a sparse COO tensor of the rows the slots
    touch (`row_gradient`), not a dense (F, d) one; only `MaskedAdamW.update` and optimizers that
    take sparse gradients can step with it (`HSAELayer.row_grads`).
    `b_dec`: given where x takes no gradient, with xc made from it detached: the encoder's share of
    b_dec's gradient, -(the sum over tokens of xc's gradient), then comes out of this op, computed as
    that sum directly (`encode_tree_backward`'s `xc_sum_only`), not as an (N, d) gradient that autograd
    would sum; xc takes none. The forward does not read it."""
    impl = get_backend(backend)
    L = len(level_sizes)
    offsets, stops = level_stops(level_sizes), level_stops(kmax)
    acc = accumulation_dtype(xc.dtype)
    # Each level's outputs, joined once at the end (bottom first): few ops, since on a GPU every
    # op costs the host a launch and the host, not the GPU, bounds a tree's step there.
    parts = [[None] * L for _ in range(4)]  # vals, scores, idx, parent_slot
    above_idx = above_vals = None  # the level above's local ids and activations
    for l in reversed(range(L)):
        rows, top = slice(offsets[l], offsets[l + 1]), l == L - 1
        l_idx, l_scores, l_slot = impl.encode_forward(
            xc, W_enc[rows], b_enc[rows], edge_weight[rows], path_mask[rows], local_parent[l], above_idx, above_vals,
            None if top else child_ptr[l], None if top else child_ids[l], 0 if top else max_children[l],
            kmax[l], hard_gating and not top,
        )
        l_scores = l_scores.to(acc)
        l_vals = activations(l_scores, select_candidates(l_scores, k[l], selection, threshold[l]))
        parts[0][l], parts[1][l] = l_vals, l_scores
        parts[2][l] = l_idx + offsets[l] if offsets[l] else l_idx
        # parent slots are level-local columns: shift them to the parent level's columns here
        parts[3][l] = l_slot if top else torch.where(l_slot >= 0, l_slot + stops[l + 1], -1)
        above_idx, above_vals = l_idx, l_vals
    vals, scores, idx, parent_slot = (level_parts[0] if L == 1 else torch.cat(level_parts, dim=1)
                                      for level_parts in parts)
    return vals, scores, idx, parent_slot


@encode_tree.register_fake
def _(xc, W_enc, b_enc, edge_weight, path_mask, threshold, local_parent, child_ptr, child_ids, level_sizes, k,
      kmax, max_children, selection, hard_gating, backend, row_grads, b_dec=None):
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
    row_grads: bool,
    xc_sum_only: bool = False,
    row_sq_norms: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of xc (N, d), W_enc (F, d), b_enc (F,), edge_weight (F,) in the accumulation
    dtype, an empty tensor where not needed; then W_enc's gradient rows (R,): with `row_grads`, the
    W_enc gradient is their values (R, d) (a row gradient, see `row_gradient`), else it is empty.
    `xc_sum_only`: xc's gradient summed over the tokens, (d,), instead (where the backend can, without
    making the (N, d) one: sum_f g_b_enc[f] W_enc[f] over the touched features). `row_sq_norms` (with
    `row_grads`; a backend that computes them, float32 W_enc): last, (R,) each gradient row's squared
    norm (`row_norms.py`); else empty."""
    acc = accumulation_dtype(xc.dtype)
    live = vals != 0  # kept with a positive score: the straight-through path of SPEC 4
    g = torch.where(live, g_vals.to(acc), 0)
    edges = edge_weight.to(acc)
    has_parents = len(level_widths) > 1
    # Edges all zero (their start) make this a no-op; asking costs a host sync on a GPU, so there
    # it always runs (a few (N, K) ops), while the CPU skips it.
    if has_parents and (xc.is_cuda or bool(edges.any())):
        # A child's score holds edge * (its parent's activation), so its gradient reaches the
        # parent's activation, and through it the parent's score. Bottom level first: a level
        # passes its gradient up only once it has received all of its own.
        stops = level_stops(level_widths)
        for l in range(len(level_widths) - 1):
            cols = slice(stops[l], stops[l + 1])
            slot = parent_slot[:, cols]
            up = (g[:, cols] * edges[idx[:, cols]]).masked_fill(slot < 0, 0)
            g = g + torch.zeros_like(g).scatter_add_(1, slot.clamp(min=0), up) * live
    impl = get_backend(backend)
    extra = native_options(impl, row_grads=row_grads, xc_sum=xc_sum_only and need_xc,
                           row_sq_norms=row_sq_norms and row_grads and need_W_enc)
    grads = impl.encode_backward(
        g.contiguous(), idx, parent_slot, xc, W_enc, edge_weight, vals if has_parents else None,
        need_xc, need_W_enc, need_edge and has_parents, False, **extra,
    )
    g_xc, g_W, g_b, g_edge, _ = grads
    if xc_sum_only and need_xc and "xc_sum" not in extra:
        g_xc = g_xc.sum(0)
    if need_edge and g_edge is None:  # one level: no edges to learn
        g_edge = torch.zeros(W_enc.shape[0], dtype=acc, device=xc.device)
    rows = norms = None
    if row_grads and need_W_enc:
        rows, g_W, norms = split_row_gradient(g_W, extra, backend, W_enc)
    return tuple(t if t is not None else xc.new_empty(0, dtype=dtype)
                 for t, dtype in ((g_xc, acc), (g_W, acc), (g_b, acc), (g_edge, acc), (rows, torch.int64),
                                  (norms, torch.float32)))


@encode_tree_backward.register_fake
def _(g_vals, idx, vals, parent_slot, xc, W_enc, edge_weight, level_widths, need_xc, need_W_enc, need_edge, backend,
      row_grads, xc_sum_only=False, row_sq_norms=False):
    acc = accumulation_dtype(xc.dtype)
    empty = xc.new_empty((0,), dtype=acc)
    F = W_enc.shape[0]
    g_W, rows = fake_weight_grad(W_enc, need_W_enc, row_grads)
    with_norms = row_sq_norms and row_grads and need_W_enc
    return (
        (xc.new_empty(xc.shape[1:] if xc_sum_only else xc.shape, dtype=acc)) if need_xc else empty,
        g_W,
        xc.new_empty((F,), dtype=acc),
        xc.new_empty((F,), dtype=acc) if need_edge else empty,
        rows,
        xc.new_empty(rows.shape if with_norms else (0,), dtype=torch.float32),
    )


def split_row_gradient(g_W, extra: dict, backend: str, W: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A backend's weight gradient as (rows, values, row norms or None): its own row gradient where it
    took the `row_grads` option (`extra`), else the dense one made into rows. Asked for row norms
    (`row_sq_norms` in `extra`), a backend must give them: the op's output shape promises them."""
    rows, values, *norms = g_W if "row_grads" in extra else to_row_gradient(g_W)
    if "row_sq_norms" in extra and not norms:
        raise ValueError(f"row_sq_norms: backend {backend!r} computes none for a {W.dtype} weight")
    return rows, values, norms[0] if norms else None


def computes_row_norms(backend: str, W: Tensor) -> bool:
    """Whether the backward can leave its gradient rows' squared norms for the update (`row_norms.py`):
    a backend that computes them, and a float32 weight (the row update's)."""
    return W.dtype == torch.float32 and "row_sq_norms" in getattr(get_backend(backend), "BACKWARD_OPTIONS", ())


def fake_weight_grad(W: Tensor, needed: bool, row_grads: bool) -> tuple[Tensor, Tensor]:
    """The fake (shape-only) weight gradient and rows of a backward op: (F, d) and no rows, or a row
    gradient of data-dependent length."""
    acc = accumulation_dtype(W.dtype)
    if not needed:
        return W.new_empty((0,), dtype=acc), W.new_empty((0,), dtype=torch.int64)
    if not row_grads:
        return W.new_empty(W.shape, dtype=acc), W.new_empty((0,), dtype=torch.int64)
    R = torch.library.get_ctx().new_dynamic_size()
    return W.new_empty((R, W.shape[1]), dtype=acc), W.new_empty((R,), dtype=torch.int64)


def row_gradient(rows: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """A weight's gradient as a sparse COO tensor of its touched rows: indices (1, R) strictly
    increasing, values (R, d) in the weight's dtype; autograd accumulates it into `weight.grad`."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values.to(weight.dtype), weight.shape, is_coalesced=True,
                                   check_invariants=False)


def _setup_context(ctx, inputs, output):
    xc, W_enc, _b, edge_weight = inputs[:4]
    ctx.kmax, ctx.backend, ctx.row_grads = list(inputs[11]), inputs[15], inputs[16]
    ctx.b_dec_dtype = inputs[17].dtype if len(inputs) > 17 and inputs[17] is not None else None
    # The backward returns the inputs' structure as torch.library flattens it: a list of Nones for
    # a list of tensors (an empty list counts as one), one None for anything else.
    ctx.no_grads = [[None] * len(a) if isinstance(a, list) and all(isinstance(t, Tensor) for t in a) else None
                    for a in inputs[4:17]]
    vals, scores, idx, parent_slot = output
    ctx.mark_non_differentiable(scores)  # selection inputs: losses and metrics use vals
    ctx.save_for_backward(xc, W_enc, edge_weight, idx, vals, parent_slot)


def _backward(ctx, g_vals, _g_scores, _g_idx, _g_slot):
    xc, W_enc, edge_weight, idx, vals, parent_slot = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_b_dec = ctx.b_dec_dtype is not None and len(need) > 17 and need[17]
    if g_vals is None:
        g_vals = torch.zeros_like(vals)
    with_norms = ctx.row_grads and need[1] and computes_row_norms(ctx.backend, W_enc)
    g_xc, g_W, g_b, g_edge, rows, norms = encode_tree_backward(
        g_vals, idx, vals, parent_slot, xc, W_enc, edge_weight, ctx.kmax, need[0] or need_b_dec, need[1], need[3],
        ctx.backend, ctx.row_grads, need_b_dec and not need[0], with_norms,
    )
    if with_norms:
        row_norms.remember(g_W, norms)
    g_b_dec = None
    if need_b_dec:  # xc = x - b_dec: minus the sum over tokens of xc's gradient
        g_b_dec = (-(g_xc if g_xc.dim() == 1 else g_xc.sum(0))).to(ctx.b_dec_dtype)
    if need[1]:
        g_W = row_gradient(rows, g_W, W_enc) if ctx.row_grads else g_W.to(W_enc.dtype)
    return (
        g_xc.to(xc.dtype) if need[0] else None,
        g_W if need[1] else None,
        g_b.to(W_enc.dtype) if need[2] else None,
        g_edge.to(edge_weight.dtype) if need[3] else None,
        *ctx.no_grads,
        *((g_b_dec,) if len(need) > 17 else ()),  # as the call passed it: b_dec is left out where not used
    )


encode_tree.register_autograd(_backward, setup_context=_setup_context)
