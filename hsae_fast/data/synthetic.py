"""A synthetic hierarchy with known ground truth (issue 7), and the scores that use it.

Concepts form a tree (top level first in the generative story, bottom first in storage, like the
model): a top concept fires on its own, a child fires only while its parent is active, and so on.
Each active concept adds magnitude * direction; magnitudes are log-normal (heavy-tailed), and a
child's direction shares `child_parent_cos` with its parent's, as related concepts do ("beagle"
is mostly "dog"). Gaussian noise and a constant offset (what `b_dec` must learn) complete x.

The default is SPEC 8's task: d=128, 8/32/128 concepts (branching 4), a mean of 2/4/8 active
concepts per token at the top/middle/bottom, which a model of sizes 128/32/8 and k 8/4/2 matches.
Batch i of seed s is a pure function of (s, i), so a resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class SyntheticConfig:
    """level_sizes: concepts per level, bottom first; mean_active: mean active concepts per token per
    level (bottom first); a child fires with probability mean_active[l] / (mean_active[l+1] * branching)
    under an active parent."""

    d_model: int = 128
    level_sizes: Sequence[int] = (128, 32, 8)
    mean_active: Sequence[float] = (8.0, 4.0, 2.0)
    child_parent_cos: float = 0.5
    magnitude_sigma: float = 0.5
    noise_std: float = 0.02
    offset_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.level_sizes = tuple(int(s) for s in self.level_sizes)
        self.mean_active = tuple(float(a) for a in self.mean_active)
        L = len(self.level_sizes)
        if L < 1 or len(self.mean_active) != L:
            raise ValueError(f"SyntheticConfig: level_sizes {self.level_sizes} and mean_active {self.mean_active} "
                             "need one entry per level")
        for l in range(L - 1):
            if self.level_sizes[l] % self.level_sizes[l + 1]:
                raise ValueError(f"SyntheticConfig.level_sizes={self.level_sizes}: each level must be a whole "
                                 f"multiple of the one above (level {l})")
        for l, p in enumerate(self.fire_probabilities()):
            if not 0 < p <= 1:
                raise ValueError(f"SyntheticConfig.mean_active={self.mean_active}: level {l} needs a firing "
                                 f"probability in (0, 1], got {p:.3g}")
        if not 0 <= self.child_parent_cos < 1:
            raise ValueError(f"SyntheticConfig.child_parent_cos={self.child_parent_cos}: must be in [0, 1)")

    def fire_probabilities(self) -> list:
        """Per level (bottom first): P(fire) for a top concept, P(fire | parent active) below."""
        L = len(self.level_sizes)
        probs = []
        for l in range(L):
            if l == L - 1:
                probs.append(self.mean_active[l] / self.level_sizes[l])
            else:
                branching = self.level_sizes[l] // self.level_sizes[l + 1]
                probs.append(self.mean_active[l] / (self.mean_active[l + 1] * branching))
        return probs

    def to_dict(self) -> dict:
        out = asdict(self)
        out["level_sizes"], out["mean_active"] = list(self.level_sizes), list(self.mean_active)
        return out


@dataclass
class GroundTruth:
    """directions: (F, d) unit rows, bottom level first; parent: (F,) int64 global ids, -1 at the top;
    offset: (d,) constant added to every x."""

    directions: torch.Tensor
    parent: torch.Tensor
    level_sizes: tuple
    offset: torch.Tensor

    @property
    def level_offsets(self) -> tuple:
        return tuple(sum(self.level_sizes[:l]) for l in range(len(self.level_sizes)))


def _tree_parent(level_sizes: Sequence[int]) -> torch.Tensor:
    """Concept i of level l has parent floor(i / branching) of level l+1 (global ids)."""
    parts, offset = [], 0
    for l, size in enumerate(level_sizes):
        if l == len(level_sizes) - 1:
            parts.append(torch.full((size,), -1, dtype=torch.int64))
        else:
            branching = size // level_sizes[l + 1]
            parts.append(offset + size + torch.arange(size) // branching)
        offset += size
    return torch.cat(parts)


# Salts keep the generator's random streams apart from each other and from a model's own
# initialization: a model seeded with 0 must not start from the true directions of seed 0.
_TRUTH_SALT, _BATCH_SALT, _SAMPLE_SALT, _EVAL_SALT = 0x7A3B_11, 0x51C0_2D, 0x2E77_A9, 0x6F0D_35


def _salted(seed: int, salt: int, index: int = 0) -> int:
    return (int(seed) * 0x9E3779B1 + salt * 0x1000003 + index) % (1 << 62)


class SyntheticHierarchy:
    """The generator; also an `ActivationSource` (d_model, batches, sample)."""

    def __init__(self, cfg: Optional[SyntheticConfig] = None, **overrides):
        self.cfg = cfg or SyntheticConfig(**overrides)
        self.d_model = self.cfg.d_model
        self.truth = self._make_truth()

    def _make_truth(self) -> GroundTruth:
        c = self.cfg
        gen = torch.Generator().manual_seed(_salted(c.seed, _TRUTH_SALT))
        parent = _tree_parent(c.level_sizes)
        F = sum(c.level_sizes)
        directions = torch.zeros(F, c.d_model)
        offsets = [sum(c.level_sizes[:l]) for l in range(len(c.level_sizes))]
        sin = (1 - c.child_parent_cos**2) ** 0.5
        for l in reversed(range(len(c.level_sizes))):  # parents first
            ids = torch.arange(offsets[l], offsets[l] + c.level_sizes[l])
            fresh = torch.nn.functional.normalize(torch.randn(len(ids), c.d_model, generator=gen), dim=1)
            if l == len(c.level_sizes) - 1:
                directions[ids] = fresh
                continue
            up = directions[parent[ids]]
            own = torch.nn.functional.normalize(fresh - (fresh * up).sum(1, keepdim=True) * up, dim=1)
            directions[ids] = c.child_parent_cos * up + sin * own
        offset = torch.randn(c.d_model, generator=gen)
        offset = offset / offset.norm() * c.offset_norm
        return GroundTruth(directions, parent, tuple(c.level_sizes), offset)

    def generate(self, n: int, generator: torch.Generator, return_codes: bool = False):
        """n tokens: x (n, d) float32, and with `return_codes` the true activations (n, F)."""
        c, truth = self.cfg, self.truth
        L, offsets = len(c.level_sizes), truth.level_offsets
        probs = c.fire_probabilities()
        F = truth.directions.shape[0]
        active = torch.zeros(n, F, dtype=torch.bool)
        for l in reversed(range(L)):
            ids = slice(offsets[l], offsets[l] + c.level_sizes[l])
            fire = torch.rand(n, c.level_sizes[l], generator=generator) < probs[l]
            if l < L - 1:
                fire &= active[:, truth.parent[ids]]
            active[:, ids] = fire
        magnitude = torch.exp(c.magnitude_sigma * torch.randn(n, F, generator=generator))
        codes = active * magnitude
        x = codes @ truth.directions + truth.offset + c.noise_std * torch.randn(n, c.d_model, generator=generator)
        return (x, codes) if return_codes else x

    # ActivationSource -------------------------------------------------------------
    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """Batch i is generated from the seed (seed, i): an endless, resumable stream."""
        i = start
        while True:
            gen = torch.Generator().manual_seed(_salted(seed, _BATCH_SALT, i))
            yield self.generate(batch_size, gen)
            i += 1

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        return self.generate(n, torch.Generator().manual_seed(_salted(seed, _SAMPLE_SALT)))

    def describe(self) -> str:
        return f"synthetic hierarchy {self.cfg.to_dict()}"


# ------------------------------------------------------------------------- scoring
def _unit(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows.detach().double(), dim=1)


def match_features(truth_rows: torch.Tensor, learned_rows: torch.Tensor) -> tuple:
    """For each true direction, the best cosine with any learned row and that row's index."""
    cos = _unit(truth_rows) @ _unit(learned_rows).T
    best = cos.max(1)
    return best.values, best.indices


def feature_recovery(truth: GroundTruth, W_dec: torch.Tensor, level_sizes: Sequence[int],
                     path_mask: Optional[torch.Tensor] = None) -> dict:
    """Per true level: mean over its true features of the best cosine to a learned decoder row.
    A model with as many levels as the truth is matched level to level; any other model (a flat
    SAE) is matched against all its rows. Returns {"per_level": [...], "match": (F_true,) ids}."""
    W = W_dec.detach()
    alive = path_mask if path_mask is not None else torch.ones(W.shape[0], dtype=torch.bool)
    same_shape = len(level_sizes) == len(truth.level_sizes)
    model_offsets = [sum(level_sizes[:l]) for l in range(len(level_sizes))]
    per_level, match = [], torch.empty(truth.directions.shape[0], dtype=torch.int64)
    for l, size in enumerate(truth.level_sizes):
        rows = slice(truth.level_offsets[l], truth.level_offsets[l] + size)
        if same_shape:
            candidates = torch.arange(model_offsets[l], model_offsets[l] + level_sizes[l])
        else:
            candidates = torch.arange(W.shape[0])
        candidates = candidates[alive[candidates]]
        if candidates.numel() == 0:
            per_level.append(0.0)
            match[rows] = -1
            continue
        best, idx = match_features(truth.directions[rows], W[candidates])
        per_level.append(float(best.mean()))
        match[rows] = candidates[idx]
    return {"per_level": per_level, "match": match}


def tree_recovery(truth: GroundTruth, match: torch.Tensor, model_parent: torch.Tensor) -> float:
    """Fraction of true child-parent links (c, p) with model_parent[match[c]] == match[p]."""
    children = torch.nonzero(truth.parent >= 0).squeeze(1)
    if children.numel() == 0:
        return float("nan")
    mc, mp = match[children], match[truth.parent[children]]
    ok = (mc >= 0) & (mp >= 0)
    hit = ok & (model_parent[mc.clamp(min=0)] == mp)
    return float(hit.double().mean())


def induced_tree(truth: GroundTruth, match: torch.Tensor, num_features: int) -> torch.Tensor:
    """A parent map for a model without a tree (a flat SAE): each learned feature that is the best
    match of a true child gets the best match of that child's true parent. Unmatched features and
    matches of top concepts have no parent (-1), so HCS then asks: when the flat SAE's "beagle"
    fires, does its "dog" fire too?"""
    parent = torch.full((num_features,), -1, dtype=torch.int64)
    children = torch.nonzero(truth.parent >= 0).squeeze(1)
    parent[match[children]] = match[truth.parent[children]]
    parent[parent == torch.arange(num_features)] = -1  # one row matched to both: no self-loops
    return parent


@torch.no_grad()
def score_model(layer, source: SyntheticHierarchy, n_tokens: int = 8192, batch_size: int = 4096,
                W_dec: Optional[torch.Tensor] = None) -> dict:
    """Everything issue 7 scores on one held-out sample, in eval mode (threshold selection, so a
    token's code does not depend on its batch): feature recovery per true level, tree recovery,
    HCS (the model's own tree; a flat SAE's induced tree), FVU and L0 per model level.
    `W_dec` replaces the layer's decoder rows for recovery and tree (e.g. `refine_decoder`'s)."""
    from ..metrics import ActivityCounter, hcs_counts

    truth, cfg = source.truth, layer.cfg
    was_training = layer.training
    layer.eval()
    x = source.generate(n_tokens, torch.Generator().manual_seed(_salted(source.cfg.seed, _EVAL_SALT))).to(
        device=layer.W_dec.device, dtype=layer.W_dec.dtype)
    rows = (W_dec if W_dec is not None else layer.W_dec).detach().cpu()
    mask = layer.path_mask.cpu()
    recovery = feature_recovery(truth, rows, cfg.level_sizes, mask)
    hierarchical = cfg.num_levels == len(truth.level_sizes)
    parent = layer.parent.cpu() if hierarchical else induced_tree(truth, recovery["match"], cfg.dict_size)
    counter = ActivityCounter(cfg.level_sizes)
    hits = count = 0
    sq_err = 0.0
    for start in range(0, n_tokens, batch_size):
        xb = x[start: start + batch_size]
        out = layer(xb)
        levels = [type(c)(c.idx.cpu(), c.vals.cpu(), c.scores.cpu()) for c in out.levels]
        counter.update(levels)
        idx = torch.cat([c.idx for c in levels], 1)
        vals = torch.cat([c.vals for c in levels], 1)
        h, n = hcs_counts(idx, vals, parent, idx, vals, mask)
        hits, count = hits + h, count + n
        sq_err += float((xb.double() - out.x_hat.double()).pow(2).sum())
    layer.train(was_training)
    x64 = x.double()
    return {
        "recovery": recovery["per_level"],
        # The flat SAE's criterion (best row of any level), for a like-for-like comparison.
        "recovery_any_level": feature_recovery(truth, rows, (cfg.dict_size,), mask)["per_level"],
        # A flat SAE has no tree to recover (its induced tree is built from the matching itself).
        "tree_recovery": tree_recovery(truth, recovery["match"], parent) if hierarchical else float("nan"),
        "hcs": hits / count if count else float("nan"),
        "fvu": sq_err / float((x64 - x64.mean(0)).pow(2).sum()),
        "l0": counter.l0(),
        "dead_frac": counter.dead_fraction(mask),
    }
