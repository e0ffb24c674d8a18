"""`hsae_fast::sparse_decode`: level-wise sparse decode with skip gains (and, on request, the
coarse-to-fine prefix sums of SPEC 5), with its sparse backward."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import get_backend
from ..backends.common import accumulation_dtype, native_options
from . import row_norms
from .encode import computes_row_norms, fake_weight_grad, row_gradient, split_row_gradient

@torch.library.custom_op("hsae_fast::sparse_decode", mutates_args=())
def sparse_decode(
    idx: Tensor, vals: Tensor, W_dec: Tensor, level_gain: Tensor, b_dec: Tensor,
    level_widths: list[int], prefixes: bool, backend: str, row_grads: bool, grad_active_only: bool,
) -> Tensor:
    """idx, vals: (N, K), the levels' slots side by side (bottom first, `level_widths` each).
    Returns x_hat (N, d), or with `prefixes` the stack (L, N, d) of P_m (P_0 = x_hat). `row_grads`:
    W_dec's gradient as a sparse COO tensor of its touched rows (see `encode_tree`).
    `grad_active_only`: the gradient of vals is 0 where vals is 0 (the true one elsewhere), for
    callers that discard it there (a layer's encode backward keeps active slots only); those slots
    then cost the backward nothing (most of them, under batch selection's kmax = 4k)."""
    return get_backend(backend).decode_forward(idx, vals, W_dec, level_gain, b_dec, list(level_widths), prefixes)


@sparse_decode.register_fake
def _(idx, vals, W_dec, level_gain, b_dec, level_widths, prefixes, backend, row_grads, grad_active_only):
    N, d = idx.shape[0], W_dec.shape[1]
    return W_dec.new_empty((len(level_widths), N, d) if prefixes else (N, d))


@torch.library.custom_op("hsae_fast::sparse_decode_backward", mutates_args=())
def sparse_decode_backward(
    g_out: Tensor, idx: Tensor, vals: Tensor, W_dec: Tensor, level_gain: Tensor,
    level_widths: list[int], prefixes: bool, need_vals: bool, need_W_dec: bool, need_gain: bool, backend: str,
    row_grads: bool,
    grad_active_only: bool,
    row_sq_norms: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of vals (N, K), W_dec (F, d), level_gain (L,), b_dec (d,), empty where not needed;
    then W_dec's gradient rows, as in `encode_tree_backward`. `grad_active_only` as in `sparse_decode`.
    `row_sq_norms` (with `row_grads`; a backend that computes them, float32 W_dec): last, (R, 2) each
    gradient row's squared norm, plain and projected off its W_dec row (`row_norms.py`); else empty."""
    impl = get_backend(backend)
    extra = native_options(impl, row_grads=row_grads, grad_active_only=grad_active_only,
                           row_sq_norms=row_sq_norms and row_grads and need_W_dec)
    g_vals, g_W, g_gain, g_b = impl.decode_backward(
        g_out.contiguous(), idx, vals, W_dec, level_gain, list(level_widths), prefixes, need_vals, need_W_dec,
        need_gain, **extra,
    )
    if grad_active_only and g_vals is not None:
        # Whatever the backend did (a native one skips those slots, but not on every dtype path):
        # an (N, K) pass, next to nothing.
        g_vals = g_vals.masked_fill(vals == 0, 0)
    rows = norms = None
    if row_grads and need_W_dec:
        rows, g_W, norms = split_row_gradient(g_W, extra, backend, W_dec)
    acc = accumulation_dtype(W_dec.dtype)
    return tuple(g if g is not None else W_dec.new_empty(0, dtype=dtype)
                 for g, dtype in ((g_vals, acc), (g_W, acc), (g_gain, acc), (g_b, acc), (rows, torch.int64),
                                  (norms, torch.float32)))


@sparse_decode_backward.register_fake
def _(g_out, idx, vals, W_dec, level_gain, level_widths, prefixes, need_vals, need_W_dec, need_gain, backend,
      row_grads, grad_active_only, row_sq_norms=False):
    acc = accumulation_dtype(W_dec.dtype)
    empty = W_dec.new_empty((0,), dtype=acc)
    g_W, rows = fake_weight_grad(W_dec, need_W_dec, row_grads)
    with_norms = row_sq_norms and row_grads and need_W_dec
    return (
        W_dec.new_empty(idx.shape, dtype=acc) if need_vals or need_gain else empty,
        g_W,
        W_dec.new_empty(level_gain.shape, dtype=acc),
        W_dec.new_empty((W_dec.shape[1],), dtype=acc),
        rows,
        W_dec.new_empty((rows.shape[0], 2) if with_norms else (0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    idx, vals, W_dec, level_gain, _b, level_widths, prefixes, backend, row_grads, grad_active_only = inputs
    ctx.level_widths, ctx.prefixes, ctx.backend, ctx.row_grads = list(level_widths), prefixes, backend, row_grads
    ctx.grad_active_only = grad_active_only
    ctx.save_for_backward(idx, vals, W_dec, level_gain)


def _backward(ctx, g_out):
    idx, vals, W_dec, level_gain = ctx.saved_tensors
    need = ctx.needs_input_grad
    with_norms = ctx.row_grads and need[2] and computes_row_norms(ctx.backend, W_dec)
    g_vals, g_W, g_gain, g_b, rows, norms = sparse_decode_backward(
        g_out, idx, vals, W_dec, level_gain, ctx.level_widths, ctx.prefixes, need[1], need[2], need[3], ctx.backend,
        ctx.row_grads, ctx.grad_active_only, with_norms,
    )
    if with_norms:
        row_norms.remember(g_W, norms[:, 0], norms[:, 1])
    if need[2]:
        g_W = row_gradient(rows, g_W, W_dec) if ctx.row_grads else g_W.to(W_dec.dtype)
    return (
        None,
        g_vals.to(vals.dtype) if need[1] else None,
        g_W if need[2] else None,
        g_gain.to(level_gain.dtype) if need[3] else None,
        g_b.to(W_dec.dtype) if need[4] else None,
        None, None, None, None, None,
    )


sparse_decode.register_autograd(_backward, setup_context=_setup_context)
