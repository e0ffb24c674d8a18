"""Activation sources on disk: one `.npy` file (N, d), memory-mapped, or a folder of
`.safetensors` shards each holding a tensor `activations` (n_i, d).

Both shuffle per epoch with a permutation drawn from (seed, epoch), so batch i of a seed is a
pure function of (seed, i) and a resumed run continues with the same batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

SHARD_TENSOR = "activations"


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % (1 << 62))


class _RowSource:
    """Shared batching over `n_rows` rows read through `_rows(sorted_ids)`."""

    n_rows: int
    d_model: int

    def _rows(self, ids: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, d) batches; an epoch is one shuffled pass (the last partial
        batch of an epoch is dropped, so every batch has batch_size rows)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
        if batch_size > self.n_rows:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.n_rows} rows of {self.describe()}")
        per_epoch = self.n_rows // batch_size
        i = start
        perm, perm_epoch = None, -1
        while True:
            epoch, within = divmod(i, per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(_epoch_generator(seed, epoch)), epoch
            ids = perm[within * batch_size: (within + 1) * batch_size]
            yield self._ordered(ids)
            i += 1

    def _permutation(self, gen: torch.Generator) -> np.ndarray:
        """One epoch's row order."""
        return torch.randperm(self.n_rows, generator=gen).numpy()

    def _ordered(self, ids: np.ndarray) -> torch.Tensor:
        # Read in storage order (fast on a memmap), then put the rows back in the shuffled order.
        order = np.argsort(ids, kind="stable")
        rows = self._rows(ids[order])
        out = torch.empty_like(rows)
        out[torch.from_numpy(order)] = rows
        return out

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        if int(n) < 0:  # min(-3, N) would slice [:-3]: N - 3 rows
            raise ValueError(f"sample n={n}: must be >= 0")
        n = min(int(n), self.n_rows)
        ids = torch.randperm(self.n_rows, generator=_epoch_generator(seed, -1))[:n].numpy()
        return self._ordered(ids)

    def describe(self) -> str:
        raise NotImplementedError


def _check_size(what: str, n_rows: int, d_model: int) -> None:
    if n_rows < 1 or d_model < 1:  # else it fails later, at the first batch, or trains on nothing
        raise ValueError(f"{what}: holds {n_rows} rows of width {d_model}; expected at least one row of width >= 1")


class NpySource(_RowSource):
    """A `.npy` file of activations (N, d), memory-mapped (never loaded whole)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.array = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from exc
        if self.array.ndim != 2 or not np.issubdtype(self.array.dtype, np.floating):
            raise ValueError(f"{self.path}: expected a 2-d float array (N, d), got shape {self.array.shape} "
                             f"dtype {self.array.dtype}")
        self.n_rows, self.d_model = self.array.shape
        _check_size(self.describe(), self.n_rows, self.d_model)

    def _rows(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[ids], dtype=np.float32))

    def describe(self) -> str:
        return f"{self.path} ({self.n_rows} x {self.d_model})"


class ShardSource(_RowSource):
    """A folder of `.safetensors` shards, each with a tensor `activations` (n_i, d); shards are
    read lazily, one at a time (the most recent one is kept)."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.shards = sorted(self.folder.glob("*.safetensors"))
        if not self.shards:
            raise ValueError(f"{self.folder}: no .safetensors shards found")
        sizes, dims = [], set()
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                if SHARD_TENSOR not in f.keys():
                    raise ValueError(f"{shard}: has no tensor '{SHARD_TENSOR}' (found {sorted(f.keys())})")
                tensor = f.get_slice(SHARD_TENSOR)
                shape, dtype = tensor.get_shape(), tensor.get_dtype()
            if len(shape) != 2:
                raise ValueError(f"{shard}: '{SHARD_TENSOR}' has shape {shape}, expected (n, d)")
            if not dtype.startswith(("F", "BF")):  # as a .npy source: activations are floats
                raise ValueError(f"{shard}: '{SHARD_TENSOR}' has dtype {dtype}, expected a float dtype")
            sizes.append(shape[0])
            dims.add(shape[1])
        if len(dims) != 1:
            raise ValueError(f"{self.folder}: shards disagree on d_model: {sorted(dims)}")
        self.d_model = dims.pop()
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_rows = int(self.starts[-1])
        _check_size(str(self.folder), self.n_rows, self.d_model)
        self._cache = (-1, None)

    def _permutation(self, gen: torch.Generator) -> np.ndarray:
        """Shards in random order, rows shuffled within each: a batch reads one or two shards,
        not all of them (shards are written from shuffled or mixed documents in practice)."""
        parts = []
        for s in torch.randperm(len(self.shards), generator=gen).tolist():
            size = int(self.starts[s + 1] - self.starts[s])
            parts.append(self.starts[s] + torch.randperm(size, generator=gen).numpy())
        return np.concatenate(parts)

    def _shard(self, index: int) -> torch.Tensor:
        if self._cache[0] != index:
            from safetensors.torch import load_file

            self._cache = (index, load_file(str(self.shards[index]))[SHARD_TENSOR].float())
        return self._cache[1]

    def _rows(self, ids: np.ndarray) -> torch.Tensor:
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        out = torch.empty(len(ids), self.d_model)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            out[torch.from_numpy(where)] = self._shard(int(s))[torch.from_numpy(ids[where] - self.starts[s])]
        return out

    def describe(self) -> str:
        return f"{self.folder} ({len(self.shards)} shards, {self.n_rows} x {self.d_model})"
