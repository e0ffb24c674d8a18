"""Token-weighted evaluation sums over a whole evaluated set (SPEC 6 and 7), from sparse codes.

Every sum is float64 and every mean divides by the number of evaluated tokens N of the whole set,
so no value depends on the batch size. Nothing here builds an N x F tensor: per-feature numbers are
(F,) vectors filled with `bincount`/`index_add_` from the (N, kmax_l) codes of each level.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..metrics import hcs_counts

# Density histogram bins, in log10(density): features rarer than 1e-7 go in the first bin.
DENSITY_BINS = np.linspace(-7.0, 0.0, 29)

def grouped_token_stats(groups, tokens, counts, size: int):
    """Token histograms of `size` groups (features or paths), given as (group, token, count) triples
    with each (group, token) pair once. Returns per group (size,): total count, token entropy
    (nats), share of the most frequent token, and that token (ties: any of them)."""
    totals = torch.zeros(size, dtype=torch.float64).index_add_(0, groups, counts.double())
    p = counts.double() / totals[groups]
    entropy = torch.zeros(size, dtype=torch.float64).index_add_(0, groups, -p * p.log())
    top_share = torch.zeros(size, dtype=torch.float64).scatter_reduce_(0, groups, p, "amax")
    top_token = torch.full((size,), -1, dtype=torch.int64)
    is_top = p == top_share[groups]
    top_token[groups[is_top]] = tokens[is_top]
    return totals, entropy, top_share, top_token


class CodeStats:
    """Accumulates reconstruction (SPEC 7), sparsity, density, HCS (SPEC 6), each feature's top
    activations with their position, and (with token ids) the token histogram of every feature."""

    def __init__(self, layer, top_k: int = 8, vocab_size: Optional[int] = None):
        cfg = layer.cfg
        self.cfg = cfg
        self.parent = layer.parent.detach().cpu()
        self.path_mask = layer.path_mask.detach().cpu()
        F, d, L = cfg.dict_size, cfg.d_model, cfg.num_levels
        f64 = torch.float64
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=f64)
        self.sum_x_sq = torch.zeros((), dtype=f64)
        self.sse = torch.zeros((), dtype=f64)
        self.cos_sum = torch.zeros((), dtype=f64)
        self.l2_ratio_sum = torch.zeros((), dtype=f64)
        self.x_hat_sq = torch.zeros((), dtype=f64)
        self.dot = torch.zeros((), dtype=f64)
        self.l0 = torch.zeros(L, dtype=f64)
        self.l1 = torch.zeros(L, dtype=f64)
        self.counts = torch.zeros(F, dtype=torch.int64)
        self.act_sum = torch.zeros(F, dtype=f64)
        self.hcs_consistent = torch.zeros(max(L - 1, 0), dtype=torch.int64)
        self.hcs_total = torch.zeros(max(L - 1, 0), dtype=torch.int64)
        self.top_k = top_k
        self.top_vals = torch.full((F, top_k), -math.inf)
        self.top_index = torch.full((F, top_k), -1, dtype=torch.int64)
        self.vocab_size = vocab_size
        self._token_keys: list[torch.Tensor] = []
        self._token_counts: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, x, x_hat, levels, first_index: int, token_ids: Optional[torch.Tensor] = None) -> None:
        """x, x_hat: (n, d); levels: per-level LevelCodes (n, kmax_l) bottom first; first_index: the
        batch's first position in the evaluated set; token_ids: (n,) or None."""
        x64, xh64 = x.detach().double().cpu(), x_hat.detach().double().cpu()
        n = x64.shape[0]
        self.n += n
        self.sum_x += x64.sum(0)
        x_norm_sq, xh_norm_sq = (x64 * x64).sum(1), (xh64 * xh64).sum(1)
        dot = (x64 * xh64).sum(1)
        self.sum_x_sq += x_norm_sq.sum()
        self.sse += ((x64 - xh64) ** 2).sum()
        x_norm, xh_norm = x_norm_sq.sqrt(), xh_norm_sq.sqrt()
        self.cos_sum += (dot / (x_norm.clamp_min(1e-8) * xh_norm.clamp_min(1e-8))).sum()
        self.l2_ratio_sum += (xh_norm / x_norm.clamp_min(1e-8)).sum()
        self.x_hat_sq += xh_norm_sq.sum()
        self.dot += dot.sum()

        positions = torch.arange(first_index, first_index + n)
        for l, codes in enumerate(levels):
            idx, vals = codes.idx.detach().cpu(), codes.vals.detach().double().cpu()
            on = vals != 0
            self.l0[l] += on.sum()
            self.l1[l] += vals.abs().sum()
            ids, values = idx[on], vals[on]
            self.counts += torch.bincount(ids, minlength=self.cfg.dict_size)
            self.act_sum.index_add_(0, ids, values)
            self._merge_top(ids, values.float(), positions[:, None].expand_as(idx)[on])
            if token_ids is not None and self.vocab_size:
                tokens = token_ids.cpu()[:, None].expand_as(idx)[on]
                if self._token_counts is not None:  # merged already: expand back before adding
                    self._token_keys = [self._token_keys[0].repeat_interleave(self._token_counts)]
                    self._token_counts = None
                self._token_keys.append(ids * self.vocab_size + tokens)
            if l + 1 < len(levels):
                above = levels[l + 1]
                consistent, active = hcs_counts(idx, vals, self.parent, above.idx.detach().cpu(), above.vals.detach().cpu(), self.path_mask)
                self.hcs_consistent[l] += consistent
                self.hcs_total[l] += active

    def _merge_top(self, ids, values, positions) -> None:
        """Keep each feature's top_k activations: rank this batch's entries within their feature
        (sort by value, then stably by feature), then merge with the kept table."""
        if ids.numel() == 0:
            return
        order = torch.argsort(values, descending=True)
        order = order[torch.argsort(ids[order], stable=True)]
        ids, values, positions = ids[order], values[order], positions[order]
        starts = torch.searchsorted(ids, ids, side="left")
        rank = torch.arange(ids.numel()) - starts
        take = rank < self.top_k
        ids, values, positions, rank = ids[take], values[take], positions[take], rank[take]
        touched = torch.unique(ids)
        batch_vals = torch.full((touched.numel(), self.top_k), -math.inf)
        batch_pos = torch.full((touched.numel(), self.top_k), -1, dtype=torch.int64)
        row = torch.searchsorted(touched, ids)
        batch_vals[row, rank] = values
        batch_pos[row, rank] = positions
        merged_vals = torch.cat([self.top_vals[touched], batch_vals], 1)
        merged_pos = torch.cat([self.top_index[touched], batch_pos], 1)
        best = merged_vals.topk(self.top_k, dim=1)
        self.top_vals[touched] = best.values
        self.top_index[touched] = merged_pos.gather(1, best.indices)

    # ----------------------------------------------------------------- results
    def _require_tokens(self) -> None:
        if self.n == 0:
            raise ValueError("no evaluated tokens: the evaluation set is empty (all positions special?)")

    def reconstruction(self) -> dict:
        """SPEC 7 reconstruction metrics over the whole set."""
        self._require_tokens()
        n, d = self.n, self.cfg.d_model
        total_var = self.sum_x_sq - (self.sum_x @ self.sum_x) / n  # sum_t ||x_t - mu||^2
        mse = float(self.sse / n)
        return {
            "explained_variance": float(1 - self.sse / total_var) if total_var > 0 else float("nan"),
            "fvu": float(self.sse / total_var) if total_var > 0 else float("nan"),
            "mse": mse,
            "mse_per_dim": mse / d,
            "cossim": float(self.cos_sum / n),
            "l2_ratio": float(self.l2_ratio_sum / n),
            "relative_reconstruction_bias": float(self.x_hat_sq / self.dot) if self.dot != 0 else float("nan"),
        }

    def density(self) -> torch.Tensor:
        """(F,) float64 fraction of evaluated tokens on which each feature fires."""
        self._require_tokens()
        return self.counts.double() / self.n

    def sparsity(self) -> dict:
        self._require_tokens()
        cfg, density = self.cfg, self.density()
        frac_dead, histograms = [], []
        for l, (off, size) in enumerate(zip(cfg.level_offsets, cfg.level_sizes)):
            alive_mask = self.path_mask[off : off + size]
            level_density = density[off : off + size][alive_mask]
            dead = int((level_density == 0).sum())
            frac_dead.append(dead / max(1, int(alive_mask.sum())))
            firing = level_density[level_density > 0].numpy()
            counts, _ = np.histogram(np.log10(np.clip(firing, 10 ** DENSITY_BINS[0], 1.0)), bins=DENSITY_BINS)
            histograms.append({"log10_density_edges": DENSITY_BINS.tolist(), "counts": counts.tolist(), "dead": dead})
        return {
            "l0": float(self.l0.sum() / self.n),
            "l0_per_level": (self.l0 / self.n).tolist(),
            "l1": float(self.l1.sum() / self.n),
            "l1_per_level": (self.l1 / self.n).tolist(),
            "frac_dead": float(sum(fd * int(self.path_mask[o : o + s].sum()) for fd, o, s in zip(frac_dead, cfg.level_offsets, cfg.level_sizes)) / max(1, int(self.path_mask.sum()))),
            "frac_dead_per_level": frac_dead,
            "pruned_per_level": [int((~self.path_mask[o : o + s]).sum()) for o, s in zip(cfg.level_offsets, cfg.level_sizes)],
            "density_histograms": histograms,
        }

    def hierarchy(self) -> dict:
        """HCS per level pair (l, l+1) over the whole set, its count-weighted mean, and the chance
        level: the HCS that independent firing would give, i.e. the density of each active child's
        own parent, weighted like the HCS by the child's firing count (`hsae_fast.metrics.hcs`
        reports the unweighted mean parent density of one batch instead)."""
        self._require_tokens()
        cfg, density = self.cfg, self.density()
        pairs, chance = [], []
        for l in range(cfg.num_levels - 1):
            off, size = cfg.level_offsets[l], cfg.level_sizes[l]
            counts = self.counts[off : off + size].double()
            total = int(self.hcs_total[l])
            pairs.append(float(self.hcs_consistent[l]) / total if total else float("nan"))
            parent_density = density[self.parent[off : off + size]]
            chance.append(float((counts * parent_density).sum() / counts.sum()) if total else float("nan"))
        total = int(self.hcs_total.sum())
        return {
            "hcs_per_pair": pairs,
            "hcs": float(self.hcs_consistent.sum()) / total if total else float("nan"),
            "hcs_chance_per_pair": chance,
            "hcs_active_children_per_pair": self.hcs_total.tolist(),
        }

    def token_histograms(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(feature ids, token ids, counts) of every (feature, token) pair seen, sorted by feature then
        token; None without tokens. The per-batch keys are merged once, on first use."""
        if not self._token_keys:
            return None
        if len(self._token_keys) > 1 or self._token_counts is None:
            keys, counts = torch.unique(torch.cat(self._token_keys), return_counts=True)
            self._token_keys, self._token_counts = [keys], counts
        keys = self._token_keys[0]
        return keys // self.vocab_size, keys % self.vocab_size, self._token_counts

    def specificity(self, min_count: int = 5) -> Optional[dict]:
        """Per level: mean token entropy (nats) of features firing at least `min_count` times, the mean
        share of their most frequent token, and specificity = mean of 1 - H / log(min(n_i, V)) (1: one
        token only; 0: every firing on a different token). Higher levels should be more general."""
        hist = self.token_histograms()
        if hist is None:
            return None
        features, tokens, counts = hist
        totals, entropy, top_share, _ = grouped_token_stats(features, tokens, counts, self.cfg.dict_size)
        out = {"min_count": min_count, "features_scored": [], "token_entropy": [], "top_token_share": [], "specificity": []}
        for off, size in zip(self.cfg.level_offsets, self.cfg.level_sizes):
            sl = slice(off, off + size)
            scored = totals[sl] >= max(2, min_count)
            n_scored = int(scored.sum())
            out["features_scored"].append(n_scored)
            if n_scored == 0:
                for key in ("token_entropy", "top_token_share", "specificity"):
                    out[key].append(float("nan"))
                continue
            norm = torch.log(totals[sl][scored].clamp(max=float(self.vocab_size)))
            out["token_entropy"].append(float(entropy[sl][scored].mean()))
            out["top_token_share"].append(float(top_share[sl][scored].mean()))
            out["specificity"].append(float((1 - entropy[sl][scored] / norm).mean()))
        return out

    def top_tokens(self, feature: int, n: int = 5) -> list[tuple[int, int]]:
        """The feature's most frequent activating tokens: [(token id, count)], most frequent first."""
        hist = self.token_histograms()
        if hist is None:
            return []
        keys, counts = self._token_keys[0], self._token_counts
        lo = int(torch.searchsorted(keys, torch.tensor(feature * self.vocab_size)))
        hi = int(torch.searchsorted(keys, torch.tensor((feature + 1) * self.vocab_size)))
        best = torch.argsort(counts[lo:hi], descending=True)[:n]
        return [(int(keys[lo + i] % self.vocab_size), int(counts[lo + i])) for i in best]
