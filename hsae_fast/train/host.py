"""Process settings for a CPU training loop: the allocator and the garbage collector.

A routed step on CPU is memory-bound and short (about 100 ms at F=65536, N=1024), so two costs of
the Python process that a GEMM-bound step hides become a sixth of it (measured with `perf` on the
wide tree's step, `python -m bench.bench_update`):

- Page faults. glibc returns freed blocks of a few MB (the step's (N, d) activations and gradients,
  the C++ ops' candidate buffers) to the OS, by munmap or by trimming the heap's top, so the next
  step's blocks of the same size fault in fresh zeroed pages: `clear_page_erms` was 4-9% of the
  step's samples. `tune_allocator` keeps blocks under 32 MiB on the heap and the heap untrimmed up
  to 1 GiB: what one step frees, the next one reuses. (Weight gradients of the cpp backend already
  come from its own pool, `backends/cpp.py`.)
- Python's cyclic garbage collector. A step makes a few hundred Python objects (tensors, autograd
  nodes), which trigger collections, and a full one walks every object of torch, triton and
  transformers: `gc_collect_main` and its visitors were 4-6% of the step. `frozen_gc` moves the
  objects that exist before the loop into the permanent generation (`gc.freeze`), so collections
  walk only what the loop made; nothing is leaked, the loop's own cycles are still collected.

Together: the wide tree's step 121-139 ms -> 103-112 ms on the 2-core CPU (12 runs alternating,
session 10); on small steps (F=9,540, d=640) no difference beyond the noise. `training_loop()`
applies both, as `Trainer.fit` does; set HSAE_HOST_TUNING=0 to leave the process as it is.

A third cost is the TLB. AdamW passes over the weight matrices and both their moments every step
(six F x d float32 tensors, 201 MB each at F=65536, d=768), and the routed encode reads nearly all
of W_enc: on 4 KiB pages that is a page walk every 4 KiB. `huge_page_empty` places a tensor on
2 MiB pages (Linux's transparent huge pages in "madvise" mode, the usual default, give them only to
memory that asks before its first write); `MaskedAdamW` puts W_enc, W_dec and their moments there
on CPU. Measured (session 15, one process, the wide step alternating with a copy of itself on 4 KiB
pages, 16 rounds): 1.09x faster, the flat step 1.02x.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for this parameter on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

_tuned = False
_MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGE_MIN_BYTES = 32 << 20  # smaller tensors: a few page walks, not worth 2 MiB of padding
_libc = None  # the C library once loaded, False where it cannot be


def enabled() -> bool:
    return os.environ.get("HSAE_HOST_TUNING", "1") != "0"


def tune_allocator() -> bool:
    """Keep freed blocks under 32 MiB for reuse (glibc on Linux; elsewhere nothing is changed).
    Returns whether the allocator is tuned. Idempotent; process-wide and not undone (the settings
    only change when memory goes back to the OS, never what a program computes)."""
    global _tuned
    if _tuned:
        return True
    mallopt = _libc_function("mallopt") if enabled() else None
    if mallopt is None:  # off Linux, musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; both or neither (a half-tuned heap would still trim).
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _tuned


def _libc_function(name: str):
    """A function of the C library (Linux only; loaded once), or None where there is none."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            except OSError:
                pass
    return getattr(_libc, name, None) if _libc else None


def _madvise_for(nbytes: int):
    """libc's madvise where a tensor of `nbytes` goes on huge pages (big enough, Linux, tuning on),
    else None."""
    if nbytes < HUGE_PAGE_MIN_BYTES or not enabled():
        return None
    madvise = _libc_function("madvise")
    if madvise is not None:
        madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def huge_page_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on the CPU, its memory advised onto 2 MiB pages before anything
    writes it (contiguous; a view at a 2 MiB-aligned offset of a slightly larger buffer). Below
    HUGE_PAGE_MIN_BYTES, off Linux, or with HSAE_HOST_TUNING=0: a plain torch.empty. The advice only
    changes which pages back the memory, never a value."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise_for(nbytes)
    if madvise is None:
        return torch.empty(shape, dtype=dtype)
    # Fresh: torch's allocator hands memory of this size straight from mmap, untouched, so the
    # pages are chosen at the first write, after the advice.
    buffer = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    offset = -buffer.data_ptr() % HUGE_PAGE_BYTES
    span = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    if offset + span <= buffer.numel():
        madvise(buffer.data_ptr() + offset, span, _MADV_HUGEPAGE)  # best effort: an error changes nothing
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def available_memory_bytes():
    """MemAvailable of /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `t` on 2 MiB pages (`huge_page_empty`), or `t` itself where that
    would give nothing (small, not on the CPU, or tuning off) or where the copy, which holds both
    for a moment, would not fit twice over in the memory available (a 9 GB W_enc on a 16 GB machine)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or _madvise_for(nbytes) is None:
        return t
    available = available_memory_bytes()
    if available is not None and available < 2 * nbytes:
        return t
    return huge_page_empty(t.shape, t.dtype).copy_(t)


@contextlib.contextmanager
def frozen_gc():
    """Collections inside skip the objects made before it (gc.freeze); undone on exit. Where the
    process has frozen objects already (its own gc.freeze, or an enclosing frozen_gc), nothing is
    changed: unfreezing on exit would undo what the caller froze."""
    if not enabled() or gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def training_loop(cpu: bool = True):
    """Both settings for the loop inside; `cpu=False` (a CUDA loop) only freezes the collector."""
    if cpu:
        tune_allocator()
    with frozen_gc():
        yield
