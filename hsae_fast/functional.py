"""The top-down forward of SPEC 4 over the registered ops: no module state, no N x F buffer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import HSAEConfig
from .ops import encode_tree, sparse_decode
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
    row_grads: bool = False,
    b_dec: Optional[torch.Tensor] = None,
) -> list[LevelCodes]:
    """xc = x - b_dec, (N, d). Levels are encoded top first (one op for the whole tree: see
    ops/encode.py); returns codes bottom first, global ids. `row_grads`: W_enc's gradient as a
    sparse COO tensor of its touched rows (`HSAELayer.row_grads`). `b_dec`: where x takes no
    gradient, xc = x - b_dec.detach() and b_dec itself here, so its gradient through the encoder is
    one sum over the touched rows of W_enc (see `encode_tree`)."""
    L = cfg.num_levels
    kmax = [cfg.kmax(l, selection) for l in range(L)]
    lower = range(L - 1)
    vals, scores, idx, _slot = encode_tree(
        xc, W_enc, b_enc, edge_weight, path_mask, threshold, list(plan.local_parent),
        [plan.children[l].child_ptr for l in lower], [plan.children[l].child_ids for l in lower],
        list(plan.level_sizes), list(cfg.k), kmax, [plan.children[l].max_children for l in lower],
        selection, cfg.gating == "hard", backend, row_grads, b_dec,
    )
    # the levels' slots sit side by side, bottom first
    levels = zip(*(torch.split(t, kmax, dim=1) for t in (idx, vals, scores)))
    return [LevelCodes(i, v, s) for i, v, s in levels]


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The levels' (N, kmax_l) blocks side by side as one (N, K) tensor: the tensor `encode` split
    them from when they are still its consecutive column views (no copy, no op), else their
    concatenation. Autograd is the same either way: the views' gradients went to that tensor."""
    base = parts[0]._base
    if (base is not None and not torch.compiler.is_compiling() and base.dim() == 2 and base.is_contiguous()
            and base.shape[1] == sum(p.shape[1] for p in parts)):
        offset = base.storage_offset()
        for p in parts:
            if p._base is not base or p.storage_offset() != offset or p.shape[0] != base.shape[0] \
                    or p.stride() != base.stride():
                break
            offset += p.shape[1]
        else:
            return base
    return torch.cat(parts, dim=1)


def decode(codes: list[LevelCodes], W_dec, level_gain, b_dec, backend: str, prefixes: bool = False,
           row_grads: bool = False, grad_active_only: bool = False) -> torch.Tensor:
    """x_hat (N, d), or with `prefixes` (L, N, d) where [m] = b_dec + sum_{l >= m} gain_l * D_l;
    `row_grads` as in `encode` (W_dec's gradient); `grad_active_only`: no gradient reaches a value
    of 0 (as the encode's gradient needs: see `sparse_decode`)."""
    idx, vals = joined([c.idx for c in codes]), joined([c.vals for c in codes])
    return sparse_decode(idx, vals, W_dec, level_gain, b_dec, [c.idx.shape[1] for c in codes], prefixes, backend,
                         row_grads, grad_active_only)
