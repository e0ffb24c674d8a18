"""SPEC 4 selection over each token's candidates: token, batch and threshold rules.

Works on the (N, kmax) per-token candidate scores an encode returns, so batch selection needs
no N x F buffer: the k*N-th largest of N*kmax scores is found exactly with one top-k."""
from __future__ import annotations

import torch


def select_candidates(scores: torch.Tensor, k: int, selection: str, threshold: torch.Tensor) -> torch.Tensor | None:
    """(N, kmax) float scores (-inf: no candidate) -> (N, kmax) bool kept mask (before the ReLU), or
    None where every candidate is kept (token selection: a token's kmax = k candidates are its top k).
    `threshold`: this level's 0-d threshold (a tensor, so compiled graphs do not sync on it).
    A -inf (no candidate) may be marked kept: `activations` never activates a score that is not > 0."""
    if selection == "token":
        return None
    if selection == "threshold":
        return scores > threshold
    if selection != "batch":
        raise ValueError(f"selection={selection!r}: expected 'batch', 'threshold' or 'token'")
    flat = scores.reshape(-1)
    budget = min(k * scores.shape[0], flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(0, flat.topk(budget, sorted=False).indices, True)  # no host sync, unlike index_put_
    return keep.view_as(scores)


def activations(scores: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """a = s where kept (None: everywhere) and s > 0, else 0; the gradient passes straight through where kept."""
    active = scores > 0
    return torch.where(active if kept is None else kept & active, scores, 0.0)
