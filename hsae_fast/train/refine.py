"""Post-training refinement of the decoder rows (SPEC 8), for reading the learned directions.

Under hard gating a child fires only with its parent, so the part of a parent's direction that a
child carries can sit in the child's decoder row or in the parent's activation at equal loss;
training puts it in the parent (whose activation then runs several times the true one). This
step moves, for each parent p, the part of its activation that its descendants' activations
predict (least squares with an intercept over a data sample, a_p ~ b_p + sum_c w_c a_c) into the descendants' rows:

    W_c' = W_c + w_c * (gain_p / gain_c) * W_p,   a_p' = a_p - sum_c w_c a_c

so  gain_p a_p W_p + sum_c gain_c a_c W_c = gain_p a_p' W_p + sum_c gain_c a_c W_c'  exactly:
the refined rows with the refined parent activations give the same x_hat. Parents are taken
level by level upward, and a higher parent regresses on its descendants' already refined
activations, so the identity holds over the whole tree. It needs hard gating (a descendant
fires only with its parent, so a_p' is nonzero only where a_p is); other models are returned
unchanged. The layer itself is
not changed (its encoder computes a_p, not a_p'); the refined rows are returned for analysis
and scoring, and the trainer saves them beside the model as `refined_decoder.safetensors`.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..losses import level_of


@torch.no_grad()
def collect_codes(layer, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """A sparse (N, F) COO matrix of the layer's eval-mode activations over the batches."""
    was_training = layer.training
    layer.eval()
    rows, cols, vals, n = [], [], [], 0
    for x in batches:
        out = layer(x.to(device=layer.W_dec.device, dtype=layer.W_dec.dtype))
        for codes in out.levels:
            on = codes.vals != 0
            token = torch.arange(n, n + x.shape[0], device=on.device)[:, None].expand_as(on)
            rows.append(token[on].cpu())
            cols.append(codes.idx[on].cpu())
            vals.append(codes.vals[on].double().cpu())
        n += x.shape[0]
    layer.train(was_training)
    F = layer.cfg.dict_size
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n, F),
                                   check_invariants=False).coalesce()


def descendants(parent: torch.Tensor, feature: int) -> torch.Tensor:
    """Global ids of every descendant of `feature` (children, grandchildren, ...)."""
    found, frontier = [], torch.tensor([feature])
    while frontier.numel():
        frontier = torch.nonzero(torch.isin(parent, frontier)).squeeze(1)
        found.append(frontier)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def _columns(acts: torch.Tensor) -> tuple:
    """CSC view of a coalesced sparse (N, F) matrix: (col_ptr, token ids, values) sorted by column."""
    token, col = acts.indices()
    order = torch.argsort(col * acts.shape[0] + token)
    col_ptr = torch.zeros(acts.shape[1] + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(torch.bincount(col, minlength=acts.shape[1]), 0)
    return col_ptr, token[order], acts.values()[order]


@torch.no_grad()
def refine_decoder(layer, batches: Iterable[torch.Tensor], ridge: float = 1e-6) -> dict:
    """Returns {"W_dec": (F, d) refined rows, "coef": {parent: (descendant ids, weights)}}.
    `ridge` (relative to the Gram matrix's mean diagonal) keeps rarely co-firing sets solvable.
    Works on the sparse codes: each parent's system is (tokens where it fires) x (its descendants)."""
    W = layer.W_dec.detach().double().cpu().clone()
    if layer.cfg.num_levels == 1 or layer.cfg.gating != "hard":
        return {"W_dec": W.to(layer.W_dec.dtype), "coef": {}}
    col_ptr, tokens, values = _columns(collect_codes(layer, batches))
    parent = layer.parent.cpu()
    mask = layer.path_mask.cpu()
    levels = level_of(layer.cfg.level_sizes)
    gain = layer.level_gain.detach().double().cpu()[levels]
    coef = {}
    # Global ids ascend with the level, so this visits every level's parents before the next's.
    for p in torch.nonzero((levels > 0) & mask).squeeze(1).tolist():
        desc = descendants(parent, p)
        desc = desc[mask[desc]]
        p_tokens = tokens[col_ptr[p]: col_ptr[p + 1]]
        if desc.numel() == 0 or p_tokens.numel() == 0:
            continue
        y = values[col_ptr[p]: col_ptr[p + 1]].clone()
        A = torch.zeros(p_tokens.numel(), desc.numel(), dtype=torch.float64)
        for j, c in enumerate(desc.tolist()):
            c_tokens = tokens[col_ptr[c]: col_ptr[c + 1]]
            row = torch.searchsorted(p_tokens, c_tokens).clamp(max=p_tokens.numel() - 1)
            A[row, j] = values[col_ptr[c]: col_ptr[c + 1]]  # hard gating: c fires only where p does
        # With an intercept: the parent's own activation (its constant part) stays with the parent.
        design = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype)], dim=1)
        gram = design.T @ design
        gram += ridge * max(float(gram.diagonal().mean()), 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
        w = torch.linalg.solve(gram, design.T @ y)[:-1]
        W[desc] += (w * gain[p] / gain[desc])[:, None] * W[p]  # W[p] is unchanged until its own parent's turn
        values[col_ptr[p]: col_ptr[p + 1]] = y - A @ w  # a_p', what the parents above regress on
        coef[p] = (desc, w)
    return {"W_dec": W.to(layer.W_dec.dtype), "coef": coef}
