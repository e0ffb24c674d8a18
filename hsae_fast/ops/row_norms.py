"""Row gradients' squared norms, as the backward that wrote the rows computed them.

The trainer's update clips by the global gradient norm, so without these it reads every gradient row
of W_enc and W_dec once more, and for W_dec each weight row too (the decoder gradient's part along
its row does not count): 7.5 ms of a 105 ms routed step at F=65536, d=768, N=1024 on the 2-core CPU.
The cpp backend's backward computes each row's squared norm while the row is in cache, with the
function the update's own pass calls (`gradient_row_sq_norm`: the same bits), and leaves the norms
here, keyed by the gradient's values. `MaskedAdamW.update(backward_norms=True)`, which the trainer
passes (nothing runs between its backward and its update), takes them for a gradient whose values
are those rows as written: the same storage and shape, version 0 (an in-place change through the
gradient bumps it) and the same sampled elements; anything else computes the norms again."""
from __future__ import annotations

from typing import Optional

import torch

_MAX_ENTRIES = 8  # a few backward passes' worth; older ones (never taken) are dropped
_SAMPLES = 8
_entries: dict[int, tuple] = {}


def _sample(values: torch.Tensor) -> torch.Tensor:
    """A few elements spread over the rows: with the shape, what tells the rows written from other
    rows that reuse their storage (the gradient pool hands the same buffer to the next step)."""
    flat = values.reshape(-1)
    n = min(_SAMPLES, flat.numel())
    at = torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)  # integers: exact for any size
    return flat[at].clone()


def remember(values: torch.Tensor, plain: torch.Tensor, projected: Optional[torch.Tensor] = None) -> None:
    """Row r of `values` (R, d) has squared norm plain[r], and projected[r] off its weight row. Real
    tensors only (a traced backward's fake ones have no storage, and compiled code keeps dense gradients)."""
    if type(values) is not torch.Tensor or values.numel() == 0 or torch.compiler.is_compiling():
        return
    while len(_entries) >= _MAX_ENTRIES:
        _entries.pop(next(iter(_entries)))
    _entries[values.data_ptr()] = (tuple(values.shape), _sample(values), plain, projected)


def take(values: torch.Tensor, version: int, projected: bool) -> Optional[torch.Tensor]:
    """The (R,) squared norms of `values` (a row gradient's values, `version` its version counter)
    as remembered, plain or projected; None where they were not or no longer match. Taking removes them."""
    entry = _entries.pop(values.data_ptr(), None) if type(values) is torch.Tensor and values.numel() else None
    if entry is None:
        return None
    shape, sample, plain, proj = entry
    norms = proj if projected else plain
    if norms is None or version != 0 or tuple(values.shape) != shape or not torch.equal(_sample(values), sample):
        return None
    return norms


def clear() -> None:
    _entries.clear()
