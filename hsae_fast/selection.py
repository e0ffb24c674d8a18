"""SPEC 4 selection over each token's candidates: token, batch and threshold rules.

Works on the (N, kmax) per-token candidate scores an encode returns, so batch selection needs
no N x F buffer: the k*N-th largest of N*kmax scores is found exactly with one top-k."""
from __future__ import annotations

import torch


def select_candidates(scores: torch.Tensor, k: int, selection: str, threshold: torch.Tensor) -> torch.Tensor:
    """(N, kmax) float scores (-inf: no candidate) -> (N, kmax) bool kept mask (before the ReLU).
    `threshold`: this level's 0-d threshold (a tensor, so compiled graphs do not sync on it)."""
    if selection == "token":
        return torch.isfinite(scores)
    if selection == "threshold":
        return scores > threshold
    if selection != "batch":
        raise ValueError(f"selection={selection!r}: expected 'batch', 'threshold' or 'token'")
    flat = scores.reshape(-1)
    budget = min(k * scores.shape[0], flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(0, flat.topk(budget, sorted=False).indices, True)  # no host sync, unlike index_put_
    return keep.view_as(scores) & torch.isfinite(scores)


def activations(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """a = s where kept and s > 0, else 0; the gradient passes straight through where kept."""
    return torch.where(kept & (scores > 0), scores, torch.zeros_like(scores))
