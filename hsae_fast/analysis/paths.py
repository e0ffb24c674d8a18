"""Active paths and edge use (SPEC 6), accumulated from sparse codes over an evaluated set.

A token's active features form a forest along `parent`. A **path** starts at an active feature none
of whose children is active for that token (a leaf of the token's forest; every active level-0
feature is one) and climbs while the parent is active. It is named by its leaf and the level it
reaches: under hard gating every path reaches the top; without gating it stops at the first
inactive parent. Counting (leaf, top level) pairs needs an (F * L,) vector, never N x F.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..eval.stats import grouped_token_stats
from ..metrics import edge_attribution


def _match(ids_a, ids_b, on_b) -> torch.Tensor:
    """(n, ka, kb) bool: slot a's wanted id equals slot b's id and slot b is active."""
    return (ids_a[:, :, None] == ids_b[:, None, :]) & on_b[:, None, :]


class PathStats:
    def __init__(self, layer, vocab_size: Optional[int] = None):
        cfg = layer.cfg
        self.cfg = cfg
        self.parent = layer.parent.detach().cpu()
        self.edge_weight = layer.edge_weight.detach().cpu()
        F, L = cfg.dict_size, cfg.num_levels
        self.path_counts = torch.zeros(F * L, dtype=torch.int64)  # [leaf * L + top level]
        self.path_length_counts = torch.zeros(L, dtype=torch.int64)  # paths by number of features
        self.paths_per_token = torch.zeros((), dtype=torch.float64)
        self.cofire = torch.zeros(F, dtype=torch.int64)  # child active with its parent active
        self.attribution_sum = torch.zeros(F, dtype=torch.float64)
        self.attribution_abs_sum = torch.zeros(F, dtype=torch.float64)
        self.n = 0
        self.vocab_size = vocab_size
        self._token_keys: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, levels, token_ids: Optional[torch.Tensor] = None) -> None:
        levels = [type(c)(c.idx.detach().cpu(), c.vals.detach().cpu(), c.scores.detach().cpu()) for c in levels]
        L = len(levels)
        n = levels[0].idx.shape[0]
        self.n += n
        on = [c.vals != 0 for c in levels]
        # Climb length from each slot: 0 at the top, 1 + the parent's where the parent is active.
        up = [None] * L
        up[L - 1] = torch.zeros_like(levels[L - 1].idx)
        has_active_child = [torch.zeros_like(on[l]) for l in range(L)]
        for l in reversed(range(L - 1)):
            child, above = levels[l], levels[l + 1]
            wanted = self.parent[child.idx]
            match = _match(wanted, above.idx, on[l + 1])
            found = match.any(-1) & on[l]
            slot = match.to(torch.uint8).argmax(-1)
            up[l] = torch.where(found, 1 + up[l + 1].gather(1, slot), torch.zeros_like(slot))
            has_active_child[l + 1] = _match(above.idx, wanted, on[l]).any(-1)
            self.cofire += torch.bincount(child.idx[found], minlength=self.cfg.dict_size)
        for l, attribution in enumerate(edge_attribution(levels, self.parent, self.edge_weight)):
            nonzero = attribution != 0
            self.attribution_sum.index_add_(0, levels[l].idx[nonzero], attribution[nonzero].double())
            self.attribution_abs_sum.index_add_(0, levels[l].idx[nonzero], attribution[nonzero].abs().double())
        for l in range(L):
            leaf = on[l] & ~has_active_child[l]
            top = l + up[l][leaf]
            keys = levels[l].idx[leaf] * L + top
            self.path_counts += torch.bincount(keys, minlength=self.path_counts.numel())
            self.path_length_counts += torch.bincount(top - l, minlength=L)
            self.paths_per_token += leaf.sum()
            if token_ids is not None and self.vocab_size:
                tokens = token_ids.cpu()[:, None].expand_as(levels[l].idx)[leaf]
                self._token_keys.append(keys * self.vocab_size + tokens)

    # ----------------------------------------------------------------- results
    def path_features(self, key: int) -> list[int]:
        """The chain of features of path `key` (leaf first, up to its top level)."""
        L = self.cfg.num_levels
        leaf, top = divmod(int(key), L)
        chain = [leaf]
        level = next(l for l, o in enumerate(self.cfg.level_offsets) if o <= leaf < o + self.cfg.level_sizes[l])
        for _ in range(top - level):
            chain.append(int(self.parent[chain[-1]]))
        return chain

    def possible_paths(self, path_mask: torch.Tensor) -> int:
        """Full-length paths the unpruned tree allows: one per unpruned bottom feature (each climbs
        to the top through unpruned parents, since pruning removes whole subtrees)."""
        return int(path_mask[: self.cfg.level_sizes[0]].sum())

    def path_tokens(self):
        """(path keys, token ids, counts) over every (path, token) seen; None without tokens."""
        if not self._token_keys:
            return None
        keys, counts = torch.unique(torch.cat(self._token_keys), return_counts=True)
        self._token_keys = [keys.repeat_interleave(counts)]
        return keys // self.vocab_size, keys % self.vocab_size, counts

    def path_specialization(self, min_count: int = 5) -> dict:
        """Per path used at least `min_count` times: 1 - H(tokens) / log(min(uses, V)) and the share
        of its most frequent token. {path key: (specialization, top token, top share)}."""
        hist = self.path_tokens()
        if hist is None:
            return {}
        paths, tokens, counts = hist
        totals, entropy, top_share, top_token = grouped_token_stats(paths, tokens, counts, self.path_counts.numel())
        scored = (totals >= max(2, min_count)).nonzero().squeeze(1)
        norm = torch.log(totals[scored].clamp(max=float(self.vocab_size)))
        spec = 1 - entropy[scored] / norm
        return {int(k): (float(sp), int(top_token[k]), float(top_share[k])) for k, sp in zip(scored.tolist(), spec.tolist())}
