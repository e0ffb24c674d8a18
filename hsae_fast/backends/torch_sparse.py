"""The `torch` backend: the SPEC 4 ops in plain PyTorch, as fast as PyTorch alone allows.

Every op here is a plain function on tensors (no autograd); `hsae_fast/ops/` wraps them in
`torch.library` custom ops with a sparse backward. Shapes: N tokens, d model width, F features,
K = kmax slots per token. Nothing here is O(N * F * d) except the dense top-level GEMM; gated
levels are scored only on the children of active parents (routed encode, grouped by parent).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .common import accumulation_dtype, level_stops, new_output

NAME = "torch"

# Row chunks keep transient buffers (scores of a dense level, gathered rows) near this many elements.
_CHUNK_ELEMENTS = 1 << 22


def available() -> tuple[bool, str]:
    return True, "pure PyTorch, always available"


def _row_chunks(n_rows: int, row_elements: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _weighted_rows(idx: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * table[idx[n, j]]  -> (N, d): embedding_bag, no (N, K, d) buffer."""
    return torch.nn.functional.embedding_bag(idx, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def _scatter_rows(idx: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, num_features: int) -> torch.Tensor:
    """out[f] = sum over (n, j) with idx[n, j] == f of weights[n, j] * rows[n]  -> (F, d).

    The transpose of `_weighted_rows`: slots are sorted by feature (a stable sort: deterministic)
    and multiplied as a CSR (F, N) matrix, so no (N*K, d) buffer is built. Slots of weight 0 are
    left out: they add nothing, and they are most of a batch-selected code (kmax = 4 k slots) and
    all of its empty slots, which name feature 0 (on a GPU, one row's worth of serialised work)."""
    N, K = idx.shape
    w = weights.reshape(-1)
    kept = (w != 0).nonzero().squeeze(1)
    flat = idx.reshape(-1)[kept]
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(num_features + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.cumsum(torch.bincount(flat, minlength=num_features), 0)
    token = torch.div(kept[order], K, rounding_mode="floor")
    with warnings.catch_warnings():
        # CSR matmul is solid for this one product; its "beta" notice would only alarm users.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        # torch 2.11 warns that the checks are off even when asked to be (built valid above)
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        S = torch.sparse_csr_tensor(crow, token, w[kept[order]].to(rows.dtype), (num_features, N),
                                    check_invariants=False)
        return S @ rows


def _gather_dot(rows: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[n, j] = <rows[n], table[idx[n, j]]>, chunked over n so no (N, K, d) buffer is held whole."""
    N, K = idx.shape
    out = torch.empty(N, K, dtype=rows.dtype, device=rows.device)
    for a, b in _row_chunks(N, K * rows.shape[1]):
        out[a:b] = torch.bmm(table[idx[a:b]].to(rows.dtype), rows[a:b, :, None]).squeeze(-1)
    return out


def _route_candidates(parent_idx, parent_vals, child_ptr, child_ids, max_children):
    """Children of each token's active parents, padded: cand (N, kp, C) ids, valid (N, kp, C)."""
    N, kp = parent_idx.shape
    ar = torch.arange(max_children, device=parent_idx.device)
    p = parent_idx.clamp(min=0)
    start = child_ptr[p]
    count = torch.where(parent_vals != 0, child_ptr[p + 1] - start, 0)
    valid = ar < count[..., None]
    pos = (start[..., None] + ar).clamp(max=max(child_ids.numel() - 1, 0))
    cand = child_ids[pos] if child_ids.numel() else torch.zeros_like(pos)
    return cand, valid


def _parent_slot_by_match(idx, parent, parent_idx, parent_vals):
    """For each selected child, the slot of its parent among the parent codes (-1: parent inactive)."""
    match = (parent[idx][..., None] == parent_idx[:, None, :]) & (parent_vals[:, None, :] != 0)
    found = match.any(-1)
    return torch.where(found, match.int().argmax(-1).to(torch.int64), -1)


def encode_forward(
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    edge_weight: torch.Tensor,
    path_mask: torch.Tensor,
    parent: torch.Tensor,
    parent_idx: Optional[torch.Tensor],
    parent_vals: Optional[torch.Tensor],
    child_ptr: Optional[torch.Tensor],
    child_ids: Optional[torch.Tensor],
    max_children: int,
    kmax: int,
    routed: bool,
):
    """Scores of one level and each token's kmax best candidates.

    W_enc (F_l, d), b_enc, edge_weight, path_mask, parent (F_l,) are this level's rows only, and
    every id is level-local: parent[f] and parent_idx (N, kp) index the level above, child_ids and
    the returned idx this level. (`ops/encode.py` runs the levels and offsets the ids.)

    Returns idx (N, kmax) int64, scores (N, kmax) float32 (float64 for float64 input; -inf in slots
    with no candidate, whose id is then 0), parent_slot (N, kmax) int64: the slot in parent_idx of
    the feature's parent if that parent is active, else -1.
    """
    acc = accumulation_dtype(xc.dtype)
    N, d = xc.shape
    xc_acc = xc.to(acc)
    idx = new_output((N, kmax), torch.int64, xc.device)
    scores = new_output((N, kmax), acc, xc.device)
    parent_slot = new_output((N, kmax), torch.int64, xc.device)
    level_size = W_enc.shape[0]
    if routed:
        if max_children == 0:
            idx.fill_(0), scores.fill_(float("-inf")), parent_slot.fill_(-1)
            return idx, scores, parent_slot
        cand, valid = _route_candidates(parent_idx, parent_vals, child_ptr, child_ids, max_children)
        kp, C = cand.shape[1], cand.shape[2]
        cand = cand.reshape(N, kp * C)
        s = _gather_dot(xc_acc, W_enc, cand)
        s += b_enc.to(acc)[cand] + edge_weight.to(acc)[cand] * parent_vals.to(acc).repeat_interleave(C, dim=1)
        s.masked_fill_(~valid.reshape(N, kp * C), float("-inf"))
        width = min(kmax, kp * C)
        top_s, top_pos = s.topk(width, dim=1)
        scores[:, :width], idx[:, :width], parent_slot[:, :width] = top_s, cand.gather(1, top_pos), top_pos // C
        scores[:, width:], idx[:, width:] = float("-inf"), 0
        parent_slot[scores == float("-inf")] = -1
        return idx, scores, parent_slot

    W = W_enc.to(acc)
    b = b_enc.to(acc)
    pruned = ~path_mask
    use_edges = parent_idx is not None and bool(edge_weight.any())
    if use_edges:
        cand, valid = _route_candidates(parent_idx, parent_vals, child_ptr, child_ids, max_children)
        bonus = edge_weight.to(acc)[cand] * parent_vals.to(acc)[..., None] * valid
    width = min(kmax, level_size)
    for a, e in _row_chunks(N, level_size):
        s = torch.addmm(b, xc_acc[a:e], W.T)
        if use_edges:
            s.scatter_add_(1, cand[a:e].reshape(e - a, -1), bonus[a:e].reshape(e - a, -1))
        s.masked_fill_(pruned, float("-inf"))
        top_s, top_i = s.topk(width, dim=1)
        scores[a:e, :width], idx[a:e, :width] = top_s, top_i
    scores[:, width:], idx[:, width:] = float("-inf"), 0
    if parent_idx is None:
        parent_slot.fill_(-1)
    else:
        parent_slot.copy_(_parent_slot_by_match(idx, parent, parent_idx, parent_vals))
    return idx, scores, parent_slot


def encode_backward(
    g_scores: torch.Tensor,
    idx: torch.Tensor,
    parent_slot: torch.Tensor,
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    edge_weight: torch.Tensor,
    parent_vals: Optional[torch.Tensor],
    need_xc: bool,
    need_W_enc: bool,
    need_edge: bool,
    need_parent_vals: bool,
):
    """Sparse backward of encode_forward through the kept slots (straight-through selection).

    idx indexes the rows of the W_enc given (`ops/encode.py` passes the whole dictionary and every
    level's slots with global ids, so the W_enc gradient is one buffer). Returns g_xc (N, d), g_W_enc
    (F, d), g_b_enc (F,), g_edge (F,), g_parent_vals (N, kp), each in the accumulation dtype, or None
    when not needed. O(N * K * d), no (N, K, d) buffer.
    """
    acc = accumulation_dtype(xc.dtype)
    F = W_enc.shape[0]
    g = g_scores.to(acc)
    g_xc = g_W = g_edge = g_parent = None
    if need_xc:
        g_xc = _weighted_rows(idx, g, W_enc.to(acc))
    if need_W_enc:
        g_W = _scatter_rows(idx, g, xc.to(acc), F)
    g_b = torch.zeros(F, dtype=acc, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
    if parent_vals is not None and (need_edge or need_parent_vals):
        has_parent = parent_slot >= 0
        slot = parent_slot.clamp(min=0)
        if need_edge:
            pv = parent_vals.to(acc).gather(1, slot) * has_parent
            g_edge = torch.zeros(F, dtype=acc, device=g.device).index_add_(0, idx.reshape(-1), (g * pv).reshape(-1))
        if need_parent_vals:
            contrib = g * edge_weight.to(acc)[idx] * has_parent
            g_parent = torch.zeros(parent_vals.shape, dtype=acc, device=g.device).scatter_add_(1, slot, contrib)
    return g_xc, g_W, g_b, g_edge, g_parent


def _slot_gain(level_gain: torch.Tensor, level_widths: list[int], acc) -> torch.Tensor:
    widths = torch.tensor(level_widths, device=level_gain.device)
    return level_gain.to(acc).repeat_interleave(widths)


def decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths: list[int], prefixes: bool):
    """x_hat = b_dec + sum_l gain_l * sum_j vals * W_dec[idx]  -> (N, d), or with `prefixes` the
    stack (L, N, d) of P_m = b_dec + sum_{l >= m} gain_l * D_l (P_0 = x_hat). idx, vals: (N, K)
    with the levels' slots side by side, bottom first, `level_widths` wide each."""
    acc = accumulation_dtype(W_dec.dtype)
    W = W_dec.to(acc)
    if not prefixes:
        out = new_output((idx.shape[0], W_dec.shape[1]), W_dec.dtype, W_dec.device)
        out.copy_(_weighted_rows(idx, vals.to(acc) * _slot_gain(level_gain, level_widths, acc), W) + b_dec.to(acc))
        return out
    L = len(level_widths)
    out = new_output((L, idx.shape[0], W_dec.shape[1]), W_dec.dtype, W_dec.device)
    running = b_dec.to(acc).expand(idx.shape[0], -1)
    stops = level_stops(level_widths)
    for l in reversed(range(L)):
        sl = slice(stops[l], stops[l + 1])
        running = running + level_gain[l].to(acc) * _weighted_rows(idx[:, sl], vals[:, sl].to(acc), W)
        out[l] = running
    return out


def decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths: list[int], prefixes: bool,
                    need_vals: bool, need_W_dec: bool, need_gain: bool):
    """Returns g_vals (N, K), g_W_dec (F, d), g_level_gain (L,), g_b_dec (d,) in the accumulation dtype."""
    acc = accumulation_dtype(W_dec.dtype)
    F = W_dec.shape[0]
    L = len(level_widths)
    g = g_out.to(acc)
    stops = level_stops(level_widths)
    # With prefixes, level l's decode appears in P_0 .. P_l, so its gradient is the sum of theirs.
    g_levels = torch.cumsum(g, 0) if prefixes else None
    g_b = g.reshape(-1, g.shape[-1]).sum(0)
    g_vals = torch.empty(idx.shape, dtype=acc, device=idx.device) if (need_vals or need_gain) else None
    g_W = torch.zeros(W_dec.shape, dtype=acc, device=idx.device) if need_W_dec and prefixes else None
    g_gain = torch.zeros(L, dtype=acc, device=idx.device)
    gains = level_gain.to(acc)
    same_grad = not prefixes
    for l in range(L):
        sl = slice(stops[l], stops[l + 1])
        g_l = g if same_grad else g_levels[l]
        if need_vals or need_gain:
            dot = _gather_dot(g_l, W_dec, idx[:, sl])
            g_vals[:, sl] = dot * gains[l]
            g_gain[l] = (vals[:, sl].to(acc) * dot).sum()
        if need_W_dec and not same_grad:
            g_W += _scatter_rows(idx[:, sl], vals[:, sl].to(acc) * gains[l], g_l, F)
    if need_W_dec and same_grad:
        g_W = _scatter_rows(idx, vals.to(acc) * _slot_gain(level_gain, level_widths, acc), g, F)
    return g_vals, g_W, g_gain, g_b
