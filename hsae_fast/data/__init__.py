"""Activation sources: where training data comes from (SPEC 9 `SOURCE`).

An `ActivationSource` has `d_model`, `batches(batch_size, seed, start=0)` (an endless stream of
float32 (batch_size, d) tensors; batch i is a pure function of (seed, i), so `start` resumes a
run exactly) and `sample(n, seed)` (n rows, for the `b_dec` init and for evaluation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    d_model: int

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]: ...

    def sample(self, n: int, seed: int = 0) -> torch.Tensor: ...


def open_source(data: str, model: Optional[str] = None, layer: Optional[int] = None, **options) -> ActivationSource:
    """"synthetic" (the embedded hierarchy; `options` override `SyntheticConfig` fields), a `.npy`
    file (N, d), a folder of `.safetensors` shards with tensor `activations`, or, when `model` is
    given, that language model's activations at `layer` (`hsae_fast.data.lm`)."""
    if model is not None:
        from .lm import open_lm_source

        return open_lm_source(model=model, layer=layer, **options)
    if data == "synthetic":
        from .synthetic import SyntheticHierarchy

        return SyntheticHierarchy(**options)
    if options:
        raise ValueError(f"open_source({data!r}): options {sorted(options)} apply only to synthetic or LM sources")
    path = Path(data)
    if path.suffix == ".npy" and path.is_file():
        from .files import NpySource

        return NpySource(path)
    if path.is_dir():
        from .files import ShardSource

        return ShardSource(path)
    raise ValueError(
        f"data={data!r}: expected 'synthetic', an existing .npy file (N, d), a folder of .safetensors shards "
        "each holding 'activations', or --model NAME --layer L for a language model"
    )


__all__ = ["ActivationSource", "open_source"]
