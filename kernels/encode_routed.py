"""Routed encode of a gated level: scores only for the unpruned children of each token's active parents.

The (token, active parent) pairs are sorted by parent, and each parent's run of pairs is cut into
blocks of BLOCK_T tokens: one program per block multiplies its tokens' rows of xc by the parent's
child rows of W_enc (a grouped GEMM: every group shares one block of weights, read once per block
of tokens). Child rows come from the plan's CSR lists (`child_ptr`, `child_ids`), contiguous under
the default parent map, gathered under a custom one. Scores land in the (N, kp * C) candidate table
(C = max_children), column j * C + c for child c of parent slot j, and `top_candidates` keeps each
token's kmax best. No N x F_l buffer is made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, acc_dtype, dot_operand_dtype, dot_precision
from .select import top_candidates


@triton.jit
def _routed_scores_kernel(
    xc_ptr, w_ptr, b_ptr, edge_ptr,             # xc (N, d); W_enc (F, d); b_enc, edge_weight (F,)
    pval_ptr,                                   # parent activations (N, kp)
    pair_order_ptr,                             # (N * kp,) pair ids n * kp + j, sorted by parent
    pair_ptr_ptr, block_ptr_ptr, block_parent_ptr,  # per parent: first pair, first block; per block: parent
    child_ptr_ptr, child_ids_ptr,               # CSR children of each parent (local parent ids)
    cand_score_ptr, cand_id_ptr,                # (N, kp * C) candidate table
    d, kp, C, num_parents,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    p = tl.load(block_parent_ptr + block)
    valid = p < num_parents  # the grid is an upper bound on the number of blocks
    p = tl.minimum(p, num_parents - 1)
    first = tl.load(pair_ptr_ptr + p) + (block - tl.load(block_ptr_ptr + p)) * BLOCK_T
    last = tl.where(valid, tl.load(pair_ptr_ptr + p + 1), first)
    t = first + tl.arange(0, BLOCK_T)
    pair_ok = t < last
    pair = tl.load(pair_order_ptr + t, mask=pair_ok, other=0)
    token = pair // kp
    parent_slot = pair % kp
    p_val = tl.load(pval_ptr + pair, mask=pair_ok, other=0.0).to(ACC)

    c_lo = tl.load(child_ptr_ptr + p).to(tl.int32)
    c_hi = tl.where(valid, tl.load(child_ptr_ptr + p + 1).to(tl.int32), c_lo)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        child_ok = cs < c_hi
        child = tl.load(child_ids_ptr + cs, mask=child_ok, other=0)
        acc = tl.zeros((BLOCK_T, BLOCK_C), ACC)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d
            x = tl.load(xc_ptr + token[:, None] * d + ks[None, :], mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + child[None, :] * d + ks[:, None], mask=child_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
        bias = tl.load(b_ptr + child, mask=child_ok, other=0.0).to(ACC)
        edge = tl.load(edge_ptr + child, mask=child_ok, other=0.0).to(ACC)
        s = acc + bias[None, :] + edge[None, :] * p_val[:, None]
        col = token[:, None] * (kp * C) + parent_slot[:, None] * C + (cs - c_lo)[None, :]
        ok = pair_ok[:, None] & child_ok[None, :]
        tl.store(cand_score_ptr + col, s, mask=ok)
        tl.store(cand_id_ptr + col, child[None, :], mask=ok)


_GPU_BLOCKS = {"BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}  # no sm_90 spills (--compile-check)
_INTERPRETER_BLOCKS = {"BLOCK_T": 16, "BLOCK_D": 16}
_MAX_BLOCK_C = 16 if INTERPRETED else 64


def _child_block(max_children: int) -> int:
    """Child tile width: the widest group rounded up (tl.dot needs 16), capped; wider groups loop."""
    return min(max(16, triton.next_power_of_2(max_children)), _MAX_BLOCK_C)


def _group_pairs_by_parent(parent_idx, parent_vals, num_parents: int, block_t: int):
    """Sort the (token, active parent) pairs by parent and cut each parent's run into blocks.

    Returns pair_order (N * kp,), pair_ptr (num_parents + 1,), block_ptr (num_parents + 1,) and
    block_parent (n_blocks_bound,): the parent of each block, `num_parents` past the last block.
    The bound cdiv(pairs, block_t) + min(pairs, num_parents) avoids reading the count on the host.
    """
    device = parent_idx.device
    bucket = parent_idx.masked_fill(parent_vals == 0, num_parents).reshape(-1)  # inactive: past the last
    sorted_bucket, pair_order = torch.sort(bucket, stable=True)
    # Each parent's first pair, read off the sorted ids: no histogram (on CUDA bincount syncs, and
    # an atomic count piles every inactive pair onto one counter).
    pair_ptr = torch.searchsorted(sorted_bucket, torch.arange(num_parents + 1, device=device))
    blocks = (pair_ptr[1:] - pair_ptr[:-1]).add_(block_t - 1).floor_divide_(block_t)
    block_ptr = torch.nn.functional.pad(blocks.cumsum(0), (1, 0))
    pairs = bucket.numel()
    bound = max(1, triton.cdiv(pairs, block_t) + min(pairs, num_parents))
    block_parent = torch.searchsorted(block_ptr[1:], torch.arange(bound, device=device), right=True)
    return pair_order, pair_ptr, block_ptr, block_parent


def encode_routed(xc, W_enc, b_enc, edge_weight, parent_idx, parent_vals, child_ptr, child_ids,
                  max_children: int, kmax: int):
    """Each token's kmax best children of its active parents (hard gating).

    xc (N, d); parent_idx / parent_vals (N, kp) the level above's codes (value 0: inactive);
    child_ptr (P + 1,), child_ids: unpruned children of each parent; all ids level-local.
    Returns idx (N, kmax) int64, scores (N, kmax) float32 (float64 for float64 input; -inf where
    no candidate, id 0), parent_slot (N, kmax) int64: the slot j of the child's parent.
    """
    xc, W_enc = xc.contiguous(), W_enc.contiguous()
    N, d = xc.shape
    kp = parent_idx.shape[1]
    C = max_children
    acc_torch = torch.float64 if xc.dtype == torch.float64 else torch.float32
    cand_scores = torch.full((N, kp * C), float("-inf"), dtype=acc_torch, device=xc.device)
    cand_ids = torch.empty((N, kp * C), dtype=torch.int32, device=xc.device)  # read only where a score is
    num_parents = child_ptr.numel() - 1
    if N and C and child_ids.numel():
        blocks = _INTERPRETER_BLOCKS if INTERPRETED else _GPU_BLOCKS
        pair_order, pair_ptr, block_ptr, block_parent = _group_pairs_by_parent(
            parent_idx, parent_vals, num_parents, blocks["BLOCK_T"])
        _routed_scores_kernel[(block_parent.numel(),)](
            xc, W_enc, b_enc.contiguous(), edge_weight.contiguous(), parent_vals.contiguous(),
            pair_order, pair_ptr, block_ptr, block_parent, child_ptr, child_ids,
            cand_scores, cand_ids,
            d, kp, C, num_parents,
            ACC=acc_dtype(xc.dtype), DOT=dot_operand_dtype(xc.dtype), PRECISION=dot_precision(xc.dtype),
            BLOCK_C=_child_block(C), **blocks,
        )
    return top_candidates(cand_scores, cand_ids, None, kmax, slot_width=max(C, 1))
