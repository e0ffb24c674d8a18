"""Helpers every backend shares: output allocation (poisonable for tests) and the compute dtype."""
from __future__ import annotations

import contextlib
import os

import torch

_POISON = os.environ.get("HSAE_POISON_OUTPUTS", "") == "1"


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """While active, every backend output buffer starts as NaN (floats) or a huge id (ints), so an
    element a kernel forgets to write shows up in the comparison instead of passing as zero."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def level_stops(widths) -> list[int]:
    """Boundaries of consecutive blocks (levels' rows, or their slots side by side): block l is
    [stops[l], stops[l + 1])."""
    stops = [0]
    for w in widths:
        stops.append(stops[-1] + int(w))
    return stops


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a reused buffer as `new_output` would a fresh one (NaN) while poisoning is on."""
    if _POISON:
        t.fill_(float("nan"))
    return t


def new_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a buffer the backend promises to write completely."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def native_options(impl, **wanted: bool) -> dict:
    """The backward options asked for (those True) that backend module `impl` takes natively (its
    `BACKWARD_OPTIONS`), as keyword arguments; the ops do the others after the call."""
    native = getattr(impl, "BACKWARD_OPTIONS", ())
    return {name: True for name, on in wanted.items() if on and name in native}


def to_row_gradient(g_W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense (F, d) weight gradient as a row gradient (rows, values): rows the strictly increasing
    ids of its nonzero rows (non-finite counts as nonzero), values (R, d) those rows; every other
    row of g_W is zero. For backends that write the dense gradient (the cpp backend writes the rows
    directly, without this pass over F x d)."""
    rows = g_W.ne(0).any(1).nonzero().flatten()  # ascending
    return rows, g_W.index_select(0, rows)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """SPEC 4: accumulate in float32 for 16-bit inputs; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
