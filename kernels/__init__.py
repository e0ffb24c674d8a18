"""Triton kernels of hsae_fast, one op per file, each with plain Python launchers.

- `encode_dense`:  top level (and flat / ungated levels): GEMM tiles + running per-token top-k,
                   no N x F buffer.
- `encode_routed`: gated levels: scores only for the children of active parents, grouped by parent.
- `select`:        the per-token top-kmax of candidate lists both encodes end with.
- `decode`:        sparse row gather-sum (the decode, and the encode's g_xc), gather-dot and the
                   per-feature scatter of the backward (atomics, or a deterministic sorted mode).
- `encode_backward`: the encode's sparse backward, built from `decode`'s primitives.

Settings shared by every launcher live here: whether kernels run under the interpreter (decided
when Triton decorates them, i.e. at import), the operand dtype of `tl.dot`, and the
deterministic-scatter switch.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

# Triton decides at decoration time whether a @triton.jit function is interpreted; read it once.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# None: follow HSAE_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True). True/False: force.
DETERMINISTIC: bool | None = None

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def deterministic() -> bool:
    """Whether per-feature gradient sums use the sorted (bit-reproducible) scatter instead of atomics."""
    if DETERMINISTIC is not None:
        return DETERMINISTIC
    return os.environ.get("HSAE_DETERMINISTIC", "") == "1" or torch.are_deterministic_algorithms_enabled()


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_operand_dtype(dtype: torch.dtype):
    """Operand dtype for tl.dot. The interpreter multiplies bfloat16 as raw integers (Triton 3.9),
    so there bf16 operands are widened to float32 first: exact, since a bf16 product fits in fp32."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"triton backend: dtype {dtype} is not supported; expected one of {tuple(_TL_DTYPES)}")
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied exactly ("ieee"), not in TF32: the SPEC's float32 contract."""
    return "ieee" if dot_operand_dtype(dtype) in (tl.float32, tl.float64) else "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 under the interpreter: one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
