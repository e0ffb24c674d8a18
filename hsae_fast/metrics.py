"""SPEC 6 metrics from sparse codes (`HSAEOutput.levels`): HCS, per-level activity, tree use,
child-parent decoder cosine and edge attribution. Nothing here builds an N x F buffer: every
per-token quantity is computed on the (N, kmax) slots, and per-feature counts with `bincount`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def parent_activation(child_idx: torch.Tensor, parent: torch.Tensor, parent_idx: torch.Tensor,
                      parent_vals: torch.Tensor) -> torch.Tensor:
    """(N, Kc) activation, in the same token, of each child slot's parent (0 where the parent is
    inactive). child_idx: (N, Kc) global ids; parent: (F,) map; parent_idx / parent_vals: (N, Kp).
    Costs O(N * Kc * Kp): the per-token slot lists are short."""
    wanted = parent[child_idx]  # (N, Kc)
    match = (wanted[:, :, None] == parent_idx[:, None, :]) & (parent_vals[:, None, :] != 0)
    # A feature holds at most one slot per token, so the sum picks the one matching value.
    return (match.to(parent_vals.dtype) * parent_vals[:, None, :]).sum(-1)


def active_mask(vals: torch.Tensor) -> torch.Tensor:
    return vals != 0


def hcs_counts(child_idx: torch.Tensor, child_vals: torch.Tensor, parent: torch.Tensor,
               parent_idx: torch.Tensor, parent_vals: torch.Tensor,
               path_mask: Optional[torch.Tensor] = None) -> tuple[int, int]:
    """(children active with their parent active, children active) for one level pair, over all tokens."""
    child_on = active_mask(child_vals) & (parent[child_idx] >= 0)
    if path_mask is not None:
        child_on &= path_mask[child_idx]
    with_parent = parent_activation(child_idx, parent, parent_idx, parent_vals) != 0
    return int((child_on & with_parent).sum()), int(child_on.sum())


def hcs(levels: Sequence, parent: torch.Tensor, level_sizes: Sequence[int],
        path_mask: Optional[torch.Tensor] = None) -> dict:
    """SPEC 6 hierarchical consistency score of one batch of codes (levels bottom first, each with
    .idx/.vals (N, kmax)). Returns per pair (l, l+1): "score", "count", "chance" (the parents'
    density: mean fraction of level l+1's unpruned features active per token), and the
    count-weighted "mean". A pair without any active child scores nan."""
    pairs = []
    hits_total, count_total = 0, 0
    for l in range(len(levels) - 1):
        hits, count = hcs_counts(levels[l].idx, levels[l].vals, parent, levels[l + 1].idx, levels[l + 1].vals, path_mask)
        upper = levels[l + 1]
        n_tokens = max(upper.vals.shape[0], 1)
        offset = sum(level_sizes[: l + 1])
        unpruned = level_sizes[l + 1] if path_mask is None else int(path_mask[offset: offset + level_sizes[l + 1]].sum())
        chance = float((upper.vals != 0).sum()) / (n_tokens * max(unpruned, 1))
        pairs.append({"pair": [l, l + 1], "score": hits / count if count else float("nan"), "count": count,
                      "chance": chance})
        hits_total += hits
        count_total += count
    return {"pairs": pairs, "mean": hits_total / count_total if count_total else float("nan")}


class ActivityCounter:
    """Accumulates per-feature firing counts and per-level active totals over batches: the
    dead fraction and density of SPEC 6/7 need counts over many tokens, not one batch."""

    def __init__(self, level_sizes: Sequence[int], device=None):
        self.level_sizes = tuple(level_sizes)
        self.fires = torch.zeros(sum(level_sizes), dtype=torch.int64, device=device)
        self.active_per_level = torch.zeros(len(level_sizes), dtype=torch.int64, device=device)
        self.tokens = 0

    def update(self, levels: Sequence) -> None:
        F = self.fires.shape[0]
        for l, codes in enumerate(levels):
            on = codes.vals != 0
            self.fires += torch.bincount(codes.idx[on], minlength=F)
            self.active_per_level[l] += on.sum()
        self.tokens += levels[0].vals.shape[0]

    def add(self, other: "ActivityCounter") -> None:
        """Merge another counter's counts (e.g. one step's into several windows)."""
        self.fires += other.fires
        self.active_per_level += other.active_per_level
        self.tokens += other.tokens

    def l0(self) -> list:
        return [float(a) / max(self.tokens, 1) for a in self.active_per_level]

    def density(self) -> torch.Tensor:
        """(F,) fraction of tokens on which each feature fired."""
        return self.fires.double() / max(self.tokens, 1)

    def dead_fraction(self, path_mask: Optional[torch.Tensor] = None) -> list:
        """Per level: the fraction of unpruned features that never fired (nan for a fully pruned level)."""
        out, start = [], 0
        for size in self.level_sizes:
            fires = self.fires[start: start + size]
            alive = path_mask[start: start + size] if path_mask is not None else torch.ones_like(fires, dtype=torch.bool)
            n = int(alive.sum())
            out.append(float(((fires == 0) & alive).sum()) / n if n else float("nan"))
            start += size
        return out


def level_stats(levels: Sequence, level_sizes: Sequence[int], path_mask: Optional[torch.Tensor] = None) -> dict:
    """Per level L0 (mean active per token), L1, mean density and dead fraction of one batch."""
    counter = ActivityCounter(level_sizes, device=levels[0].idx.device)
    counter.update(levels)
    n = max(levels[0].vals.shape[0], 1)
    return {
        "l0": counter.l0(),
        "l1": [float(c.vals.detach().abs().sum()) / n for c in levels],
        "density": [x / s for x, s in zip(counter.l0(), level_sizes)],
        "dead_frac": counter.dead_fraction(path_mask),
    }


def tree_use(child_fires: torch.Tensor, parent: torch.Tensor, level_sizes: Sequence[int]) -> list:
    """SPEC 6 tree use from per-feature firing counts (F,) (e.g. `ActivityCounter.fires`): per level
    pair (l, l+1), for each parent, how many distinct children fired ("children_used",
    (F_{l+1},)) and each child's share of its siblings' firings ("child_share", (F_l,), nan
    where no sibling fired)."""
    out, offsets = [], [sum(level_sizes[:l]) for l in range(len(level_sizes))]
    for l in range(len(level_sizes) - 1):
        ids = torch.arange(offsets[l], offsets[l] + level_sizes[l], device=parent.device)
        p_local = parent[ids] - offsets[l + 1]
        fires = child_fires[ids].double()
        used = torch.bincount(p_local, weights=(fires > 0).double(), minlength=level_sizes[l + 1])
        total = torch.bincount(p_local, weights=fires, minlength=level_sizes[l + 1])
        share = fires / total[p_local]
        out.append({"pair": [l, l + 1], "children_used": used.long(), "child_share": share})
    return out


def child_parent_cosine(W_dec: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """(F,) cosine between each feature's decoder row and its parent's (nan at the top level)."""
    has = parent >= 0
    rows = torch.nn.functional.normalize(W_dec.detach().double(), dim=1)
    cos = torch.full((W_dec.shape[0],), float("nan"), dtype=torch.float64, device=W_dec.device)
    cos[has] = (rows[has] * rows[parent[has]]).sum(1)
    return cos


def edge_attribution(levels: Sequence, parent: torch.Tensor, edge_weight: torch.Tensor) -> list:
    """SPEC 6 edge attribution of each active child slot to its active parent:
    edge_weight[i] * a_{l+1}[parent[i]] / s[i], (N, kmax_l) per level below the top (0 where the
    child or its parent is inactive)."""
    out = []
    for l in range(len(levels) - 1):
        child, upper = levels[l], levels[l + 1]
        a_parent = parent_activation(child.idx, parent, upper.idx, upper.vals.detach())
        on = (child.vals != 0) & (a_parent != 0)
        safe_scores = torch.where(on, child.scores.detach(), torch.ones_like(child.scores))
        attribution = edge_weight.detach()[child.idx].to(safe_scores.dtype) * a_parent.to(safe_scores.dtype) / safe_scores
        out.append(torch.where(on, attribution, torch.zeros_like(attribution)))
    return out
