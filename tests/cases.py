"""Shapes every backend is checked on: awkward on purpose (odd d, d=1, N=1, k=F, one-child parents,
L=1 and L=4, custom parent maps, no gating)."""
from __future__ import annotations

import torch

from hsae_fast import HSAEConfig


def _random_parent(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    parts, offset = [], 0
    for l, size in enumerate(sizes):
        if l == len(sizes) - 1:
            parts.append(torch.full((size,), -1))
        else:
            up = offset + size
            # every parent keeps at least one child, the rest are spread at random
            p = torch.cat([torch.arange(sizes[l + 1]), torch.randint(0, sizes[l + 1], (size - sizes[l + 1],), generator=gen)])
            parts.append(up + p[torch.randperm(size, generator=gen)])
        offset += size
    return torch.cat(parts).tolist()


# name -> (config kwargs, N)
CASES = {
    "flat": (dict(d_model=16, level_sizes=(37,), k=(5,)), 33),
    "three_level": (dict(d_model=13, dict_size=84, k=(8, 4, 2)), 41),
    "four_level": (dict(d_model=12, level_sizes=(40, 20, 10, 5), k=(6, 4, 2, 1)), 29),
    "d1": (dict(d_model=1, level_sizes=(12, 6, 3), k=(3, 2, 1)), 17),
    "one_token": (dict(d_model=9, level_sizes=(24, 8, 4), k=(4, 2, 1)), 1),
    "k_equals_F": (dict(d_model=7, level_sizes=(6, 3, 2), k=(6, 3, 2)), 11),
    "one_child_parents": (dict(d_model=10, level_sizes=(5, 4, 2), k=(2, 2, 1)), 19),
    "custom_parent": (dict(d_model=11, level_sizes=(30, 9, 3), k=(6, 3, 2), parent=_random_parent((30, 9, 3), 7)), 23),
    "no_gating": (dict(d_model=14, level_sizes=(32, 12, 4), k=(6, 3, 2), gating="none"), 27),
}


def make_config(name: str, selection: str) -> tuple[HSAEConfig, int]:
    kwargs, N = CASES[name]
    return HSAEConfig(selection=selection, **kwargs), N
