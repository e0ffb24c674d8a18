"""The C++ CPU backend beyond the shared matrix of test_backends.py: larger shapes against the torch
backend op by op, bit-identical results run to run and across thread counts, opcheck on its ops,
and how it is built, found and replaced by the torch backend when it cannot be."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import assert_close, level_op_inputs, needs_cpp, random_layer, tree_op_inputs
from hsae_fast import HSAEConfig
from hsae_fast.backends import cpp, resolve_backend, torch_sparse
from hsae_fast.backends.common import poisoned_outputs
from hsae_fast.ops import encode_tree, sparse_decode

REPO = Path(__file__).resolve().parents[1]

# Larger than the matrix's shapes: many tiles per level, odd d, more rows than one block.
BIG = dict(d_model=67, level_sizes=(700, 230, 70), k=(24, 8, 4))
BIG_N = 300


def big_layer(dtype=torch.float32, gating="hard", selection="batch", seed=11):
    cfg = HSAEConfig(gating=gating, selection=selection, **BIG)
    return random_layer(cfg, "cpp", dtype, seed)


def level_args(layer, xc, level, above):
    """encode_forward's arguments for one level, given the level above's (local idx, vals)."""
    return (xc, *level_op_inputs(layer, level, above))


def assert_same_selection(got, want, tol):
    """Same kept (id -> score) per token, up to scores within tol of each token's cut."""
    (g_idx, g_s, g_slot), (w_idx, w_s, w_slot) = got, want
    for n in range(g_idx.shape[0]):
        g = {int(i): (float(s), int(p)) for i, s, p in zip(g_idx[n], g_s[n], g_slot[n]) if s > float("-inf")}
        w = {int(i): (float(s), int(p)) for i, s, p in zip(w_idx[n], w_s[n], w_slot[n]) if s > float("-inf")}
        assert len(g) == len(w), f"token {n}: {len(g)} candidates kept, torch keeps {len(w)}"
        cut = min((s for s, _ in w.values()), default=0.0)
        for i in g.keys() ^ w.keys():  # only near-ties at the cut may differ
            s = g.get(i, w.get(i))[0]
            assert abs(s - cut) <= tol * max(1.0, abs(cut)), f"token {n}: feature {i} (score {s}) differs, cut {cut}"
        for i in g.keys() & w.keys():
            assert abs(g[i][0] - w[i][0]) <= tol * max(1.0, abs(w[i][0])), f"token {n}, feature {i}: scores differ"
            assert g[i][1] == w[i][1], f"token {n}, feature {i}: parent slot {g[i][1]} != {w[i][1]}"


@needs_cpp
@pytest.mark.parametrize("gating", ["hard", "none"])
def test_encode_matches_torch_backend_on_big_shapes(gating):
    layer = big_layer(gating=gating)
    x = torch.randn(BIG_N, BIG["d_model"], generator=torch.Generator().manual_seed(1))
    xc = (x - layer.b_dec).detach()
    above = None
    for level in reversed(range(layer.cfg.num_levels)):
        args = level_args(layer, xc, level, above)
        got, want = cpp.encode_forward(*args), torch_sparse.encode_forward(*args)
        assert_same_selection(got, want, 1e-5)
        # Continue with the torch backend's codes so both see the same parents.
        above = (want[0], torch.where(want[1] > 0, want[1], 0.0))


@needs_cpp
@pytest.mark.parametrize("with_parents", [False, True])
def test_encode_backward_matches_torch_backend(with_parents):
    gen = torch.Generator().manual_seed(2)
    N, d, F, K, kp = BIG_N, 67, 1000, 40, 9
    idx = torch.randint(0, F, (N, K), generator=gen)
    g = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < 0.5)  # zero slots are skipped
    slot = torch.randint(-1, kp, (N, K), generator=gen) if with_parents else torch.full((N, K), -1)
    xc, W = torch.randn(N, d, generator=gen), torch.randn(F, d, generator=gen)
    edge, pvals = torch.randn(F, generator=gen), (torch.randn(N, kp, generator=gen) if with_parents else None)
    args = (g, idx, slot, xc, W, edge, pvals, True, True, with_parents, with_parents)
    for name, a, b in zip(("xc", "W_enc", "b_enc", "edge", "parent_vals"), cpp.encode_backward(*args),
                          torch_sparse.encode_backward(*args)):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(f"grad {name}", a, b, 1e-5)


@needs_cpp
@pytest.mark.parametrize("prefixes", [False, True])
def test_decode_matches_torch_backend(prefixes):
    gen = torch.Generator().manual_seed(3)
    N, d, F, widths = BIG_N, 67, 1000, [24, 8, 4]
    K = sum(widths)
    idx = torch.randint(0, F, (N, K), generator=gen)
    vals = torch.rand(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < 0.6)
    W, gain, b = torch.randn(F, d, generator=gen), torch.rand(3, generator=gen) + 0.5, torch.randn(d, generator=gen)
    fwd = (idx, vals, W, gain, b, widths, prefixes)
    assert_close("decode", cpp.decode_forward(*fwd), torch_sparse.decode_forward(*fwd), 1e-5)
    g_out = torch.randn((3, N, d) if prefixes else (N, d), generator=gen)
    bwd = (g_out, idx, vals, W, gain, widths, prefixes, True, True, True)
    want = torch_sparse.decode_backward(*bwd)
    for name, a, b in zip(("vals", "W_dec", "level_gain", "b_dec"), cpp.decode_backward(*bwd), want):
        assert_close(f"grad {name}", a, b, 1e-5)
    # Only the active slots' value gradients (0 at the others), and the W_dec gradient as its rows:
    # the other gradients as before, under poisoned outputs.
    with poisoned_outputs():
        g_vals, (rows, values), g_gain, g_b = cpp.decode_backward(*bwd, row_grads=True, grad_active_only=True)
    assert_close("grad vals, active only", g_vals, want[0].masked_fill(vals == 0, 0), 1e-5)
    assert torch.equal(rows, torch.unique(idx[vals != 0]))
    assert_close("grad W_dec rows", values, want[1][rows], 1e-5)
    assert_close("grad level_gain", g_gain, want[2], 1e-5)
    assert_close("grad b_dec", g_b, want[3], 1e-5)


def _step(layer, x):
    for p in layer.parameters():
        p.grad = None
    out = layer(x, return_prefixes=True)
    (out.prefixes.float() ** 2).sum().backward()
    return [out.prefixes.detach()] + [c.idx for c in out.levels] + [c.vals for c in out.levels] + \
        [p.grad.clone() for p in layer.parameters() if p.grad is not None]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gating", ["hard", "none"])
def test_bit_identical_run_to_run_and_across_thread_counts(dtype, gating):
    layer = big_layer(dtype, gating=gating)
    x = torch.randn(BIG_N, BIG["d_model"], generator=torch.Generator().manual_seed(4)).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        first, second = _step(layer, x), _step(layer, x)
        torch.set_num_threads(1)
        single = _step(layer, x)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b), "two runs with the same threads differ"
        assert torch.equal(a, c), "one thread and several threads differ"


@needs_cpp
def test_opcheck_routed_and_backward_ops():
    layer = big_layer(selection="token", seed=5)
    x = torch.randn(40, BIG["d_model"], generator=torch.Generator().manual_seed(5))
    args = tree_op_inputs(layer, x)
    torch.library.opcheck(encode_tree, args)
    vals, _scores, idx, slot = encode_tree(*args)
    xc, W, _b, edge = args[:4]
    torch.library.opcheck(torch.ops.hsae_fast.encode_tree_backward.default, (
        torch.randn_like(vals), idx, vals.detach(), slot, xc.detach(), W.detach(), edge.detach(), args[11],
        True, True, True, "cpp", False))
    torch.library.opcheck(torch.ops.hsae_fast.encode_tree_backward.default, (
        torch.randn_like(vals), idx, vals.detach(), slot, xc.detach(), W.detach(), edge.detach(), args[11],
        True, True, True, "cpp", True))
    # The two upper levels decoded with prefixes: their slots side by side, bottom first.
    upper = slice(args[11][0], None)
    all_idx, all_vals = idx[:, upper], torch.rand_like(vals[:, upper])
    widths, gain = args[11][1:], layer.level_gain.detach()[1:].clone()
    torch.library.opcheck(sparse_decode, (all_idx, all_vals.requires_grad_(True), layer.W_dec,
                                          gain.requires_grad_(True), layer.b_dec, widths, True, "cpp", False, True))
    torch.library.opcheck(torch.ops.hsae_fast.sparse_decode_backward.default, (
        torch.randn(2, 40, BIG["d_model"]), all_idx, all_vals.detach(), layer.W_dec.detach(), gain.detach(),
        widths, True, True, True, True, "cpp", False, False))
    torch.library.opcheck(torch.ops.hsae_fast.sparse_decode_backward.default, (
        torch.randn(2, 40, BIG["d_model"]), all_idx, all_vals.detach(), layer.W_dec.detach(), gain.detach(),
        widths, True, True, True, True, "cpp", True, True))


@needs_cpp
def test_float64_runs_the_torch_backend_functions():
    gen = torch.Generator().manual_seed(6)
    idx, vals = torch.randint(0, 50, (7, 5), generator=gen), torch.rand(7, 5, dtype=torch.float64, generator=gen)
    W = torch.randn(50, 9, dtype=torch.float64, generator=gen)
    args = (idx, vals, W, torch.ones(1, dtype=torch.float64), torch.zeros(9, dtype=torch.float64), [5], False)
    assert torch.equal(cpp.decode_forward(*args), torch_sparse.decode_forward(*args))


@needs_cpp
def test_auto_picks_cpp_on_cpu_only():
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert not cpp.supports(torch.device("cuda"))


def _run_python(code: str, **env) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _cpp_status_with_module(install_module: str) -> tuple[str, str, str]:
    """(available, what auto picks on CPU, the reason) in a fresh process whose `hsae_fast._hsae_cpu`
    is what `install_module` puts in sys.modules, with no JIT."""
    out = _run_python(
        "import sys, types\n" + install_module + "\n"
        "import torch, hsae_fast\n"
        "from hsae_fast.backends import resolve_backend\n"
        "ok, why = hsae_fast.available_backends()['cpp']\n"
        "print(ok, resolve_backend('auto', torch.device('cpu')), why)",
        HSAE_CPP_JIT="0",
    )
    return tuple(out.split(" ", 2))


def test_without_a_build_auto_falls_back_to_torch_and_says_why():
    """No built module and no JIT (what a machine without a compiler gets after `pip install`)."""
    ok, picked, why = _cpp_status_with_module("sys.modules['hsae_fast._hsae_cpu'] = None")  # the import fails
    assert (ok, picked) == ("False", "torch")
    assert "not built" in why


def test_a_stale_build_is_not_used_and_says_how_to_rebuild():
    """A module built from older sources (pulled without reinstalling) lacks newer entry points: the
    backend reports itself unavailable, so auto falls back to torch instead of failing mid-step."""
    ok, picked, why = _cpp_status_with_module(
        "stale = types.ModuleType('hsae_fast._hsae_cpu')\n"
        "stale.encode_forward = stale.encode_backward = stale.decode_forward = stale.decode_backward = print\n"
        "sys.modules['hsae_fast._hsae_cpu'] = stale")
    assert (ok, picked) == ("False", "torch")
    assert "older than the sources" in why and "pooled_gradient" in why and "pip install" in why


def test_auto_says_when_it_falls_back_to_torch(monkeypatch):
    """A stale or missing build must not slow a training run 10x in silence: auto warns, once."""
    import hsae_fast.backends as backends

    monkeypatch.setitem(backends._cache, "cpp", (None, False, "hsae_fast._hsae_cpu is older than the sources"))
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(UserWarning, match="the cpp backend is not available .*older than the sources.*pip install"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_setup_py_declares_the_extension_and_survives_a_failed_build():
    """setup.py builds hsae_fast._hsae_cpu from csrc/ with the same sources and flags as the JIT path,
    and a compiler failure leaves the install going (the backend then reports itself unavailable)."""
    out = _run_python(
        "import runpy, sys; sys.argv = ['setup.py', '--name']\n"
        "import setuptools; captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
        "ext = captured['ext_modules'][0]\n"
        "build = captured['cmdclass']['build_ext']\n"
        "print(ext.name, ' '.join(ext.sources), build.__name__)",
    )
    name, *sources, build_cls = out.split()
    assert name == "hsae_fast._hsae_cpu"
    assert sources == ["csrc/hsae_cpu.cpp", "csrc/adamw_rows.cpp", "csrc/bindings.cpp"]
    assert build_cls == "OptionalBuildExtension"


@needs_cpp
def test_pooled_weight_gradients_are_reused_and_fully_written():
    """Weight gradients of 4 MB or more come from a pool of freed ones, so a reused buffer still holds
    the last step's values: the kernels must write every element (poisoned: NaN first) and a step's
    gradients must not depend on whether its buffers were reused."""
    cfg = HSAEConfig(d_model=512, level_sizes=(2048, 256, 32), k=(8, 4, 2), selection="token")
    layer = random_layer(cfg, "cpp", torch.float32, seed=7)
    assert cfg.dict_size * cfg.d_model * 4 >= cpp._POOL_MIN_BYTES
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(7))
    cpp.release_gradient_pool()
    steps = []
    for _ in range(3):
        with poisoned_outputs():
            layer(x).x_hat.pow(2).sum().backward()
        steps.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
        for p in layer.parameters():
            p.grad = None
        assert cpp.gradient_pool_bytes() >= 2 * cfg.dict_size * cfg.d_model * 4, "W_enc's and W_dec's went back"
    for name, g in steps[0].items():
        assert torch.isfinite(g).all(), f"{name}: an unwritten (poisoned) element"
        assert torch.equal(g, steps[1][name]) and torch.equal(g, steps[2][name]), f"{name} changed on reuse"
    twin = random_layer(cfg, "torch", torch.float32, seed=7)
    twin(x).x_hat.pow(2).sum().backward()
    for name, p in twin.named_parameters():
        if p.grad is not None:
            assert_close(f"grad {name}", steps[0][name], p.grad, 1e-4)
    cpp.release_gradient_pool()
    assert cpp.gradient_pool_bytes() == 0
