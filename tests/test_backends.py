"""Every usable backend against the float64 reference: forward, selection and every gradient,
float32 / bfloat16 / float16, awkward shapes, pruned paths, nonzero edges, poisoned outputs."""
import pytest
import torch

from cases import CASES, make_config
from helpers import assert_close_to_reference, random_layer, case_seed, usable_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("selection", ["batch", "token", "threshold"])
def test_backend_matches_reference(backend, dtype, case, selection):
    cfg, N = make_config(case, selection)
    seed = case_seed(backend, dtype, case, selection)
    layer = random_layer(cfg, backend, dtype, seed)
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    assert_close_to_reference(layer, x, selection, prefixes=(case in ("three_level", "four_level", "flat")), seed=seed)


@pytest.mark.parametrize("backend", usable_backends())
def test_float64_exact(backend):
    """float64 end to end: agreement to 1e-10, so a formula slip cannot hide in float32 noise."""
    cfg, N = make_config("three_level", "batch")
    layer = random_layer(cfg, backend, torch.float64, 3)
    x = torch.randn(N, cfg.d_model, dtype=torch.float64)
    if backend != "torch":
        pytest.skip("float64 is the torch backend's exactness check")
    assert_close_to_reference(layer, x, "batch", prefixes=True, seed=3)
