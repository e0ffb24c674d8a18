"""AuxK's two ops (SPEC 5): `hsae_fast::dead_topk`, each token's k best scores among a subset of
features (the dead ones), ungated and without the edge term, and `hsae_fast::dead_decode`, the
decode of those codes. Both have sparse backwards that touch only the dead rows.

Why ops: in plain torch, `xc @ W_enc[dead].T`, a top-k and `acts @ W_dec[dead]` keep an N x |dead|
matrix and cost five N x |dead| x d products with the backward, and each gather `W[dead]` returns a
dense F x d gradient that autograd then adds to the main one (two more passes over F x d: at
F=16,960 and 2,300 dead features that was 150 ms, more than the rest of the training step). Here
the forward is the backend's fused dense encode (GEMM and top-k in one pass, O(N * k) memory) over
the gathered dead rows, the decode and both backwards are the backends' sparse kernels on the
N x k chosen codes with ids local to the dead subset, and the weight gradients leave as sparse
COO tensors over the dead rows: autograd adds those in place into the main dense gradient.

Backends that write row gradients natively (`BACKWARD_OPTIONS` has "row_grads": cpp) skip the
gathers after the forward's: the decode and both backwards run on the global ids over the full
weights, and the weight gradients come back as the touched rows. At F=65,536 with 50,000 dead
features that saves three 150 MB gathers and two zero-filled (|dead|, d) gradients per step."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import get_backend
from ..backends.common import accumulation_dtype, native_options
from .encode import row_gradient


def _native_rows(backend: str) -> bool:
    """Whether the backend's backward writes weight gradients as rows itself (then no gathered copy
    of the weights is needed after the forward)."""
    return bool(native_options(get_backend(backend), row_grads=True))


def _check_ids(dead_ids: Tensor, F: int) -> None:
    if dead_ids.dtype != torch.int64 or dead_ids.dim() != 1:
        raise ValueError(f"dead_ids must be a 1-D int64 tensor, got {tuple(dead_ids.shape)} {dead_ids.dtype}")
    n = dead_ids.numel()
    if n and (int(dead_ids[0]) < 0 or int(dead_ids[-1]) >= F or (n > 1 and not bool((dead_ids[1:] > dead_ids[:-1]).all()))):
        raise ValueError(f"dead_ids must be sorted, unique ids in [0, {F})")


# --------------------------------------------------------------------------------------- dead_topk
@torch.library.custom_op("hsae_fast::dead_topk", mutates_args=())
def dead_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, dead_ids: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """xc (N, d), W_enc (F, d), b_enc (F,), dead_ids (n,) sorted unique int64 ids, 1 <= k <= n ->
    scores (N, k) in the accumulation dtype and local (N, k) int64: per token the k largest
    `xc . W_enc[i] + b_enc[i]` over i in dead_ids, as positions in dead_ids (the feature is
    dead_ids[local])."""
    n = dead_ids.numel()
    _check_ids(dead_ids, W_enc.shape[0])
    if not 1 <= k <= n:
        raise ValueError(f"dead_topk: k={k} must lie in [1, {n}] (the number of dead features)")
    impl = get_backend(backend)
    # Not the cpp backend's bfloat16 screen: its candidates would be 2 k_aux of a few thousand dead
    # features, whose scores crowd together as AuxK pulls them all toward the same residuals; scoring
    # those again cost what the bfloat16 GEMM saved (bench/bench_screen.py with the screen on AuxK:
    # 0.86-0.97x the float32 step, F=65,536, 10% and 50% dead).
    options = {"screen": False} if "screen" in getattr(impl, "FORWARD_OPTIONS", ()) else {}
    local, scores, _ = impl.encode_forward(
        xc, W_enc.index_select(0, dead_ids), b_enc.index_select(0, dead_ids), b_enc.new_zeros(n),
        torch.ones(n, dtype=torch.bool, device=xc.device), torch.full((n,), -1, dtype=torch.int64, device=xc.device),
        None, None, None, None, 0, k, False, **options,
    )
    return scores, local


@dead_topk.register_fake
def _(xc, W_enc, b_enc, dead_ids, k, backend):
    N = xc.shape[0]
    return xc.new_empty((N, k), dtype=accumulation_dtype(xc.dtype)), xc.new_empty((N, k), dtype=torch.int64)


def _dead_topk_backward_impl(g_scores, local, xc, W_enc, dead_ids, need_xc, backend):
    """Gradients of xc (N, d) (None if not needed), of W_enc as rows (global ids, ascending) and
    their values (R, d), and of b_enc (F,), in the accumulation dtype."""
    N, k = local.shape
    no_parent = torch.full((N, k), -1, dtype=torch.int64, device=local.device)
    impl = get_backend(backend)
    if _native_rows(backend):  # global ids on the full W_enc: no gather, only touched rows written
        g_xc, (rows, values), g_b, _, _ = impl.encode_backward(
            g_scores.contiguous(), dead_ids[local], no_parent, xc, W_enc, W_enc.new_zeros(W_enc.shape[0]), None,
            need_xc, True, False, False, row_grads=True,
        )
        return g_xc, rows, values, g_b
    n = dead_ids.numel()
    g_xc, g_rows, g_b_dead, _, _ = impl.encode_backward(
        g_scores.contiguous(), local.contiguous(), no_parent,
        xc, W_enc.index_select(0, dead_ids), W_enc.new_zeros(n), None, need_xc, True, False, False,
    )
    g_b = g_b_dead.new_zeros(W_enc.shape[0]).index_copy_(0, dead_ids, g_b_dead)
    return g_xc, dead_ids, g_rows, g_b


def _dead_topk_setup(ctx, inputs, output):
    xc, W_enc, _b, dead_ids, _k, backend = inputs
    ctx.backend = backend
    _scores, local = output
    ctx.mark_non_differentiable(local)
    ctx.save_for_backward(xc, W_enc, dead_ids, local)


def _dead_topk_grad(ctx, g_scores, _g_local):
    xc, W_enc, dead_ids, local = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or need[2]):
        return None, None, None, None, None, None
    g_xc, rows, g_rows, g_b = _dead_topk_backward_impl(g_scores, local, xc, W_enc, dead_ids, need[0], ctx.backend)
    g_W = row_gradient(rows, g_rows, W_enc) if need[1] else None  # dead rows only
    g_b_enc = g_b.to(W_enc.dtype) if need[2] else None
    return g_xc.to(xc.dtype) if need[0] else None, g_W, g_b_enc, None, None, None


dead_topk.register_autograd(_dead_topk_grad, setup_context=_dead_topk_setup)


# ------------------------------------------------------------------------------------- dead_decode
@torch.library.custom_op("hsae_fast::dead_decode", mutates_args=())
def dead_decode(local: Tensor, vals: Tensor, W_dec: Tensor, dead_ids: Tensor, backend: str) -> Tensor:
    """sum_j vals[n, j] * W_dec[dead_ids[local[n, j]]] -> (N, d) in W_dec's dtype (no bias, no gain)."""
    _check_ids(dead_ids, W_dec.shape[0])
    d = W_dec.shape[1]
    if _native_rows(backend):  # the decode reads only the rows it is given ids of
        return get_backend(backend).decode_forward(
            dead_ids[local], vals, W_dec, W_dec.new_ones(1), W_dec.new_zeros(d), [local.shape[1]], False)
    return get_backend(backend).decode_forward(
        local, vals, W_dec.index_select(0, dead_ids), W_dec.new_ones(1), W_dec.new_zeros(d), [local.shape[1]], False)


@dead_decode.register_fake
def _(local, vals, W_dec, dead_ids, backend):
    return W_dec.new_empty((local.shape[0], W_dec.shape[1]))


def _dead_decode_setup(ctx, inputs, output):
    local, vals, W_dec, dead_ids, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(local, vals, W_dec, dead_ids)


def _dead_decode_grad(ctx, g_out):
    local, vals, W_dec, dead_ids = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[1] or need[2]):
        return None, None, None, None, None
    impl, widths = get_backend(ctx.backend), [local.shape[1]]
    if _native_rows(ctx.backend):
        g_vals, g_W, _, _ = impl.decode_backward(
            g_out.contiguous(), dead_ids[local], vals, W_dec, W_dec.new_ones(1), widths, False, need[1], need[2], False,
            row_grads=need[2],
        )
        g_W = row_gradient(*g_W, W_dec) if need[2] else None  # the touched dead rows
    else:
        g_vals, g_rows, _, _ = impl.decode_backward(
            g_out.contiguous(), local, vals, W_dec.index_select(0, dead_ids), W_dec.new_ones(1), widths, False,
            need[1], need[2], False,
        )
        g_W = row_gradient(dead_ids, g_rows, W_dec) if need[2] else None
    return None, g_vals.to(vals.dtype) if need[1] else None, g_W, None, None


dead_decode.register_autograd(_dead_decode_grad, setup_context=_dead_decode_setup)
