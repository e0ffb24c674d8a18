"""Every usable backend against the float64 reference: forward, selection and every gradient,
float32 / bfloat16 / float16, awkward shapes, pruned paths, nonzero edges, poisoned outputs."""
import pytest
import torch

from cases import CASES, make_config
from helpers import assert_close_to_reference, random_layer, case_seed, usable_backends
from hsae_fast.backends import get_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


SELECTIONS = ["batch", "token", "threshold"]

# The Triton interpreter is about 100x slower than eager PyTorch, so backend "triton" runs a covering
# subset: every case in float32 with batch selection, and each selection, dtype and special shape
# again in other combinations. On CUDA, tests/test_triton_kernels.py runs the full product.
TRITON_INTERPRETER_SUBSET = {(case, torch.float32, "batch") for case in CASES} | {
    ("flat", torch.float32, "token"),
    ("four_level", torch.bfloat16, "token"),
    ("custom_parent", torch.float16, "token"),
    ("three_level", torch.float16, "threshold"),
    ("no_gating", torch.bfloat16, "threshold"),
    ("one_token", torch.float32, "threshold"),
    ("three_level", torch.bfloat16, "batch"),
    ("d1", torch.bfloat16, "batch"),
    ("k_equals_F", torch.bfloat16, "token"),
    ("four_level", torch.float16, "batch"),
    ("one_child_parents", torch.float16, "threshold"),
}


def runs_on_cpu(backend: str) -> bool:
    """The triton backend needs TRITON_INTERPRET=1 for CPU tensors; on a GPU run without it, its
    CUDA product in tests/test_triton_kernels.py stands in."""
    return getattr(get_backend(backend), "supports", lambda _device: True)(torch.device("cpu"))


def backend_cases():
    for backend in filter(runs_on_cpu, usable_backends()):
        for dtype in DTYPES:
            for case in CASES:
                for selection in SELECTIONS:
                    if backend == "triton" and (case, dtype, selection) not in TRITON_INTERPRETER_SUBSET:
                        continue
                    yield pytest.param(backend, dtype, case, selection, id=f"{selection}-{case}-{dtype}-{backend}")


@pytest.mark.parametrize("backend, dtype, case, selection", list(backend_cases()))
def test_backend_matches_reference(backend, dtype, case, selection):
    cfg, N = make_config(case, selection)
    seed = case_seed(backend, dtype, case, selection)
    layer = random_layer(cfg, backend, dtype, seed)
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    assert_close_to_reference(layer, x, selection, prefixes=(case in ("three_level", "four_level", "flat")), seed=seed)


def x_without_grad_cases():
    for backend in filter(runs_on_cpu, usable_backends()):
        for dtype in DTYPES if backend != "triton" else [torch.float32]:
            for case in ("three_level", "one_token", "custom_parent", "four_level", "flat"):
                if backend == "triton" and case not in ("three_level", "one_token"):
                    continue
                yield pytest.param(backend, dtype, case, id=f"{case}-{dtype}-{backend}")


@pytest.mark.parametrize("backend, dtype, case", list(x_without_grad_cases()))
def test_b_dec_gradient_when_x_takes_none(backend, dtype, case):
    """x without a gradient (stored activations, as in training): b_dec's gradient through the encoder
    comes out of the encode op as one sum over the touched rows of W_enc (cpp) or over tokens (others)."""
    cfg, N = make_config(case, "batch")
    seed = case_seed(backend, dtype, case, "batch") + 7
    layer = random_layer(cfg, backend, dtype, seed)
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    assert_close_to_reference(layer, x, "batch", seed=seed, x_grad=False)


@pytest.mark.parametrize("backend", usable_backends())
def test_float64_exact(backend):
    """float64 end to end: agreement to 1e-10, so a formula slip cannot hide in float32 noise."""
    cfg, N = make_config("three_level", "batch")
    layer = random_layer(cfg, backend, torch.float64, 3)
    x = torch.randn(N, cfg.d_model, dtype=torch.float64)
    if backend != "torch":
        pytest.skip("float64 is the torch backend's exactness check")
    assert_close_to_reference(layer, x, "batch", prefixes=True, seed=3)
