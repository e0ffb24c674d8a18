"""One comparison helper for every backend test: run a layer's backend with poisoned outputs and
compare forward and every gradient with the float64 reference evaluated on the same selection."""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.backends import available_backends
from hsae_fast.backends.common import poisoned_outputs
from hsae_fast.reference import reference_forward, select_level

CPP_OK, CPP_WHY = available_backends()["cpp"]
needs_cpp = pytest.mark.skipif(not CPP_OK, reason=f"cpp backend unavailable: {CPP_WHY}")

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "edge_weight", "level_gain")

# Tolerances relative to each compared tensor's largest magnitude. float32 accumulates in float32;
# 16-bit inputs round x - b_dec and the weights to 8 (bf16) or 11 (fp16) bits before the GEMM.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# How far (in float64 score units, relative to the scores' scale) a backend's selection may stray
# from the exact one: only where two scores are this close may it choose differently.
SELECTION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def case_seed(*parts) -> int:
    """Fresh data per case, reproducible: override the base with HSAE_TEST_SEED to draw new inputs."""
    base = int(os.environ.get("HSAE_TEST_SEED", "0"))
    return (zlib.crc32(repr(parts).encode()) + base) % (2**31)


def usable_backends(include_torch: bool = True) -> list[str]:
    names = [name for name, (ok, _) in available_backends().items() if ok]
    return [n for n in names if include_torch or n != "torch"]


def random_layer(cfg: HSAEConfig, backend: str, dtype, seed: int, prune_frac: float = 0.15, edges: bool = True) -> HSAELayer:
    """A layer with every parameter random (untied, nonzero edges, gains off 1) and some paths pruned."""
    gen = torch.Generator().manual_seed(seed)
    layer = HSAELayer(cfg, backend=backend)
    F, d, L = cfg.dict_size, cfg.d_model, cfg.num_levels
    with torch.no_grad():
        layer.W_enc.copy_(torch.randn(F, d, generator=gen) / d**0.5 * 2)
        layer.W_dec.copy_(torch.randn(F, d, generator=gen) / d**0.5)
        layer.b_enc.copy_(torch.randn(F, generator=gen) * 0.3)
        layer.b_dec.copy_(torch.randn(d, generator=gen) * 0.2)
        layer.level_gain.copy_(0.5 + torch.rand(L, generator=gen))
        if edges:
            w = torch.randn(F, generator=gen) * 0.5
            w[layer.parent < 0] = 0
            layer.edge_weight.copy_(w)
        layer.threshold.copy_(torch.rand(L, generator=gen) * 0.5)
    layer.edge_weight.requires_grad_(True)
    if prune_frac > 0:
        n = int(prune_frac * F)
        if n:
            layer.prune(torch.randperm(F, generator=gen)[:n])
    return layer.to(dtype)


@dataclass
class BackendRun:
    x_hat: torch.Tensor
    prefixes: torch.Tensor | None
    active: list  # dense (N, F_l) bool per level
    dense_vals: list  # dense (N, F_l) activations per level, float64
    grads: dict  # name -> gradient (float64), "x" included


def tree_op_inputs(layer: HSAELayer, x: torch.Tensor, selection: str = "token") -> tuple:
    """`hsae_fast::encode_tree`'s arguments for `layer` on x, with leaf copies of the weights that
    require grad (opcheck differentiates them)."""
    cfg, plan = layer.cfg, layer.tree_plan()
    lower = range(cfg.num_levels - 1)
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    return ((x - layer.b_dec).detach().requires_grad_(True), leaf(layer.W_enc), leaf(layer.b_enc),
            leaf(layer.edge_weight), layer.path_mask, layer.threshold, list(plan.local_parent),
            [plan.children[l].child_ptr for l in lower], [plan.children[l].child_ids for l in lower],
            list(cfg.level_sizes), list(cfg.k), [cfg.kmax(l, selection) for l in range(cfg.num_levels)],
            [plan.children[l].max_children for l in lower], selection, cfg.gating == "hard", layer.backend, False)


def level_op_inputs(layer: HSAELayer, level: int, above=None, leaf_weights: bool = False) -> tuple:
    """The backend encode's arguments (after xc) for one level of `layer`: that level's rows of the
    weights and the tree, level-local ids. `above`: the level above's (local idx, vals).
    `leaf_weights`: detached copies that require grad (for opcheck), else detached views."""
    cfg, plan = layer.cfg, layer.tree_plan()
    top = level == cfg.num_levels - 1
    rows = slice(cfg.level_offsets[level], cfg.level_offsets[level] + cfg.level_sizes[level])
    W, b, e = (p.detach()[rows] for p in (layer.W_enc, layer.b_enc, layer.edge_weight))
    if leaf_weights:
        W, b, e = (t.clone().requires_grad_(True) for t in (W, b, e))
    children = None if top else plan.children[level]
    return (W, b, e, layer.path_mask[rows], plan.local_parent[level],
            None if top else above[0], None if top else above[1],
            None if top else children.child_ptr, None if top else children.child_ids,
            0 if top else children.max_children, cfg.kmax(level), not top and cfg.gating == "hard")


def densify(layer: HSAELayer, levels) -> tuple[list, list]:
    cfg = layer.cfg
    active, dense = [], []
    for l, codes in enumerate(levels):
        N = codes.idx.shape[0]
        local = codes.idx - cfg.level_offsets[l]
        assert (local >= 0).all() and (local < cfg.level_sizes[l]).all(), f"level {l}: ids outside the level"
        vals = torch.zeros(N, cfg.level_sizes[l], dtype=torch.float64, device=codes.idx.device)
        vals.scatter_add_(1, local, codes.vals.detach().double())
        assert torch.isfinite(vals).all(), f"level {l}: non-finite activation values"
        on = torch.zeros(N, cfg.level_sizes[l], dtype=torch.int64, device=codes.idx.device).scatter_add_(1, local, (codes.vals != 0).long())
        assert on.max() <= 1, f"level {l}: a feature is active twice for one token"
        active.append(on.bool())
        dense.append(vals)
    return active, dense


def upstream(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_gradient(layer: HSAELayer, name: str):
    """A parameter's gradient as a dense tensor; with `layer.row_grads`, W_enc's and W_dec's must be
    row gradients (sparse COO over strictly increasing rows, no pruned feature among them)."""
    g = getattr(layer, name).grad
    if g is None or name not in ("W_enc", "W_dec") or not layer.row_grads:
        return g
    assert g.layout == torch.sparse_coo and g.sparse_dim() == 1 and g.dense_dim() == 1, f"{name}: not a row gradient"
    rows = g._indices()[0]
    assert (rows[1:] > rows[:-1]).all(), f"{name}: row gradient rows not strictly increasing"
    assert layer.path_mask[rows].all(), f"{name}: a pruned feature's row is in the row gradient"
    assert torch.isfinite(g._values()).all(), f"gradient of {name} is not finite (an unwritten output?)"
    return g.to_dense()


def run_backend(layer: HSAELayer, x: torch.Tensor, selection: str, prefixes: bool, seed: int,
                x_grad: bool = True) -> BackendRun:
    """`x_grad=False`: x takes no gradient (training on stored activations), so b_dec's gradient
    through the encoder comes out of the encode op as one sum (ops/encode.py)."""
    x = x.detach().clone().requires_grad_(x_grad)
    for p in layer.parameters():
        p.grad = None
    with poisoned_outputs():
        out = layer(x, selection=selection, return_prefixes=prefixes)
        target = out.prefixes if prefixes else out.x_hat
        loss = (target.double() * upstream(target.shape, seed).to(target.device)).sum()
        loss.backward()
    active, dense = densify(layer, out.levels)
    grads = {name: dense_gradient(layer, name) for name in PARAM_NAMES}
    if x_grad:
        grads["x"] = x.grad
    for name, g in grads.items():
        assert g is not None, f"no gradient reached {name}"
        assert torch.isfinite(g).all(), f"gradient of {name} is not finite (an unwritten output?)"
    return BackendRun(out.x_hat.detach(), out.prefixes.detach() if prefixes else None, active, dense,
                      {k: v.double() for k, v in grads.items()})


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, scale: float = 0.0) -> None:
    """|actual - expected| <= tol * max(max|expected|, scale) elementwise; the message says where they differ."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, scale, 1e-6)
    err = (actual - expected).abs()
    if not (err <= tol * scale).all() or not torch.isfinite(actual).all():
        where = torch.nonzero(~(err <= tol * scale))[0].tolist()
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e} > {tol:.1e} * scale {scale:.3e}; first at {where}: "
            f"got {actual[tuple(where)].item():.6g}, expected {expected[tuple(where)].item():.6g}"
        )


def check_selection(layer, ref, run: BackendRun, selection: str, tol: float) -> None:
    """The backend's active sets equal the exact float64 selection, except where scores tie within tol."""
    cfg = layer.cfg
    for l in range(cfg.num_levels):
        s, cand = ref.scores[l].detach(), ref.candidates[l]
        got = run.active[l]
        assert not (got & ~cand).any(), f"level {l}: a non-candidate (pruned or orphan) feature is active"
        kept = select_level(s, cand, cfg.k[l], cfg.kmax(l, selection), selection, float(layer.threshold[l]))
        want = kept & (s > 0)
        diff = got ^ want
        if not diff.any():
            continue
        scale = max(s[cand].abs().max().item(), 1e-6) if cand.any() else 1.0
        masked = s.masked_fill(~cand, float("-inf"))
        kmax = cfg.kmax(l, selection)
        row_cut = masked.topk(kmax, dim=1).values[:, -1:]
        pool = masked.masked_fill(~kept, float("-inf")).flatten()
        batch_cut = pool.topk(min(cfg.k[l] * s.shape[0], pool.numel())).values[-1]
        near = (s.abs() <= tol * scale) | ((s - row_cut).abs() <= tol * scale) | ((s - batch_cut).abs() <= tol * scale)
        near |= (s - float(layer.threshold[l])).abs() <= tol * scale
        bad = diff & ~near
        assert not bad.any(), (
            f"level {l}: backend selection differs from the exact one at {torch.nonzero(bad)[:5].tolist()} "
            f"(scores {s[bad][:5].tolist()}), not a near-tie"
        )


def assert_close_to_reference(layer: HSAELayer, x: torch.Tensor, selection: str, prefixes: bool = False, seed: int = 0,
                              x_grad: bool = True):
    """Run `layer` (its backend, its dtype) with poisoned outputs and check forward, selection and
    every gradient against the float64 reference evaluated on the backend's own active sets
    (`x_grad` as in `run_backend`)."""
    run = run_backend(layer, x, selection, prefixes, seed, x_grad)
    dtype = layer.W_enc.dtype
    tol = TOLERANCE[dtype]
    params = {n: getattr(layer, n).detach().double().requires_grad_(True) for n in PARAM_NAMES}
    x64 = x.detach().double().requires_grad_(True)
    args = (x64, params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], params["edge_weight"],
            params["level_gain"], layer.threshold.double(), layer.parent, layer.path_mask, layer.cfg)
    forced = reference_forward(*args, selection=selection, active=run.active)
    check_selection(layer, forced, run, selection, SELECTION_TOLERANCE[dtype])
    for l in range(layer.cfg.num_levels):
        assert_close(f"level {l} activations", run.dense_vals[l], forced.acts[l], tol)
    assert_close("x_hat", run.x_hat, forced.x_hat, tol)
    if prefixes:
        L = layer.cfg.num_levels
        stack = torch.stack([params["b_dec"] + sum(params["level_gain"][j] * forced.level_decodes[j] for j in range(m, L))
                             for m in range(L)])
        assert_close("prefixes", run.prefixes, stack, tol)
        target = stack
    else:
        target = forced.x_hat
    (target * upstream(target.shape, seed).to(target.device)).sum().backward()
    expected = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    expected["x"] = x64.grad
    low_precision = dtype in (torch.float16, torch.bfloat16)
    for name, g in expected.items():
        if name not in run.grads:  # x, where it took no gradient
            continue
        # grad b_dec = sum_n (g_xhat - g_xc): a sum of N terms as large as grad x, which cancel;
        # 16-bit rounding of each term is measured against their size, not the small result.
        scale = expected["x"].abs().max().item() if name == "b_dec" and low_precision else 0.0
        assert_close(f"grad {name}", run.grads[name], g, tol * (4 if low_precision else 1), scale)
    # Pruned features never change: exactly zero in every per-feature gradient.
    pruned = ~layer.path_mask
    for name in ("W_enc", "b_enc", "W_dec", "edge_weight"):
        assert (run.grads[name][pruned] == 0).all(), f"grad {name} is nonzero on a pruned feature"
    return run
