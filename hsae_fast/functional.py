"""The top-down forward of SPEC 4 over the registered ops: no module state, no N x F buffer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import HSAEConfig
from .ops import encode_level, sparse_decode
from .selection import activations, select_candidates
from .tree import TreePlan


@dataclass
class LevelCodes:
    """One level's codes: idx (N, kmax) global ids, vals (N, kmax) activations (0 = inactive),
    scores (N, kmax) the pre-selection scores of the same slots (-inf: no candidate)."""

    idx: torch.Tensor
    vals: torch.Tensor
    scores: torch.Tensor


def encode(
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    edge_weight: torch.Tensor,
    path_mask: torch.Tensor,
    threshold: torch.Tensor,
    plan: TreePlan,
    cfg: HSAEConfig,
    selection: str,
    backend: str,
) -> list[LevelCodes]:
    """xc = x - b_dec, (N, d). Levels are encoded top first; returns codes bottom first (global ids).

    Each level's op gets views of its own rows of W_enc, b_enc, edge_weight (torch.split), so its
    backward returns a (F_l, d) gradient and autograd assembles W_enc's once; ids cross the op
    boundary level-local."""
    L = cfg.num_levels
    sizes = list(plan.level_sizes)
    W_lv, b_lv, e_lv, m_lv = (torch.split(t, sizes) for t in (W_enc, b_enc, edge_weight, path_mask))
    codes: list[Optional[LevelCodes]] = [None] * L
    above_local = None  # the level above's local ids
    for l in reversed(range(L)):
        above = codes[l + 1] if l < L - 1 else None
        children = plan.children[l] if l < L - 1 else None
        scores, idx, _slot = encode_level(
            xc, W_lv[l], b_lv[l], e_lv[l], m_lv[l], plan.local_parent[l],
            above_local, above.vals if above else None,
            children.child_ptr if children else None, children.child_ids if children else None,
            children.max_children if children else 0,
            cfg.kmax(l, selection), cfg.gating == "hard" and above is not None, backend,
        )
        kept = select_candidates(scores, cfg.k[l], selection, threshold[l])
        codes[l] = LevelCodes(idx + plan.level_offsets[l], activations(scores, kept), scores)
        above_local = idx
    return codes


def decode(codes: list[LevelCodes], W_dec, level_gain, b_dec, backend: str, prefixes: bool = False) -> torch.Tensor:
    """x_hat (N, d), or with `prefixes` (L, N, d) where [m] = b_dec + sum_{l >= m} gain_l * D_l."""
    idx = torch.cat([c.idx for c in codes], dim=1)
    vals = torch.cat([c.vals for c in codes], dim=1)
    return sparse_decode(idx, vals, W_dec, level_gain, b_dec, [c.idx.shape[1] for c in codes], prefixes, backend)
