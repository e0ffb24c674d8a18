"""The fixed tree (SPEC 2): default parent map, subtree pruning, and the child lists routed encodes use."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HSAEConfig


def default_parent(cfg: HSAEConfig) -> torch.Tensor:
    """(F,) int64: child i (local in level l) has parent floor(i * F_{l+1} / F_l) (local in level l+1)."""
    parts = []
    sizes, offsets = cfg.level_sizes, cfg.level_offsets
    for l, size in enumerate(sizes):
        if l == len(sizes) - 1:
            parts.append(torch.full((size,), -1, dtype=torch.int64))
        else:
            local = torch.arange(size, dtype=torch.int64)
            parts.append(offsets[l + 1] + torch.div(local * sizes[l + 1], size, rounding_mode="floor"))
    return torch.cat(parts)


def config_parent(cfg: HSAEConfig) -> torch.Tensor:
    return torch.tensor(cfg.parent, dtype=torch.int64) if cfg.parent is not None else default_parent(cfg)


def subtree_mask(parent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(F,) bool: the given features and every descendant of them (a pruned path is pruned to the leaves)."""
    mask = torch.zeros(parent.shape[0], dtype=torch.bool, device=parent.device)
    mask[ids] = True
    has_parent = parent >= 0
    safe_parent = parent.clamp(min=0)
    # Depth is at most L, and each pass pushes the mask one level down.
    while True:
        grown = mask | (has_parent & mask[safe_parent])
        if torch.equal(grown, mask):
            return mask
        mask = grown


@dataclass(frozen=True)
class ChildLists:
    """Unpruned children of every parent of one level pair, grouped by parent (CSR).

    child_ptr: (F_{l+1} + 1,) int64; the children of parent p (local id in level l+1) are
    child_ids[child_ptr[p]:child_ptr[p+1]] (local ids in level l, ascending). max_children: the
    widest group.
    Under the default map each group is a contiguous range of level l, so routed encodes read
    contiguous blocks of W_enc; a custom map is handled through the same lists.
    """

    child_ptr: torch.Tensor
    child_ids: torch.Tensor
    max_children: int


@dataclass(frozen=True)
class TreePlan:
    """Everything the encode and decode need to know about the tree, derived from `parent` and `path_mask`."""

    level_sizes: tuple[int, ...]
    level_offsets: tuple[int, ...]
    children: tuple[ChildLists, ...]  # children[l]: level l's features grouped by their parent in l+1
    # local_parent[l]: (F_l,) each feature's parent as a local id in level l + 1 (-1 at the top):
    # the encode op sees one level's rows and level-local ids only.
    local_parent: tuple[torch.Tensor, ...]

    @staticmethod
    def build(cfg: HSAEConfig, parent: torch.Tensor, path_mask: torch.Tensor) -> "TreePlan":
        children = []
        sizes, offsets = cfg.level_sizes, cfg.level_offsets
        for l in range(len(sizes) - 1):
            ids = torch.arange(offsets[l], offsets[l] + sizes[l], device=parent.device)
            ids = ids[path_mask[ids]]
            parent_local = parent[ids] - offsets[l + 1]
            order = torch.sort(parent_local, stable=True).indices
            # scatter_add, not bincount: bincount's length is data-dependent (max id + 1), which
            # torch.compile(fullgraph=True) cannot trace on torch 2.11 (the GPU image's version)
            counts = torch.zeros(sizes[l + 1], dtype=torch.int64, device=parent.device)
            counts.scatter_add_(0, parent_local, torch.ones_like(parent_local))
            ptr = torch.zeros(sizes[l + 1] + 1, dtype=torch.int64, device=parent.device)
            ptr[1:] = torch.cumsum(counts, 0)
            max_children = int(counts.max()) if counts.numel() else 0
            children.append(ChildLists(ptr, (ids[order] - offsets[l]).contiguous(), max_children))
        local_parent = [parent[o: o + s] - offsets[l + 1] for l, (o, s) in enumerate(zip(offsets[:-1], sizes[:-1]))]
        local_parent.append(torch.full((sizes[-1],), -1, dtype=torch.int64, device=parent.device))
        return TreePlan(tuple(sizes), tuple(offsets), tuple(children), tuple(local_parent))
