"""SPEC section 4 in plain PyTorch: dense, masked, differentiable, written to be read.

This is the ground truth of every test. It scores every feature of every level (an N x F_l
buffer per level) and masks; fused backends compute the same function without those buffers.
Run it in float64 to compare a backend against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import HSAEConfig


@dataclass
class ReferenceOutput:
    x_hat: torch.Tensor  # (N, d)
    acts: list  # acts[l]: (N, F_l) dense activations a_l
    scores: list  # scores[l]: (N, F_l) s_l for every feature (meaningful on candidates)
    candidates: list  # candidates[l]: (N, F_l) bool, C_l[n]
    level_decodes: list  # level_decodes[l]: (N, d) D_l = a_l @ W_dec_l (without gain or bias)


def select_level(
    scores: torch.Tensor, candidates: torch.Tensor, k: int, kmax: int, selection: str, threshold: float
) -> torch.Tensor:
    """(N, F_l) bool mask of kept features before the ReLU (SPEC 4 selection rules)."""
    N = scores.shape[0]
    masked = scores.detach().masked_fill(~candidates, float("-inf"))
    top = masked.topk(kmax, dim=1).indices
    per_token = torch.zeros_like(candidates).scatter_(1, top, True) & candidates
    if selection == "token":
        return per_token
    if selection == "threshold":
        return per_token & (masked > threshold)
    # batch: keep those among the k*N largest per-token-kept scores of the whole batch
    pool = masked.masked_fill(~per_token, float("-inf")).flatten()
    best = pool.topk(k * N).indices
    batch = torch.zeros_like(pool, dtype=torch.bool)
    batch[best] = True
    return batch.view_as(per_token) & per_token


def reference_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    edge_weight: torch.Tensor,
    level_gain: torch.Tensor,
    threshold: torch.Tensor,
    parent: torch.Tensor,
    path_mask: torch.Tensor,
    cfg: HSAEConfig,
    selection: Optional[str] = None,
    active: Optional[Sequence[torch.Tensor]] = None,
) -> ReferenceOutput:
    """x: (N, d). `selection` overrides cfg.selection. `active`, if given, is one (N, F_l) bool per
    level that replaces the selection (and the ReLU): tests use it to evaluate, in float64, exactly
    the features a lower-precision backend chose."""
    selection = selection or cfg.selection
    L, sizes, offsets = cfg.num_levels, cfg.level_sizes, cfg.level_offsets
    N = x.shape[0]
    xc = x - b_dec
    acts, scores, candidates, decodes = [None] * L, [None] * L, [None] * L, [None] * L
    for l in reversed(range(L)):
        lvl = slice(offsets[l], offsets[l] + sizes[l])
        s = xc @ W_enc[lvl].T + b_enc[lvl]
        cand = path_mask[lvl].expand(N, -1)
        if l < L - 1:
            parent_act = acts[l + 1][:, parent[lvl] - offsets[l + 1]]  # a_{l+1}[n, parent[i]]
            s = s + edge_weight[lvl] * parent_act
            if cfg.gating == "hard":
                cand = cand & (parent_act.detach() != 0)
        if active is not None:
            keep = active[l]
        else:
            kept = select_level(s, cand, cfg.k[l], cfg.kmax(l, selection), selection, float(threshold[l]))
            keep = kept & (s.detach() > 0)
        acts[l] = torch.where(keep, s, torch.zeros_like(s))
        scores[l], candidates[l] = s, cand
        decodes[l] = acts[l] @ W_dec[lvl]
    x_hat = b_dec + sum(level_gain[l] * decodes[l] for l in range(L))
    return ReferenceOutput(x_hat, acts, scores, candidates, decodes)


def reference_from_layer(layer, x: torch.Tensor, dtype=torch.float64, selection=None, active=None):
    """Run the reference on float64 copies of a layer's parameters (leaf tensors with grad)."""
    params = {
        name: getattr(layer, name).detach().to(dtype).requires_grad_(True)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "edge_weight", "level_gain")
    }
    out = reference_forward(
        x.to(dtype), params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], params["edge_weight"],
        params["level_gain"], layer.threshold.to(dtype), layer.parent, layer.path_mask, layer.cfg,
        selection=selection, active=active,
    )
    return out, params
