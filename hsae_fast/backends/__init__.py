"""Backend dispatch: which implementations of the encode/decode ops exist, and which one to use.

A backend is one module exposing `NAME`, `available() -> (bool, reason)`, `supports(device) -> bool`
(optional; default: every device) and the four ops of `torch_sparse.py`: `encode_forward`,
`encode_backward`, `decode_forward`, `decode_backward`, with the same signatures and semantics.
Plugging in a backend is one module and one line in `_MODULES`.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

_MODULES = {
    "torch": "hsae_fast.backends.torch_sparse",
    "cpp": "hsae_fast.backends.cpp",
    "triton": "hsae_fast.backends.triton",
}
# How a user gets a backend that is not usable here.
_HOW_TO = {
    "torch": "it ships with hsae_fast",
    "cpp": "install a C++ compiler and reinstall with `pip install -e .` (or set HSAE_CPP_JIT=1 to build on import)",
    "triton": "install triton (`pip install triton==3.9.0`) and use a CUDA device, or set TRITON_INTERPRET=1 for CPU tensors",
}
BACKEND_NAMES = tuple(_MODULES)
_cache: dict[str, tuple[ModuleType | None, bool, str]] = {}
_warned_fallback: set[str] = set()


def _load(name: str):
    if name not in _cache:
        try:
            module = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an unbuildable backend must never break the package
            _cache[name] = (None, False, f"import failed: {type(exc).__name__}: {exc}")
        else:
            ok, reason = module.available()
            _cache[name] = (module, ok, reason)
    return _cache[name]


def available_backends() -> dict[str, tuple[bool, str]]:
    """{name: (usable, why or why not)} for every backend this package knows."""
    return {name: _load(name)[1:] for name in BACKEND_NAMES}


def get_backend(name: str, device: torch.device | None = None) -> ModuleType:
    """The backend module `name`, or an error that says how to get it."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r}: unknown; choose 'auto' or one of {BACKEND_NAMES}")
    module, ok, reason = _load(name)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available ({reason}); to get it: {_HOW_TO[name]}")
    if device is not None and not getattr(module, "supports", lambda _d: True)(torch.device(device)):
        raise RuntimeError(f"backend {name!r} cannot run on device {device}; {_HOW_TO[name]}")
    return module


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> triton on CUDA, the C++ backend on CPU when built, else torch."""
    if name != "auto":
        get_backend(name, device)
        return name
    device = torch.device(device)
    preferred = ("triton",) if device.type == "cuda" else ("cpp",)
    for candidate in preferred:
        module, ok, reason = _load(candidate)
        if ok and getattr(module, "supports", lambda _d: True)(device):
            return candidate
        if not ok and candidate not in _warned_fallback:
            # Once per process: a stale or missing build otherwise costs a training run 10x its time
            # without a word (the torch backend computes the same function, far slower).
            _warned_fallback.add(candidate)
            warnings.warn(f"backend='auto' on {device.type}: the {candidate} backend is not available ({reason}); "
                          f"using the torch backend, which is several times slower. To get it: {_HOW_TO[candidate]}",
                          stacklevel=2)
    return "torch"
