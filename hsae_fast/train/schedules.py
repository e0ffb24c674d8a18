"""Schedules over training progress t/T: learning rate, consistency warmup, progressive and
adaptive sparsity. Pure functions of their inputs (plus the small `AdaptiveSparsity` state), so a
resumed run recomputes exactly the values the interrupted one would have used."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import HSAEConfig


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_start: float) -> float:
    """Linear warmup over the first warmup_frac of the steps, constant, then linear decay to 0
    from decay_start to the end."""
    warmup = max(1, int(round(warmup_frac * total_steps)))
    if step < warmup:
        return (step + 1) / warmup
    start = int(decay_start * total_steps)
    if step < start or start >= total_steps:
        return 1.0
    return max(0.0, (total_steps - step) / (total_steps - start))


def lambda_cons(progress: float, target: float, warmup_frac: float) -> float:
    """lambda_cons(t): warmed up linearly from 0 to its target over the first warmup_frac (SPEC 5)."""
    if warmup_frac <= 0:
        return target
    return target * min(1.0, progress / warmup_frac)


def feasible_k(cfg: HSAEConfig, wanted: Sequence[float]) -> tuple:
    """Round `wanted` to the nearest k the config rules allow (SPEC 1), top level first: each
    1 <= k_l <= F_l, non-increasing upward, and under hard gating k_l <= k_{l+1} * F_l / F_{l+1}."""
    sizes, L = cfg.level_sizes, cfg.num_levels
    out = [0] * L
    for l in reversed(range(L)):
        hi = sizes[l]
        if l < L - 1 and cfg.gating == "hard":
            hi = min(hi, (out[l + 1] * sizes[l]) // sizes[l + 1])
        lo = out[l + 1] if l < L - 1 else 1
        out[l] = int(min(max(int(round(wanted[l])), lo), hi))
    return tuple(out)


def progressive_k(target: Sequence[int], progress: float, start_mult: float, until: float) -> list:
    """k_l(t) decays linearly from start_mult * k_l to k_l by progress `until` (dense first, then sparser)."""
    if start_mult <= 1 or until <= 0:
        return [float(k) for k in target]
    mult = start_mult - (start_mult - 1) * min(1.0, progress / until)
    return [k * mult for k in target]


class AdaptiveSparsity:
    """Per-level k multipliers driven by path utilization: every window, a level whose share of
    unpruned features that fired stays below `target_util` gets `rate` more active slots (its
    unused paths get a chance to fire), and a level above it relaxes back toward its target k.
    Multipliers stay in [1, max_mult]."""

    def __init__(self, num_levels: int, target_util: float, rate: float, max_mult: float):
        self.mult = torch.ones(num_levels, dtype=torch.float64)
        self.target_util, self.rate, self.max_mult = target_util, rate, max_mult

    def update(self, utilization: Sequence[float]) -> None:
        for l, util in enumerate(utilization):
            if math.isnan(util):
                continue
            factor = 1 + self.rate if util < self.target_util else 1 / (1 + self.rate)
            self.mult[l] = min(self.max_mult, max(1.0, float(self.mult[l]) * factor))

    def state_dict(self) -> dict:
        return {"mult": self.mult.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mult.copy_(state["mult"])


def level_utilization(fires: torch.Tensor, path_mask: torch.Tensor, level_sizes: Sequence[int]) -> list:
    """Per level: the fraction of unpruned features that fired (fires: (F,) counts over a window)."""
    out, start = [], 0
    for size in level_sizes:
        alive = path_mask[start: start + size]
        n = int(alive.sum())
        out.append(float(((fires[start: start + size] > 0) & alive).sum()) / n if n else float("nan"))
        start += size
    return out
