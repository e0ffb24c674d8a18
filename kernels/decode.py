"""Level-wise sparse decode and its backward, from three sparse-row primitives.

A code is (idx, coef): (N, K) slots, the levels' slots side by side (bottom first); slot j belongs
to level `slot_level[j]` and is scaled by `gain[slot_level[j]]`.

- `gather_sum`:  out[n] = bias + sum_j gain * coef[n, j] * W[idx[n, j]]  (with prefix sums per
                 level, top first). The decode; with W = W_enc and coef = g_scores, the encode's g_xc.
- `gather_dot`:  out[n, j] = <G[level j][n], W[idx[n, j]]>. The decode's g_vals.
- `scatter_rows`: out[f] = sum over slots with idx == f of gain * coef * R[level j][n], plus optional
                 per-feature sums of per-slot scalars. The decode's g_W_dec (R = the upstream
                 gradient) and the encode's g_W_enc, g_b_enc, g_edge (R = xc). Atomics by default;
                 the deterministic mode sorts slots by feature and gives each feature one program,
                 so every sum runs in a fixed order (bit-identical across runs).
All are O(N * K * d) and accumulate in float32 (float64 for float64 input).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hsae_fast.backends.common import new_output

from . import INTERPRETED, acc_dtype, deterministic

_BLOCK_K = 16
_BLOCK_D = 64 if INTERPRETED else 128
_BLOCK_E = 16 if INTERPRETED else 32


@triton.jit
def _gather_sum_block(idx_ptr, coef_ptr, slot_level_ptr, gain_ptr, w_ptr, n, K, d, ds, d_ok, k0, k_hi,
                      ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over slots [k0, min(k0 + BLOCK_K, k_hi)) of token n of gain * coef * W[idx][ds]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < k_hi
    feat = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
    gain = tl.load(gain_ptr + tl.load(slot_level_ptr + ks, mask=k_ok, other=0), mask=k_ok, other=0.0)
    c = tl.load(coef_ptr + n * K + ks, mask=k_ok, other=0.0).to(ACC) * gain.to(ACC)
    # A zero coefficient adds nothing: its row is not read (see _scatter_rows_atomic_kernel)
    rows = tl.load(w_ptr + feat[:, None] * d + ds[None, :], mask=((c != 0) & k_ok)[:, None] & d_ok[None, :],
                   other=0.0)
    return tl.sum(c[:, None] * rows.to(ACC), axis=0)


@triton.jit
def _gather_sum_kernel(
    idx_ptr, coef_ptr, slot_level_ptr, gain_ptr, level_stop_ptr, w_ptr, bias_ptr, out_ptr,
    N, K, d, L,
    HAS_BIAS: tl.constexpr, PREFIXES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    total = tl.zeros((BLOCK_D,), ACC)
    if HAS_BIAS:
        total += tl.load(bias_ptr + ds, mask=d_ok, other=0.0).to(ACC)
    if PREFIXES:
        # Levels top first, so that after level l the running sum is the prefix P_l.
        for t in range(0, L):
            level = L - 1 - t
            k_hi = tl.load(level_stop_ptr + level + 1)
            for k0 in range(tl.load(level_stop_ptr + level), k_hi, BLOCK_K):
                total += _gather_sum_block(idx_ptr, coef_ptr, slot_level_ptr, gain_ptr, w_ptr, n, K, d, ds, d_ok,
                                           k0, k_hi, ACC, BLOCK_K)
            tl.store(out_ptr + (level * N + n) * d + ds, total, mask=d_ok)
    else:
        # One loop over every slot (no per-level stores): the compiler can software-pipeline it,
        # loading the next block's ids while this block's rows arrive.
        for k0 in range(0, K, BLOCK_K):
            total += _gather_sum_block(idx_ptr, coef_ptr, slot_level_ptr, gain_ptr, w_ptr, n, K, d, ds, d_ok,
                                       k0, K, ACC, BLOCK_K)
        tl.store(out_ptr + n * d + ds, total, mask=d_ok)


def _gather_sum_configs():
    """GPU candidates. A decode moves little per token (K rows of d): what matters is how many row
    loads are in flight, so the candidates trade slots per step against columns per program (one
    program for a whole row of d=768 at BLOCK_D 1024); the first two are the untuned tile (`_BLOCK_K`,
    `_BLOCK_D`, 4 warps) with one and with three pipeline stages."""
    shapes = ((16, 128, 4, 1), (16, 128, 4, 3), (32, 128, 4, 3), (16, 256, 4, 3),
              (32, 256, 8, 3), (8, 512, 4, 3), (16, 512, 8, 3), (8, 1024, 8, 3))
    return [triton.Config({"BLOCK_K": k, "BLOCK_D": dk}, num_warps=warps, num_stages=stages)
            for k, dk, warps, stages in shapes]


_GATHER_AUTOTUNE_MIN_WORK = 1 << 24  # N * K * d above which the tuned kernel runs (tests stay untuned)
_gather_sum_tuned = None if INTERPRETED else triton.autotune(
    configs=_gather_sum_configs(), key=["d", "K", "PREFIXES", "HAS_BIAS"])(_gather_sum_kernel)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, slot_level_ptr, g_ptr, w_ptr, active_ptr, out_ptr,
    N, K, d, g_level_stride,
    ACTIVE_ONLY: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    feat = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
    g_row = tl.load(slot_level_ptr + ks, mask=k_ok, other=0) * g_level_stride + n * d
    # ACTIVE_ONLY: slots whose value is 0 get 0, their rows unread (a batch-selected level keeps a
    # quarter of its slots, and the caller discards the rest's gradient).
    live = k_ok
    if ACTIVE_ONLY:
        live = k_ok & (tl.load(active_ptr + n * K + ks, mask=k_ok, other=0.0) != 0)
    total = tl.zeros((BLOCK_K,), ACC)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = live[:, None] & (ds < d)[None, :]
        g = tl.load(g_ptr + g_row[:, None] + ds[None, :], mask=ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + feat[:, None] * d + ds[None, :], mask=ok, other=0.0).to(ACC)
        total += tl.sum(g * w, axis=1)
    tl.store(out_ptr + n * K + ks, total, mask=k_ok)


@triton.jit
def _scatter_rows_atomic_kernel(
    idx_ptr, coef_ptr, slot_level_ptr, gain_ptr, r_ptr, extra_ptr, out_ptr, sums_ptr,
    N, K, d, F, r_level_stride,
    NUM_SUMS: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        feat = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
        level = tl.load(slot_level_ptr + ks, mask=k_ok, other=0)
        c = tl.load(coef_ptr + n * K + ks, mask=k_ok, other=0.0).to(ACC) * tl.load(gain_ptr + level).to(ACC)
        # Zero coefficients are skipped, not added: slots a selection did not keep carry zeros, and
        # slots with no candidate all name feature 0, so adding their zeros serialised hundreds of
        # thousands of atomics on one row (a 3-level step on an H100 spent most of its backward there).
        ok = ((c != 0) & k_ok)[:, None] & d_ok[None, :]
        r = tl.load(r_ptr + (level * r_level_stride + n * d)[:, None] + ds[None, :], mask=ok, other=0.0).to(ACC)
        tl.atomic_add(out_ptr + feat[:, None] * d + ds[None, :], c[:, None] * r, mask=ok)
        if tl.program_id(1) == 0:
            for m in range(0, NUM_SUMS):
                e = tl.load(extra_ptr + (m * N + n) * K + ks, mask=k_ok, other=0.0).to(ACC)
                tl.atomic_add(sums_ptr + m * F + feat, e, mask=k_ok & (e != 0))


@triton.jit
def _scatter_rows_sorted_kernel(
    order_ptr, feat_ptr_ptr, coef_ptr, slot_level_ptr, gain_ptr, r_ptr, extra_ptr, out_ptr, sums_ptr,
    N, K, d, F, r_level_stride,
    NUM_SUMS: tl.constexpr, SUMS_PAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    lo = tl.load(feat_ptr_ptr + f).to(tl.int32)
    hi = tl.load(feat_ptr_ptr + f + 1).to(tl.int32)
    total = tl.zeros((BLOCK_D,), ACC)
    sums = tl.zeros((SUMS_PAD,), ACC)
    ms = tl.arange(0, SUMS_PAD)
    for e0 in range(lo, hi, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < hi
        slot = tl.load(order_ptr + es, mask=e_ok, other=0)  # flat slot n * K + j
        n = slot // K
        level = tl.load(slot_level_ptr + slot % K, mask=e_ok, other=0)
        c = tl.load(coef_ptr + slot, mask=e_ok, other=0.0).to(ACC) * tl.load(gain_ptr + level).to(ACC)
        ok = e_ok[:, None] & d_ok[None, :]
        r = tl.load(r_ptr + (level * r_level_stride + n * d)[:, None] + ds[None, :], mask=ok, other=0.0).to(ACC)
        total += tl.sum(c[:, None] * r, axis=0)
        if NUM_SUMS > 0:
            e = tl.load(extra_ptr + ms[None, :] * (N * K) + slot[:, None],
                        mask=e_ok[:, None] & (ms < NUM_SUMS)[None, :], other=0.0).to(ACC)
            sums += tl.sum(e, axis=0)
    tl.store(out_ptr + f * d + ds, total, mask=d_ok)
    if NUM_SUMS > 0:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + ms * F + f, sums, mask=ms < NUM_SUMS)


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_levels(level_widths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) int32 level of each slot, and (L + 1,) int32 first slot of each level (shared: read only)."""
    return _slot_levels(tuple(int(w) for w in level_widths), torch.device(device))


@functools.lru_cache(maxsize=64)
def _slot_levels(level_widths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: a host-to-device copy from pageable memory synchronises the stream, and every
    # launcher needs these, so uncached they were a dozen syncs in each GPU training step.
    widths = torch.tensor(level_widths, dtype=torch.int64)
    stops = torch.zeros(len(level_widths) + 1, dtype=torch.int32)
    stops[1:] = widths.cumsum(0)
    levels = torch.repeat_interleave(torch.arange(len(level_widths), dtype=torch.int32), widths)
    return levels.to(device), stops.to(device)


def gather_sum(idx, coef, W, gain, level_widths: list[int], bias=None, prefixes: bool = False, out_dtype=None):
    """out (N, d) = bias + sum_j gain[level j] * coef[n, j] * W[idx[n, j]], or with `prefixes` the
    stack (L, N, d) of the running sums after each level, top level first (out[l] = P_l)."""
    idx, coef, W = idx.contiguous(), coef.contiguous(), W.contiguous()
    N, K = idx.shape
    d = W.shape[1]
    levels, stops = slot_levels(level_widths, idx.device)
    L = len(level_widths)
    out = new_output((L, N, d) if prefixes else (N, d), out_dtype or W.dtype, W.device)
    if N:
        tuned = _gather_sum_tuned is not None and N * K * d >= _GATHER_AUTOTUNE_MIN_WORK
        kernel, blocks = (_gather_sum_tuned, {}) if tuned else (_gather_sum_kernel,
                                                                {"BLOCK_K": _BLOCK_K, "BLOCK_D": _BLOCK_D})
        kernel[lambda meta: (N, triton.cdiv(d, meta["BLOCK_D"]))](
            idx, coef, levels, gain.contiguous(), stops, W, bias if bias is not None else W, out,
            N, K, d, L,
            HAS_BIAS=bias is not None, PREFIXES=prefixes, ACC=acc_dtype(W.dtype), **blocks,
        )
    return out


def gather_dot(idx, G, W, level_widths: list[int], active=None):
    """out (N, K) = <G[level j][n], W[idx[n, j]]>; G is (N, d) (one gradient for all levels) or (L, N, d).
    With `active` (N, K): 0 wherever active is 0, those rows not read."""
    idx, G, W = idx.contiguous(), G.contiguous(), W.contiguous()
    N, K = idx.shape
    d = W.shape[1]
    levels, _ = slot_levels(level_widths, idx.device)
    out = new_output((N, K), _acc_torch(W.dtype), W.device)
    if N and K:
        _gather_dot_kernel[(N, triton.cdiv(K, _BLOCK_K))](
            idx, levels, G, W, active.contiguous() if active is not None else idx, out, N, K, d,
            N * d if G.dim() == 3 else 0,
            ACTIVE_ONLY=active is not None, ACC=acc_dtype(W.dtype), BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
        )
    return out


def scatter_rows(idx, coef, R, gain, level_widths: list[int], num_features: int, extras=None):
    """Per-feature sums over slots: out (F, d)[f] = sum_{idx[n, j] == f} gain[level j] * coef[n, j] *
    R[level j][n], with R (N, d) or (L, N, d) (None: no rows, out is None); and, for extras
    (M, N, K), sums (M, F)[m, f] = sum_{idx[n, j] == f} extras[m, n, j]. Features no slot names get
    exact zeros."""
    has_rows = R is not None
    idx, coef = idx.contiguous(), coef.contiguous()
    R = R.contiguous() if has_rows else coef  # without rows, d = 0 and R is never read
    N, K = idx.shape
    d = R.shape[-1] if has_rows else 0
    F = num_features
    acc = _acc_torch(R.dtype if has_rows else coef.dtype)
    levels, _ = slot_levels(level_widths, idx.device)
    r_level_stride = N * d if R.dim() == 3 else 0
    num_sums = 0 if extras is None else extras.shape[0]
    extras = extras.contiguous() if extras is not None else coef
    gain = gain.contiguous()
    if deterministic():
        # Slots that add nothing (a zero coefficient and zero extras) sort after every feature, as id
        # F: feature 0 would otherwise walk every empty slot of the batch in one program.
        dead = coef == 0
        if num_sums:
            dead &= (extras[:num_sums] == 0).all(0)
        flat = idx.reshape(-1).masked_fill(dead.reshape(-1), F)
        sorted_feat, order = torch.sort(flat, stable=True)
        feat_ptr = torch.searchsorted(sorted_feat, torch.arange(F + 1, device=idx.device))
        out = new_output((F, d), acc, R.device)
        sums = new_output((num_sums, F), acc, R.device)
        if F:
            _scatter_rows_sorted_kernel[(F, max(1, triton.cdiv(d, _BLOCK_D)))](
                order, feat_ptr, coef, levels, gain, R, extras, out, sums,
                N, K, d, F, r_level_stride,
                NUM_SUMS=num_sums, SUMS_PAD=max(2, triton.next_power_of_2(max(num_sums, 1))),
                ACC=acc_dtype(R.dtype), BLOCK_E=_BLOCK_E, BLOCK_D=_BLOCK_D,
            )
        return out if has_rows else None, sums
    out = torch.zeros((F, d), dtype=acc, device=R.device)
    sums = torch.zeros((num_sums, F), dtype=acc, device=R.device)
    if N and K:
        _scatter_rows_atomic_kernel[(N, max(1, triton.cdiv(d, _BLOCK_D)))](
            idx, coef, levels, gain, R, extras, out, sums,
            N, K, d, F, r_level_stride,
            NUM_SUMS=num_sums, ACC=acc_dtype(R.dtype), BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
        )
    return out if has_rows else None, sums


def decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths: list[int], prefixes: bool):
    """x_hat (N, d) = b_dec + sum_l gain_l * sum_j vals * W_dec[idx] in W_dec's dtype, or with
    `prefixes` the stack (L, N, d) of P_m = b_dec + sum_{l >= m} gain_l * D_l (P_0 = x_hat)."""
    return gather_sum(idx, vals, W_dec, level_gain, level_widths, bias=b_dec.contiguous(), prefixes=prefixes)


def decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths: list[int], prefixes: bool,
                    need_vals: bool, need_W_dec: bool, need_gain: bool, grad_active_only: bool = False):
    """g_vals (N, K), g_W_dec (F, d), g_level_gain (L,), g_b_dec (d,) in the accumulation dtype;
    `grad_active_only`: g_vals is 0 where vals is 0 (those slots then cost nothing)."""
    acc = _acc_torch(W_dec.dtype)
    g = g_out.to(acc)
    # With prefixes, level l's decode appears in P_0 .. P_l: its upstream gradient is their sum.
    g_levels = torch.cumsum(g, 0) if prefixes else g
    g_b = g.reshape(-1, g.shape[-1]).sum(0)
    g_vals = g_W = None
    g_gain = torch.zeros(len(level_widths), dtype=acc, device=idx.device)  # stays 0 unless asked for
    if need_vals or need_gain:
        # <g_level, W_dec[idx]>, before the gain; where vals is 0 it adds nothing to g_gain either
        dots = gather_dot(idx, g_levels, W_dec, level_widths, vals if grad_active_only else None)
        levels, _ = slot_levels(level_widths, idx.device)
        g_vals = dots * level_gain.to(acc)[levels.long()]
        per_slot = (vals.to(acc) * dots).sum(0)
        g_gain = torch.stack([level.sum() for level in per_slot.split(level_widths)])
    if need_W_dec:
        g_W, _ = scatter_rows(idx, vals, g_levels, level_gain, level_widths, W_dec.shape[0])
    return g_vals, g_W, g_gain, g_b
