"""Sparse backward of both encodes, through the kept slots (straight-through selection).

With g = dL/ds (N, K) for slots idx (N, K) of one level:
    g_xc[n]      = sum_j g[n, j] * W_enc[idx[n, j]]            (`decode.gather_sum`)
    g_W_enc[f]   = sum_{idx[n, j] == f} g[n, j] * xc[n]        (`decode.scatter_rows`)
    g_b_enc[f]   = sum_{idx[n, j] == f} g[n, j]                (its per-feature sums)
    g_edge[f]    = sum_{idx[n, j] == f} g[n, j] * a_parent[n, slot]
    g_parent[n, s] = sum_{j: parent_slot[n, j] == s} g[n, j] * edge_weight[idx[n, j]]
All O(N * K * d); a feature no slot names (a pruned one) gets exact zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hsae_fast.backends.common import new_output

from . import acc_dtype
from .decode import gather_sum, scatter_rows

_BLOCK_K = 32


@triton.jit
def _parent_grad_kernel(
    g_ptr, idx_ptr, slot_ptr, edge_ptr, out_ptr, K, kp,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, KP_PAD: tl.constexpr,
):
    n = tl.program_id(0)
    parents = tl.arange(0, KP_PAD)
    total = tl.zeros((KP_PAD,), ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        slot = tl.load(slot_ptr + n * K + ks, mask=k_ok, other=-1)
        feat = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
        contrib = tl.load(g_ptr + n * K + ks, mask=k_ok, other=0.0).to(ACC) * tl.load(edge_ptr + feat).to(ACC)
        total += tl.sum(tl.where(slot[None, :] == parents[:, None], contrib[None, :], 0.0), axis=1)
    tl.store(out_ptr + n * kp + parents, total, mask=parents < kp)


def _parent_grad(g, idx, parent_slot, edge_weight, kp: int) -> torch.Tensor:
    N, K = g.shape
    out = new_output((N, kp), g.dtype, g.device)
    if N and kp:
        _parent_grad_kernel[(N,)](
            g, idx.contiguous(), parent_slot.contiguous(), edge_weight.contiguous(), out, K, kp,
            ACC=acc_dtype(g.dtype), BLOCK_K=_BLOCK_K, KP_PAD=max(2, triton.next_power_of_2(kp)),
        )
    return out


def encode_backward(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
                    need_xc: bool, need_W_enc: bool, need_edge: bool, need_parent_vals: bool):
    """Returns g_xc (N, d), g_W_enc (F, d), g_b_enc (F,), g_edge (F,), g_parent_vals (N, kp) in the
    accumulation dtype, or None where not needed (g_b_enc always)."""
    acc = torch.float64 if xc.dtype == torch.float64 else torch.float32
    g = g_scores.to(acc).contiguous()
    F = W_enc.shape[0]
    K = idx.shape[1]
    one_level = [K]
    unit_gain = torch.ones(1, dtype=acc, device=g.device)
    g_xc = gather_sum(idx, g, W_enc, unit_gain, one_level, out_dtype=acc) if need_xc else None
    has_parent = parent_vals is not None
    extras = [g]
    if has_parent and need_edge:
        found = parent_slot >= 0
        a_parent = parent_vals.to(acc).gather(1, parent_slot.clamp(min=0)) * found
        extras.append(g * a_parent)
    g_W, sums = scatter_rows(idx, g, xc if need_W_enc else None, unit_gain, one_level, F, torch.stack(extras))
    g_b = sums[0]
    g_edge = sums[1].clone() if len(extras) > 1 else None  # outputs of a custom op must not alias
    g_parent = _parent_grad(g, idx, parent_slot, edge_weight, parent_vals.shape[1]) if has_parent and need_parent_vals else None
    return g_xc, g_W, g_b, g_edge, g_parent
