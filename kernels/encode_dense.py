"""Dense encode of one level (the top level, a flat SAE, or any level with gating "none").

    s[n, i] = (x - b_dec)[n] . W_enc[i] + b_enc[i] (+ edge_weight[i] * a_parent[n, parent[i]])

for every unpruned feature i of the level, and each token's kmax largest, without ever holding
the N x F_l scores. Each program owns a block of rows and a chunk of the level's features; it
walks the chunk tile by tile (a GEMM tile on the tensor cores), and folds each tile into a
running per-row top-kmax kept in registers: the tile's best element of every row replaces the
row's current worst while it beats it, so after the first tiles most tiles need one or two
steps. The (N, n_chunks, kmax) partial winners are merged by `kernels.select.top_candidates`.
Memory: O(N * n_chunks * kmax).

HSAE_DENSE_ENCODE=gemm picks the other implementation for levels without parent codes, the vendor
GEMM: cuBLAS scores a block of rows (float32 results, at most `GEMM_BLOCK_SCORES` of them) and
`torch.topk` keeps each row's kmax. It is not the default (`auto` = fused): cuBLAS + topk on
bfloat16 scores beats the fused kernel, but the exact float32 scores this contract needs make the
top-k twice the work. On an H200 (bench/results/gpu-h200), N=8192, d=2304, F=65536, K=64 bf16:
fused 11.6 ms, gemm 12.4 ms; issue 10's flat forward (d=768, batch kmax 128): 12.8 against 11.6.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INTERPRETED, acc_dtype, dot_operand_dtype, dot_precision, num_sms
from .select import top_candidates


# Packed keys (float32 accumulation): a score and its feature id in one int64 whose integer order
# is the score order (ties: larger id first). One max per step finds a row's best score and its id
# together; the running winners need no separate id array and no argmax/argmin.
_DEAD_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every key: pruned or out-of-range entries
_LOW_MASK: tl.constexpr = tl.constexpr(2**32 - 1)


@triton.jit
def _key_of_score(s):
    """float32 (BLOCK_N, BLOCK_F) -> int32 with the same order (sign-magnitude to two's complement)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _score_of_key(high):
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _score_tile(xc_ptr, w_ptr, b_ptr, live_ptr, edge_ptr, parent_ptr, pidx_ptr, pval_ptr,
                rows, row_ok, f0, chunk_hi, d, kp,
                HAS_PARENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores (BLOCK_N, BLOCK_F) of the level's features f0 + [0, BLOCK_F), -inf where pruned or
    outside the chunk, and each entry's parent slot (-1: none)."""
    feats = f0 + tl.arange(0, BLOCK_F)
    feat_ok = f0 + tl.arange(0, BLOCK_F) < chunk_hi
    acc = tl.zeros((BLOCK_N, BLOCK_F), ACC)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < d
        x = tl.load(xc_ptr + rows[:, None] * d + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + feats[None, :] * d + ks[:, None], mask=feat_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    s = acc + tl.load(b_ptr + feats, mask=feat_ok, other=0.0).to(ACC)[None, :]
    slot = tl.zeros((BLOCK_N, BLOCK_F), tl.int32) - 1
    if HAS_PARENT:
        # Edge term: a child's score gets edge_weight * its parent's activation, where active.
        my_parent = tl.load(parent_ptr + feats, mask=feat_ok, other=-1)
        edge = tl.load(edge_ptr + feats, mask=feat_ok, other=0.0).to(ACC)
        for j in range(0, kp):
            p_id = tl.load(pidx_ptr + rows * kp + j, mask=row_ok, other=-1)
            p_val = tl.load(pval_ptr + rows * kp + j, mask=row_ok, other=0.0).to(ACC)
            match = (my_parent[None, :] == p_id[:, None]) & (p_val[:, None] != 0)
            s += tl.where(match, edge[None, :] * p_val[:, None], 0.0)
            slot = tl.where(match, j, slot)
    live = feat_ok & (tl.load(live_ptr + feats, mask=feat_ok, other=0) != 0)
    s = tl.where(live[None, :] & row_ok[:, None], s, float("-inf"))
    return s, slot


@triton.jit
def _dense_topk_kernel(
    xc_ptr, w_ptr, b_ptr, live_ptr,            # xc (N, d); W_enc (F, d); b_enc (F,); path_mask (F,) int8
    edge_ptr, parent_ptr, pidx_ptr, pval_ptr,  # edge_weight (F,), parent (F,); parent codes (N, kp): HAS_PARENT only
    out_score_ptr, out_id_ptr, out_slot_ptr,   # partial winners (N, n_chunks, KMAX)
    N, d, kp, level_size, chunk_size, n_chunks,
    KMAX: tl.constexpr, KPAD: tl.constexpr, SLOT_BITS: tl.constexpr,
    HAS_PARENT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    PACKED: tl.constexpr = ACC == tl.float32
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tile_cols = tl.arange(0, BLOCK_F)
    best_cols = tl.arange(0, KPAD)
    # Running winners of each row. Empty slots sit below every live score (packed: distinct keys
    # just above _DEAD_KEY); pad columns (>= KMAX) sit above everything, so they are never the worst.
    if PACKED:
        best = tl.where(best_cols[None, :] < KMAX, _DEAD_KEY + 1 + best_cols[None, :].to(tl.int64),
                        0x7FFFFFFFFFFFFFFF) + tl.zeros((BLOCK_N, KPAD), tl.int64)
    else:
        best = tl.where(best_cols[None, :] < KMAX, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, KPAD), ACC)
        best_id = tl.zeros((BLOCK_N, KPAD), tl.int32)
        best_slot = tl.zeros((BLOCK_N, KPAD), tl.int32) - 1

    chunk_lo = chunk * chunk_size
    chunk_hi = tl.minimum(chunk_lo + chunk_size, level_size)
    for f0 in range(chunk_lo, chunk_hi, BLOCK_F):
        s, slot = _score_tile(xc_ptr, w_ptr, b_ptr, live_ptr, edge_ptr, parent_ptr, pidx_ptr, pval_ptr,
                              rows, row_ok, f0, chunk_hi, d, kp,
                              HAS_PARENT, ACC, DOT, PRECISION, BLOCK_N, BLOCK_F, BLOCK_D)
        # Fold the tile into the running winners: move each row's tile maximum in while it beats
        # the row's worst winner (a row's maximum that does not improve it never will: dropped).
        if PACKED:
            low = ((f0 + tile_cols)[None, :] << SLOT_BITS) + (slot + 1)  # local id and parent slot + 1
            keys = (_key_of_score(s).to(tl.int64) << 32) | low.to(tl.int64)
            keys = tl.where(s == float("-inf"), _DEAD_KEY, keys)
            top = tl.max(keys, axis=1)
            worst = tl.min(best, axis=1)
            while tl.max((top > worst).to(tl.int32), axis=0) > 0:
                best = tl.where((best == worst[:, None]) & (top > worst)[:, None], top[:, None], best)
                keys = tl.where(keys == top[:, None], _DEAD_KEY, keys)
                top = tl.max(keys, axis=1)
                worst = tl.min(best, axis=1)
        else:
            top = tl.max(s, axis=1)
            improving = top > tl.min(best, axis=1)
            while tl.max(improving.to(tl.int32), axis=0) > 0:
                top_col = tl.argmax(s, axis=1)
                at_top = tile_cols[None, :] == top_col[:, None]
                put = (best_cols[None, :] == tl.argmin(best, axis=1)[:, None]) & improving[:, None]
                best = tl.where(put, top[:, None], best)
                best_id = tl.where(put, (f0 + top_col)[:, None], best_id)
                if HAS_PARENT:
                    best_slot = tl.where(put, tl.sum(tl.where(at_top, slot, 0), axis=1)[:, None], best_slot)
                s = tl.where(at_top, float("-inf"), s)
                top = tl.max(s, axis=1)
                improving = top > tl.min(best, axis=1)

    if PACKED:
        high = (best >> 32).to(tl.int32)
        low = (best & _LOW_MASK).to(tl.int32)
        empty = best <= _DEAD_KEY + KPAD
        best_score = tl.where(empty, float("-inf"), _score_of_key(high))
        best_id = tl.where(empty, 0, low >> SLOT_BITS)
        best_slot = tl.where(empty, -1, (low & ((1 << SLOT_BITS) - 1)) - 1)
    else:
        best_score = best
    out = (rows[:, None] * n_chunks + chunk) * KMAX + best_cols[None, :]
    out_ok = row_ok[:, None] & (best_cols[None, :] < KMAX)
    tl.store(out_score_ptr + out, best_score, mask=out_ok)
    tl.store(out_id_ptr + out, best_id, mask=out_ok)
    tl.store(out_slot_ptr + out, best_slot, mask=out_ok)


def _gpu_configs():
    """Hopper candidates: BLOCK_D 32 keeps the gathered operand tiles and the running winners in
    registers (sm_90 compiles of BLOCK_D 64 spill; `bench/gpu_run.sh --compile-check` shows it)."""
    shapes = ((64, 128, 32, 8), (64, 64, 32, 4), (32, 128, 32, 4),  # spill-free at KMAX 64
              (32, 128, 32, 8), (64, 64, 32, 8),  # spill-free at KMAX 256 (batch selection, cap 4 x k 64)
              (128, 128, 32, 8), (64, 128, 64, 8))  # small spills, better tensor-core tiles
    return [triton.Config({"BLOCK_N": n, "BLOCK_F": f, "BLOCK_D": dk}, num_warps=warps, num_stages=stages)
            for n, f, dk, warps in shapes for stages in (3, 4)]


# The interpreter runs one program at a time in numpy: few, large blocks are fastest there. On a
# GPU, small problems (tests, tiny levels) skip autotuning: compiling every config costs seconds.
_FIXED_BLOCKS = ({"BLOCK_N": 32, "BLOCK_F": 32, "BLOCK_D": 16} if INTERPRETED
                 else {"BLOCK_N": 64, "BLOCK_F": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3})
_AUTOTUNE_MIN_WORK = 1 << 24  # N * level_size above which the autotuned kernel runs
_dense_topk_tuned = None if INTERPRETED else triton.autotune(
    configs=_gpu_configs(), key=["d", "KMAX", "HAS_PARENT"])(_dense_topk_kernel)


def _num_chunks(N: int, level_size: int, device: torch.device) -> int:
    """Feature chunks per row block: enough programs to fill the GPU twice, never empty chunks."""
    if INTERPRETED:
        return 1
    row_blocks = triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(2 * num_sms(device), row_blocks), triton.cdiv(level_size, 128)))


GEMM_BLOCK_SCORES = 1 << 26  # the gemm path's scores buffer: 256 MiB of float32, whatever N and F


def dense_encode_impl(xc: torch.Tensor, has_parent: bool) -> str:
    """"gemm" or "fused" (HSAE_DENSE_ENCODE; auto is fused). Levels with parent codes (gating "none"
    below the top) always take the fused kernel, which adds the edge term per tile; so do float32
    levels on CUDA while torch may use TF32 (the float32 contract is exact products)."""
    choice = os.environ.get("HSAE_DENSE_ENCODE", "auto").strip().lower()
    if choice not in ("auto", "gemm", "fused"):
        raise ValueError(f"HSAE_DENSE_ENCODE={choice!r}: expected auto, gemm or fused")
    tf32 = xc.is_cuda and xc.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "gemm" if choice == "gemm" and not has_parent and not tf32 else "fused"


def _gemm_scores(xc, W_enc, bias):
    """(rows, F) float32 scores xc @ W_enc.T + bias (float64 for float64): half-precision operands
    multiply on the tensor cores with float32 results (cuBLAS); elsewhere they are widened first."""
    if xc.is_cuda and xc.dtype in (torch.bfloat16, torch.float16):
        return torch.addmm(bias, xc, W_enc.T, out_dtype=torch.float32)
    return torch.addmm(bias, xc.to(bias.dtype), W_enc.to(bias.dtype).T)


def _encode_dense_gemm(xc, W_enc, b_enc, path_mask, kmax: int):
    N, F = xc.shape[0], W_enc.shape[0]
    acc_torch = torch.float64 if xc.dtype == torch.float64 else torch.float32
    bias = b_enc.to(acc_torch).masked_fill(~path_mask.bool(), float("-inf"))  # pruned: never selected
    width = min(kmax, F)
    top_scores = torch.empty((N, width), dtype=acc_torch, device=xc.device)
    top_ids = torch.empty((N, width), dtype=torch.int64, device=xc.device)
    rows = max(1, GEMM_BLOCK_SCORES // max(F, 1))
    for r0 in range(0, N if width else 0, rows):
        block = _gemm_scores(xc[r0:r0 + rows], W_enc, bias)
        torch.topk(block, width, dim=1, out=(top_scores[r0:r0 + rows], top_ids[r0:r0 + rows]))
        del block  # one block alive at a time
    return top_candidates(top_scores, top_ids, None, kmax)


def encode_dense(xc, W_enc, b_enc, path_mask, kmax: int,
                 edge_weight=None, parent=None, parent_idx=None, parent_vals=None):
    """Each token's kmax best unpruned features of one level (ids level-local, as in the contract).

    xc (N, d) = x - b_dec; W_enc (F_l, d); b_enc, path_mask (F_l,). With parent codes (gating "none"
    below the top): edge_weight, parent (F_l,), parent_idx / parent_vals (N, kp) add the edge term
    and report each winner's parent slot. Returns idx (N, kmax) int64, scores (N, kmax) float32
    (float64 for float64 input; -inf where no candidate, id 0), parent_slot (N, kmax).
    """
    xc, W_enc, b_enc = xc.contiguous(), W_enc.contiguous(), b_enc.contiguous()
    N, d = xc.shape
    level_size = W_enc.shape[0]
    device = xc.device
    has_parent = parent_idx is not None
    dot_operand_dtype(xc.dtype)  # names an unsupported dtype, whichever path runs
    if dense_encode_impl(xc, has_parent) == "gemm":
        return _encode_dense_gemm(xc, W_enc, b_enc, path_mask, kmax)
    acc_torch = torch.float64 if xc.dtype == torch.float64 else torch.float32
    # Packed keys hold (local id << SLOT_BITS) + parent slot + 1 in 31 bits.
    slot_bits = (parent_idx.shape[1] + 1).bit_length() if has_parent else 0
    if (level_size << slot_bits) >= 2**31:
        raise ValueError(f"triton dense encode: level_size={level_size} with {slot_bits} parent-slot bits "
                         f"does not fit a 31-bit key; use the torch backend for levels this large")
    n_chunks = _num_chunks(N, level_size, device)
    chunk_size = triton.cdiv(level_size, n_chunks)
    part_scores = torch.empty((N, n_chunks, kmax), dtype=acc_torch, device=device)
    part_ids = torch.empty((N, n_chunks, kmax), dtype=torch.int32, device=device)
    part_slots = torch.empty((N, n_chunks, kmax), dtype=torch.int32, device=device)
    if N:
        live = path_mask.to(torch.int8)
        if has_parent:
            parent_args = (edge_weight.contiguous(), parent.contiguous(), parent_idx.contiguous(),
                           parent_vals.contiguous(), parent_idx.shape[1])
        else:  # never read: HAS_PARENT is a compile-time False
            parent_args = (b_enc, live, live, b_enc, 0)
        edge_arg, parent_arg, pidx_arg, pval_arg, kp = parent_args
        tuned = _dense_topk_tuned is not None and N * level_size >= _AUTOTUNE_MIN_WORK
        kernel, blocks = (_dense_topk_tuned, {}) if tuned else (_dense_topk_kernel, _FIXED_BLOCKS)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_chunks)  # noqa: E731
        kernel[grid](
            xc, W_enc, b_enc, live, edge_arg, parent_arg, pidx_arg, pval_arg,
            part_scores, part_ids, part_slots,
            N, d, kp, level_size, chunk_size, n_chunks,
            KMAX=kmax, KPAD=triton.next_power_of_2(kmax), SLOT_BITS=slot_bits, HAS_PARENT=has_parent,
            ACC=acc_dtype(xc.dtype), DOT=dot_operand_dtype(xc.dtype), PRECISION=dot_precision(xc.dtype),
            **blocks,
        )
    width = n_chunks * kmax  # spelled out: with N = 0, view(N, -1) would be ambiguous
    return top_candidates(part_scores.view(N, width), part_ids.view(N, width),
                          part_slots.view(N, width) if has_parent else None, kmax)
