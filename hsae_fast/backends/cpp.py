"""The `cpp` backend: the four ops of `torch_sparse.py` in C++ for CPU tensors (csrc/hsae_cpu.cpp).

Same signatures and semantics as the torch backend. float32 and bfloat16 weights are read as they
are with float32 accumulation; float16 weights are upcast here (one copy per call); float64 runs
the torch backend's functions (the exactness path). Large dense levels may run their GEMM in
bfloat16 and prove the float32-sum result per token (`screen_mode`, `HSAE_CPU_BF16_SCREEN`).
Outputs are allocated here with `new_output`, so poisoned-output tests see every element the C++
code fails to write.

Which build is used (decided once per process):
- `HSAE_CPP_JIT=1`: compile csrc/ with `torch.utils.cpp_extension.load` on first use, cached under
  `TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions) and rebuilt whenever a source or flag
  changes. The development path, and the one the test suite takes (tests/conftest.py), so tests run
  the sources as they are now, never a stale build. A first build takes about a minute.
- otherwise: the module `pip install -e .` built (`hsae_fast._hsae_cpu`); if it is missing (no
  compiler at install time) the backend reports itself unavailable and `backend="auto"` picks `torch`.
  Not JIT by default: a library import should not stall for a minute of compiling without asking.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import runpy
from pathlib import Path
from typing import Optional

import torch

from . import torch_sparse
from .common import new_output, poison_, to_row_gradient

NAME = "cpp"
# Options the backward passes take natively (see encode_backward and decode_backward); the ops do
# the same for other backends after the fact.
BACKWARD_OPTIONS = ("row_grads", "grad_active_only", "xc_sum", "row_sq_norms")
# Options its encode_forward takes: screen=False keeps a level off the bfloat16 screen (`screen_mode`).
FORWARD_OPTIONS = ("screen",)
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_module = None
_status: Optional[tuple[bool, str]] = None
# What this file calls in the module: a build without one of them is stale and not used.
_ENTRY_POINTS = ("encode_forward", "encode_backward", "decode_forward", "decode_backward", "pooled_gradient",
                 "release_gradient_pool", "gradient_pool_bytes", "grad_sq_norm", "adamw_rows", "abi_version",
                 "screen_stats", "take_pending_step", "step_scalars")
_ABI_VERSION = 8  # csrc/bindings.cpp's abi_version(): the argument lists this file passes
# HSAE_CPU_BF16_SCREEN: "auto" (default), "1", "always" or "0"; see `screen_mode`.
SCREEN_ENV = "HSAE_CPU_BF16_SCREEN"


def _load_jit():
    from torch.utils.cpp_extension import load

    if not (_CSRC / "build_config.py").exists():
        raise RuntimeError(f"HSAE_CPP_JIT=1 but the C++ sources are not at {_CSRC} (not a source checkout)")
    config = runpy.run_path(str(_CSRC / "build_config.py"))
    return load(
        name="hsae_fast_cpu_jit",
        sources=[str(_CSRC / name) for name in config["SOURCES"]],
        extra_cflags=list(config["CXX_FLAGS"]),
        extra_ldflags=list(config["LINK_FLAGS"]),
        verbose=os.environ.get("HSAE_CPP_VERBOSE", "") == "1",
    )


def available() -> tuple[bool, str]:
    global _module, _status
    if _status is None:
        jit = os.environ.get("HSAE_CPP_JIT", "") == "1"
        try:
            _module = _load_jit() if jit else importlib.import_module("hsae_fast._hsae_cpu")
            missing = [name for name in _ENTRY_POINTS if not hasattr(_module, name)]
            if not missing and _module.abi_version() != _ABI_VERSION:
                missing = [f"abi_version {_ABI_VERSION} (it has {_module.abi_version()})"]
            if missing:  # a build older than these sources (pulled without reinstalling)
                _module = None
                _status = (False, f"hsae_fast._hsae_cpu is older than the sources (no {', '.join(missing)}); "
                                  f"rebuild it with `pip install --no-build-isolation -e .` or set HSAE_CPP_JIT=1")
                return _status
            _status = (True, f"C++/OpenMP CPU ops ({'JIT build of csrc/' if jit else 'built by pip install'})")
        except Exception as exc:  # no compiler, no build: the package must still import
            how = "JIT build failed" if jit else "hsae_fast._hsae_cpu is not built"
            last_line = (str(exc).strip().splitlines() or [""])[-1]  # a compiler's log ends with the verdict
            _status = (False, f"{how}: {type(exc).__name__}: {last_line}")
    return _status


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def _ext():
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the cpp backend is not available: {reason}")
    return _module


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _weights(W: torch.Tensor) -> torch.Tensor:
    """float32 and bfloat16 weights go in as they are; anything else (float16) is upcast."""
    return W.contiguous() if W.dtype in (torch.float32, torch.bfloat16) else W.float().contiguous()


# Weight gradients at least this big come from the C++ gradient pool: a training loop frees them
# every step, and a fresh buffer costs as much in page faults as the kernel that fills it.
_POOL_MIN_BYTES = 4 << 20


def _grad_buffer(needed: bool, shape) -> Optional[torch.Tensor]:
    """A float32 CPU gradient the C++ code writes completely, or None where it is not asked for."""
    if not needed:
        return None
    if math.prod(shape) * 4 >= _POOL_MIN_BYTES:
        return poison_(_ext().pooled_gradient(list(shape)))
    return new_output(shape, torch.float32, torch.device("cpu"))


def row_update_module():
    """The built module, for the trainer's row-wise update (train/optim.py), or None without one."""
    return _module if available()[0] else None


def release_gradient_pool() -> None:
    """Free the cached gradient buffers (they are kept, at most 4 per size and 16 GiB in all, for
    the next step's gradients); `gradient_pool_bytes()` says how much is held."""
    if available()[0]:
        _module.release_gradient_pool()


def gradient_pool_bytes() -> int:
    return _module.gradient_pool_bytes() if available()[0] else 0


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@functools.lru_cache(maxsize=None)  # read at every encode: the CPU does not change
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so torch's bfloat16 GEMM
    (oneDNN) runs 2-3x the float32 one's speed."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


SCREEN_MODES = {"0": 0, "1": 1, "always": 2}


def screen_mode() -> int:
    """How large dense levels (a flat SAE, a tree's top level) use the bfloat16 screen
    (csrc/hsae_cpu.cpp, "The bfloat16 screen"): a bfloat16 GEMM (oneDNN) bounds every float32-sum
    score, and each token's few candidates are scored again with float32 sums. The selection and the
    scores are those of the float32 GEMM (float32 weights) or of the float32-sum bfloat16 GEMM
    (bfloat16 weights), up to the order of the float32 sums, proven per token; a token the bound cannot
    settle gets a second pass. 0: never; 1: where it pays (levels of at least 32 (2K+16) features, 32
    tokens, d 64); 2: wherever it applies (tests). `HSAE_CPU_BF16_SCREEN`: "auto" (default) is 1 where
    the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and 0 elsewhere; "1", "always" and "0"
    force 1, 2 and 0 (without native bfloat16 the screen is slower, never wrong)."""
    mode = os.environ.get(SCREEN_ENV, "auto").strip().lower()
    if mode == "auto":
        return 1 if native_bf16() else 0
    if mode not in SCREEN_MODES:
        raise ValueError(f"{SCREEN_ENV}={mode!r}: expected auto, 1, always or 0")
    return SCREEN_MODES[mode]


def screen_stats(reset: bool = False) -> tuple[int, int]:
    """(tokens screened, tokens that needed its second pass) since the last reset, over all levels; a
    token whose level was split across threads (few tokens) counts once per part."""
    screened, full = _ext().screen_stats(reset)
    return int(screened), int(full)


# W_enc's AdamW steps waiting to be taken as the encode reads each row (MaskedAdamW.encoder_step_in_forward),
# by the matrix's storage: (the matrix, the step's tensors in PENDING_KEYS order). The entry holds the
# matrix, so its storage cannot be freed and its address given to another tensor while registered.
PENDING_KEYS = ("exp_avg", "exp_avg_sq", "grad", "grad_index", "keep", "done", "scalars")
_pending_steps: dict = {}


def set_pending_step(W: torch.Tensor, step: Optional[dict]) -> None:
    """Registers (or with None removes) the pending step of the matrix W (contiguous float32, CPU)."""
    key = W.untyped_storage().data_ptr()
    if step is None:
        _pending_steps.pop(key, None)
    else:
        _pending_steps[key] = (W, tuple(step[k] for k in PENDING_KEYS))


def _pending_args(W: torch.Tensor) -> dict:
    """The pending step's arguments for a slice of rows of a registered matrix (else none)."""
    if not _pending_steps or W.device.type != "cpu":
        return {}
    entry = _pending_steps.get(W.untyped_storage().data_ptr())
    if entry is None:
        return {}
    matrix, tensors = entry
    offset = (W.data_ptr() - matrix.data_ptr()) // (W.stride(0) * W.element_size())
    return dict(zip(("pending_" + k for k in PENDING_KEYS), tensors), pending_offset=offset)


def encode_forward(xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals, child_ptr, child_ids,
                   max_children: int, kmax: int, routed: bool, screen: bool = True):
    """See `torch_sparse.encode_forward`. `screen=False`: never the bfloat16 screen (see `screen_mode`)."""
    if W_enc.dtype == torch.float64:
        return torch_sparse.encode_forward(xc, W_enc, b_enc, edge_weight, path_mask, parent, parent_idx, parent_vals,
                                           child_ptr, child_ids, max_children, kmax, routed)
    N = xc.shape[0]
    idx = new_output((N, kmax), torch.int64, xc.device)
    scores = new_output((N, kmax), torch.float32, xc.device)
    parent_slot = new_output((N, kmax), torch.int64, xc.device)
    # bfloat16 xc with bfloat16 weights stays bfloat16: the dense GEMM then runs in bfloat16 (float32 sums).
    xc_in = xc.contiguous() if xc.dtype == W_enc.dtype == torch.bfloat16 else _f32(xc)
    _ext().encode_forward(
        xc_in, _weights(W_enc), _f32(b_enc), _f32(edge_weight), path_mask.contiguous(), parent.contiguous(),
        _contiguous(parent_idx), _f32(parent_vals), _contiguous(child_ptr), _contiguous(child_ids),
        max_children, kmax, routed, screen_mode() if screen and not routed else 0, idx,
        scores, parent_slot, **_pending_args(W_enc),
    )
    return idx, scores, parent_slot


def encode_backward(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
                    need_xc: bool, need_W_enc: bool, need_edge: bool, need_parent_vals: bool, row_grads: bool = False,
                    xc_sum: bool = False, row_sq_norms: bool = False):
    """See `torch_sparse.encode_backward`. With `row_grads`, W_enc's gradient comes as a row gradient
    (rows, values) (`common.to_row_gradient`), written directly: no (F, d) buffer of zeros. With
    `xc_sum`, the first output is g_xc summed over the tokens, (d,), from one read of each touched
    row of W_enc instead of a gathered row per kept slot. With `row_sq_norms` (and `row_grads`), the
    row gradient is (rows, values, norms): norms (R,) each row's squared norm as the update's clip
    norm computes it (`MaskedAdamW.update`, `backward_norms`); a float64 W_enc gives none."""
    if W_enc.dtype == torch.float64:
        grads = torch_sparse.encode_backward(g_scores, idx, parent_slot, xc, W_enc, edge_weight, parent_vals,
                                             need_xc, need_W_enc, need_edge, need_parent_vals)
        if row_grads and need_W_enc:
            grads = (grads[0], to_row_gradient(grads[1]), *grads[2:])
        if xc_sum and need_xc:
            grads = (grads[0].sum(0), *grads[1:])
        return grads
    F = W_enc.shape[0]
    has_parent = parent_vals is not None
    g_xc = _grad_buffer(need_xc and not xc_sum, xc.shape)
    g_xc_sum = _grad_buffer(need_xc and xc_sum, (xc.shape[1],))
    g_W = _grad_buffer(need_W_enc, W_enc.shape)
    norms = new_output((F,), torch.float32, torch.device("cpu")) if (
        row_sq_norms and row_grads and need_W_enc and W_enc.dtype == torch.float32) else None
    g_b = _grad_buffer(True, (F,))
    g_edge = _grad_buffer(has_parent and need_edge, (F,))
    g_parent = _grad_buffer(has_parent and need_parent_vals, parent_vals.shape if has_parent else None)
    rows = _ext().encode_backward(
        _f32(g_scores), idx.contiguous(), parent_slot.contiguous(), _f32(xc), _weights(W_enc), _f32(edge_weight),
        _f32(parent_vals), g_xc, g_W, g_b, g_edge, g_parent, row_grads and need_W_enc, g_xc_sum, norms,
    )
    if rows is not None:
        g_W = (rows, g_W[: rows.shape[0]]) + ((norms[: rows.shape[0]],) if norms is not None else ())
    return g_xc if g_xc_sum is None else g_xc_sum, g_W, g_b, g_edge, g_parent


def decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths: list[int], prefixes: bool):
    """See `torch_sparse.decode_forward`."""
    if W_dec.dtype == torch.float64:
        return torch_sparse.decode_forward(idx, vals, W_dec, level_gain, b_dec, level_widths, prefixes)
    W = _weights(W_dec)
    shape = (len(level_widths), idx.shape[0], W.shape[1]) if prefixes else (idx.shape[0], W.shape[1])
    out = new_output(shape, W.dtype, W.device)
    _ext().decode_forward(idx.contiguous(), _f32(vals), W, _f32(level_gain), _f32(b_dec), list(level_widths),
                          prefixes, out)
    return out.to(W_dec.dtype)


def decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths: list[int], prefixes: bool,
                    need_vals: bool, need_W_dec: bool, need_gain: bool, row_grads: bool = False,
                    grad_active_only: bool = False, row_sq_norms: bool = False):
    """See `torch_sparse.decode_backward`; `row_grads` as in `encode_backward` (W_dec's gradient);
    `grad_active_only`: the vals gradient only where vals != 0, 0 elsewhere (those slots then cost
    nothing). `row_sq_norms`: as in `encode_backward`, norms (R, 2): plain, and projected off each
    row's W_dec row (the update's `unit_decoder` clip norm)."""
    if W_dec.dtype == torch.float64:
        grads = torch_sparse.decode_backward(g_out, idx, vals, W_dec, level_gain, level_widths, prefixes,
                                             need_vals, need_W_dec, need_gain)
        if row_grads and need_W_dec:
            grads = (grads[0], to_row_gradient(grads[1]), *grads[2:])
        return grads
    g = _f32(g_out)
    # With prefixes, level l's decode appears in P_0 .. P_l, so its gradient is the sum of theirs.
    g_levels = torch.cumsum(g, 0) if prefixes else g
    g_vals = _grad_buffer(need_vals or need_gain, idx.shape)
    g_W = _grad_buffer(need_W_dec, W_dec.shape)
    norms = new_output((W_dec.shape[0], 2), torch.float32, torch.device("cpu")) if (
        row_sq_norms and row_grads and need_W_dec and W_dec.dtype == torch.float32) else None
    g_gain = _grad_buffer(True, (len(level_widths),))
    g_b = _grad_buffer(True, (W_dec.shape[1],))
    rows = _ext().decode_backward(g, g_levels, idx.contiguous(), _f32(vals), _weights(W_dec), _f32(level_gain),
                                  list(level_widths), prefixes, g_vals, g_W, g_gain, g_b, row_grads and need_W_dec,
                                  grad_active_only, norms)
    if rows is not None:
        g_W = (rows, g_W[: rows.shape[0]]) + ((norms[: rows.shape[0]],) if norms is not None else ())
    return g_vals, g_W, g_gain, g_b
