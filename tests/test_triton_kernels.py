"""Kernel-level checks of the Triton backend (kernels/): tile-breaking shapes against the torch
backend's ops, the deterministic scatter, O(N*K) memory, and on CUDA the full backend product.

Under TRITON_INTERPRET=1 (set by conftest) the kernels run on CPU tensors; shapes stay tiny."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cases import CASES, make_config
from helpers import assert_close, assert_close_to_reference, case_seed, random_layer
from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.backends import available_backends
from hsae_fast.backends import torch_sparse
from hsae_fast.backends.common import poisoned_outputs
from hsae_fast.functional import LevelCodes
from hsae_fast.layer import HSAEOutput
from hsae_fast.tree import TreePlan, default_parent, subtree_mask

triton_ok, why = available_backends()["triton"]
pytestmark = pytest.mark.skipif(not triton_ok, reason=f"triton backend unavailable: {why}")

if triton_ok:
    import kernels
    import kernels.encode_dense as encode_dense_module
    from hsae_fast.backends import triton as triton_backend

# Compiled kernels on a GPU when TRITON_INTERPRET is 0 (bench/gpu_run.sh); else the interpreter on CPU.
ON_GPU = triton_ok and torch.cuda.is_available() and not kernels.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def _gen(*parts):
    return torch.Generator().manual_seed(case_seed("triton-kernels", *parts))


def _dev(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_same_codes(got, want, dtype):
    """Same ids, parent slots and scores per row, in any order; slots without a candidate padded as the contract says."""
    (g_idx, g_s, g_slot), (w_idx, w_s, w_slot) = [[t.cpu() for t in triple] for triple in (got, want)]
    assert g_idx.dtype == torch.int64 and g_slot.dtype == torch.int64
    g_empty, w_empty = g_s == float("-inf"), w_s == float("-inf")
    assert torch.equal(g_empty.sum(1), w_empty.sum(1)), "a row has a different number of candidates"
    assert (g_idx[g_empty] == 0).all() and (g_slot[g_empty] == -1).all(), "empty slots: id 0, slot -1"
    # Order within a row is free: compare rows sorted by id, empty slots last.
    big = torch.iinfo(torch.int64).max
    g_order = g_idx.masked_fill(g_empty, big).argsort(dim=1, stable=True)
    w_order = w_idx.masked_fill(w_empty, big).argsort(dim=1, stable=True)
    live = ~w_empty.gather(1, w_order)
    for name, g, w in (("idx", g_idx, w_idx), ("parent_slot", g_slot, w_slot), ("scores", g_s, w_s)):
        g, w = g.gather(1, g_order)[live], w.gather(1, w_order)[live]
        if name == "scores":
            assert_close(name, g, w, TOL[dtype])
        else:
            assert torch.equal(g, w), f"{name} differs"


# ---------------------------------------------------------------------------------------- dense encode
DENSE_SHAPES = {  # name -> N, d, level size, kmax  (blocks are 32 rows x 32 features x 16 of d)
    "tile_breaking": (70, 19, 45, 6),
    "d1": (33, 1, 40, 3),
    "one_token_k_equals_F": (1, 5, 9, 9),
    "kmax_over_live": (5, 7, 6, 8),
}
TUNED_TILE_SHAPE = (70, 70, 150, 6)  # d, F and N off every autotuned tile's blocks


# The fused kernel, and the vendor GEMM + torch.topk (HSAE_DENSE_ENCODE=gemm; parent codes always take the kernel).
@pytest.mark.parametrize("with_parent, impl", [(False, "fused"), (False, "gemm"), (True, "fused")])
@pytest.mark.parametrize("dtype, chunks", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 3),
                                           (torch.float64, 1)], ids=str)
@pytest.mark.parametrize("shape", list(DENSE_SHAPES))
def test_dense_encode_matches_torch(shape, dtype, with_parent, impl, chunks, monkeypatch):
    _check_dense_encode(shape, DENSE_SHAPES[shape], dtype, with_parent, impl, chunks, monkeypatch)


def _check_dense_encode(name, shape, dtype, with_parent, impl, chunks, monkeypatch):
    """The triton dense encode against the torch backend's, with outputs poisoned first."""
    N, d, size, kmax = shape
    gen = _gen("dense", name, dtype, with_parent, chunks)
    monkeypatch.setenv("HSAE_DENSE_ENCODE", impl)
    # chunks: feature chunks of the fused kernel, rows per block of the GEMM
    monkeypatch.setattr(encode_dense_module, "_num_chunks", lambda *_: chunks)
    monkeypatch.setattr(encode_dense_module, "GEMM_BLOCK_SCORES", chunks * size)
    parents = 4  # the level's features hang under 4 parents (local ids of the level above)
    xc, W = torch.randn(N, d, generator=gen).to(dtype), torch.randn(size, d, generator=gen).to(dtype)
    b, edge = torch.randn(size, generator=gen).to(dtype), torch.randn(size, generator=gen).to(dtype)
    mask = torch.rand(size, generator=gen) > 0.25
    parent = torch.randint(0, parents, (size,), generator=gen)
    p_idx = p_vals = None
    if with_parent:
        p_idx = torch.stack([torch.randperm(parents, generator=gen)[:3] for _ in range(N)])
        p_vals = (torch.rand(N, 3, generator=gen) * (torch.rand(N, 3, generator=gen) > 0.3)).to(torch.float32)
    args = _dev(xc, W, b, edge, mask, parent, p_idx, p_vals)
    with poisoned_outputs():
        got = triton_backend.encode_forward(*args, None, None, 0, kmax, False)
    # The torch backend finds a child's parent activation through the child lists.
    children = torch.arange(size)[mask]
    local_parent = parent[children]
    counts = torch.bincount(local_parent, minlength=parents)
    child_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    child_ids = children[torch.sort(local_parent, stable=True).indices]
    want = torch_sparse.encode_forward(xc, W, b, edge, mask, parent, p_idx, p_vals, child_ptr, child_ids,
                                       int(counts.max()), kmax, False)
    _assert_same_codes(got, want, dtype)


def _dense_tiles():
    """The GPU autotuner's dense-encode tiles, one per shape (stages do not change the result)."""
    seen = {}
    for c in encode_dense_module._gpu_configs() if triton_ok else []:
        seen.setdefault((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_F"], c.kwargs["BLOCK_D"], c.num_warps), c)
    return list(seen.values())


@pytest.mark.parametrize("with_parent", [False, True])
@pytest.mark.parametrize("config", _dense_tiles(),
                         ids=lambda c: "N{BLOCK_N}-F{BLOCK_F}-D{BLOCK_D}".format(**c.kwargs) + f"-w{c.num_warps}")
def test_dense_encode_every_tuned_tile(config, with_parent, monkeypatch):
    """The autotuned dense encode runs only at N * F >= 2^24, which no other test reaches: each of its
    tiles here, on a shape that breaks it, through the same comparison as the fixed tile."""
    blocks = dict(config.kwargs)
    if ON_GPU:
        blocks.update(num_warps=config.num_warps, num_stages=config.num_stages)
    monkeypatch.setattr(encode_dense_module, "_FIXED_BLOCKS", blocks)
    _check_dense_encode("tuned_tile", TUNED_TILE_SHAPE, torch.float32, with_parent, "fused", 2, monkeypatch)


def test_auxk_candidates_from_the_dense_encode():
    """Issue 4's AuxK output: the dense encode over the whole dictionary with the dead mask as the
    path mask returns the top k_aux scores among dead features (softplus is monotone) in O(N * k_aux)."""
    gen = _gen("auxk")
    N, d, F, k_aux = 21, 9, 70, 5
    xc, W, b = torch.randn(N, d, generator=gen), torch.randn(F, d, generator=gen), torch.randn(F, generator=gen)
    dead = torch.rand(F, generator=gen) < 0.3
    idx, scores, _ = triton_backend.encode_forward(*_dev(xc, W, b, b, dead, None), None, None, None, None, 0, k_aux, False)
    dense = (xc @ W.T + b).masked_fill(~dead, float("-inf"))
    want = dense.topk(k_aux, dim=1)
    assert torch.equal(idx.cpu().sort(dim=1).values, want.indices.sort(dim=1).values)
    assert_close("auxk scores", scores.cpu().sort(dim=1).values, want.values.sort(dim=1).values, 1e-5)


def test_dense_encode_errors_name_the_problem(monkeypatch):
    xc, W = _dev(torch.randn(2, 3), torch.randn(4, 3))
    b, mask = _dev(torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype torch.int32 is not supported"):
        triton_backend.encode_forward(xc.int(), W.int(), b, b, mask, None, None, None, None, None, 0, 2, False)
    p_idx, p_vals = _dev(torch.zeros(2, 300, dtype=torch.int64), torch.zeros(2, 300))
    monkeypatch.setenv("HSAE_DENSE_ENCODE", "gemm")
    with pytest.raises(TypeError, match="dtype torch.int32 is not supported"):
        triton_backend.encode_forward(xc.int(), W.int(), b, b, mask, None, None, None, None, None, 0, 2, False)
    monkeypatch.setenv("HSAE_DENSE_ENCODE", "gpu")
    with pytest.raises(ValueError, match="HSAE_DENSE_ENCODE='gpu': expected auto, gemm or fused"):
        kernels.encode_dense.encode_dense(xc, W, b, mask, 2)
    monkeypatch.setenv("HSAE_DENSE_ENCODE", "auto")
    with pytest.raises(ValueError, match="level_size=5000000 with 9 parent-slot bits"):
        kernels.encode_dense.encode_dense(xc, W[:1].expand(5_000_000, 3), b, mask, 2, b, b, p_idx, p_vals)


# --------------------------------------------------------------------------------------- routed encode
def _routed_case(N, d, sizes, dtype, gen, kp, custom_parent):
    """A two-level tree (children, parents) with pruned children and one childless parent."""
    cfg = HSAEConfig(d_model=d, level_sizes=sizes, k=(1, 1))
    parent = default_parent(cfg)
    if custom_parent:
        parent[: sizes[0]] = parent[: sizes[0]][torch.randperm(sizes[0], generator=gen)]
    F = sum(sizes)
    pruned = subtree_mask(parent, torch.randperm(sizes[0], generator=gen)[: sizes[0] // 6])
    pruned[: sizes[0]] |= parent[: sizes[0]] == sizes[0]  # parent 0 loses every child
    plan = TreePlan.build(cfg, parent, ~pruned)
    lists = plan.children[0]
    p_idx = torch.stack([torch.randperm(sizes[1], generator=gen)[:kp] for _ in range(N)])  # local ids
    p_vals = torch.rand(N, kp, generator=gen) * (torch.rand(N, kp, generator=gen) > 0.25)
    n0 = sizes[0]  # the encode sees the child level's rows only
    tensors = (torch.randn(N, d, generator=gen).to(dtype), torch.randn(F, d, generator=gen).to(dtype)[:n0],
               torch.randn(F, generator=gen).to(dtype)[:n0], torch.randn(F, generator=gen).to(dtype)[:n0],
               (~pruned)[:n0], plan.local_parent[0], p_idx, p_vals.to(torch.float32), lists.child_ptr, lists.child_ids)
    return tensors, lists.max_children


ROUTED_SHAPES = {  # name -> N, d, (children, parents), kp, kmax
    # 40 tokens over 4 parents: more pairs per parent than a 16-token block; ~20 children per parent
    # is more than a 16-wide child tile
    "multi_block": (40, 19, (80, 4), 2, 7),
    "d1_one_token": (1, 1, (12, 6), 3, 5),
    "kmax_over_candidates": (9, 6, (10, 5), 2, 12),
}


@pytest.mark.parametrize("custom_parent", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", list(ROUTED_SHAPES))
def test_routed_encode_matches_torch(shape, dtype, custom_parent):
    N, d, sizes, kp, kmax = ROUTED_SHAPES[shape]
    tensors, C = _routed_case(N, d, sizes, dtype, _gen("routed", shape, dtype, custom_parent), kp, custom_parent)
    with poisoned_outputs():
        got = triton_backend.encode_forward(*_dev(*tensors), C, kmax, True)
    want = torch_sparse.encode_forward(*tensors, C, kmax, True)
    _assert_same_codes(got, want, dtype)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every routed test runs these blocks")
def test_routed_encode_with_the_gpu_blocks(monkeypatch):
    """The GPU's tile (64 tokens, 64 children, 32 of d) under the interpreter, on a shape it breaks:
    more pairs per parent than one block, more children than one tile, d across two steps."""
    import kernels.encode_routed as routed
    blocks = {key: value for key, value in routed._GPU_BLOCKS.items() if key.startswith("BLOCK")}
    monkeypatch.setattr(routed, "_INTERPRETER_BLOCKS", blocks)
    monkeypatch.setattr(routed, "_MAX_BLOCK_C", 64)
    N, d, sizes, kp, kmax = 150, 45, (200, 2), 2, 9
    tensors, C = _routed_case(N, d, sizes, torch.float32, _gen("routed-gpu-blocks"), kp, False)
    assert C > 64 and N * kp > 2 * blocks["BLOCK_T"], "the shape must break the tile"
    with poisoned_outputs():
        got = triton_backend.encode_forward(*_dev(*tensors), C, kmax, True)
    _assert_same_codes(got, torch_sparse.encode_forward(*tensors, C, kmax, True), torch.float32)


def test_routed_encode_with_every_candidate_pruned():
    tensors, _ = _routed_case(4, 3, (8, 4), torch.float32, _gen("all_pruned"), 2, False)
    xc, W, b, edge, _mask, parent, p_idx, p_vals, _ptr, _ids = tensors
    empty_ptr, no_children = torch.zeros(5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    with poisoned_outputs():
        idx, scores, slot = triton_backend.encode_forward(
            *_dev(xc, W, b, edge, torch.zeros(8, dtype=torch.bool), parent, p_idx, p_vals, empty_ptr, no_children),
            0, 3, True)
    assert (scores.cpu() == float("-inf")).all() and (idx.cpu() == 0).all() and (slot.cpu() == -1).all()


# -------------------------------------------------------------------------------- decode and backwards
def _sparse_codes(N, K, F, gen, dtype):
    idx = torch.stack([torch.randperm(F, generator=gen)[:K] for _ in range(N)])
    vals = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) > 0.2)
    return idx, vals.to(torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype, deterministic", [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False), (torch.float64, True)], ids=str)
@pytest.mark.parametrize("prefixes", [False, True])
@pytest.mark.parametrize("N, d, widths", [(19, 70, [5, 3, 2]), (1, 1, [4]), (6, 130, [17, 1, 1, 1])])
def test_decode_matches_torch(N, d, widths, dtype, prefixes, deterministic, monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", deterministic)
    gen = _gen("decode", N, d, dtype, prefixes, deterministic)
    F, K = 29, sum(widths)
    idx, vals = _sparse_codes(N, K, F, gen, dtype)
    W, gain, b = torch.randn(F, d, generator=gen).to(dtype), torch.rand(len(widths), generator=gen).to(dtype), \
        torch.randn(d, generator=gen).to(dtype)
    g_out = torch.randn((len(widths), N, d) if prefixes else (N, d), generator=gen).to(dtype)
    with poisoned_outputs():
        out = triton_backend.decode_forward(*_dev(idx, vals, W, gain, b), widths, prefixes)
        grads = triton_backend.decode_backward(*_dev(g_out, idx, vals, W, gain), widths, prefixes, True, True, True)
    tol = 2e-2 if dtype == torch.bfloat16 else TOL[dtype] * 10
    assert out.dtype == dtype
    assert_close("decode", out.cpu(), torch_sparse.decode_forward(idx, vals, W, gain, b, widths, prefixes), tol)
    want = torch_sparse.decode_backward(g_out, idx, vals, W, gain, widths, prefixes, True, True, True)
    for name, g, w in zip(("g_vals", "g_W_dec", "g_gain", "g_b_dec"), grads, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert_close(name, g.cpu(), w, TOL[dtype] * 10)


@pytest.mark.parametrize("prefixes", [False, True])
@pytest.mark.parametrize("config", kernels.decode._gather_sum_configs() if triton_ok else [],
                         ids=lambda c: f"K{c.kwargs['BLOCK_K']}-D{c.kwargs['BLOCK_D']}-w{c.num_warps}-s{c.num_stages}")
def test_gather_sum_every_tuned_tile(config, prefixes, monkeypatch):
    """The autotuner picks the decode's tile on a GPU only at sizes no other test reaches: every
    candidate tile, on a shape that breaks it (d and the levels' slots off its block sizes)."""
    monkeypatch.setattr(kernels.decode, "_BLOCK_K", config.kwargs["BLOCK_K"])
    monkeypatch.setattr(kernels.decode, "_BLOCK_D", config.kwargs["BLOCK_D"])
    gen = _gen("gather-sum-tile", str(config), prefixes)
    N, d, F, widths = 5, 70, 23, [11, 3, 2]
    idx, vals = _sparse_codes(N, sum(widths), F, gen, torch.float32)
    W, gain, b = torch.randn(F, d, generator=gen), torch.rand(len(widths), generator=gen), torch.randn(d, generator=gen)
    with poisoned_outputs():
        out = triton_backend.decode_forward(*_dev(idx, vals, W, gain, b), widths, prefixes)
    assert_close("decode", out.cpu(), torch_sparse.decode_forward(idx, vals, W, gain, b, widths, prefixes), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prefixes", [False, True])
def test_decode_backward_active_only(dtype, prefixes):
    """grad_active_only: g_vals is the true gradient where vals != 0 and exactly 0 elsewhere (those
    rows unread); the other gradients are unchanged."""
    gen = _gen("decode-active-only", dtype, prefixes)
    N, d, F, widths = 21, 90, 31, [7, 4, 2]
    idx, vals = _sparse_codes(N, sum(widths), F, gen, dtype)
    W, gain = torch.randn(F, d, generator=gen).to(dtype), torch.rand(len(widths), generator=gen).to(dtype)
    g_out = torch.randn((len(widths), N, d) if prefixes else (N, d), generator=gen).to(dtype)
    with poisoned_outputs():
        got = triton_backend.decode_backward(*_dev(g_out, idx, vals, W, gain), widths, prefixes, True, True, True,
                                             grad_active_only=True)
    want = list(torch_sparse.decode_backward(g_out, idx, vals, W, gain, widths, prefixes, True, True, True))
    assert (vals == 0).any() and (want[0][vals == 0] != 0).any(), "the case must have dead slots with a gradient"
    want[0] = want[0].masked_fill(vals == 0, 0)
    assert (got[0].cpu()[vals == 0] == 0).all()
    for name, g, w in zip(("g_vals", "g_W_dec", "g_gain", "g_b_dec"), got, want):
        assert_close(name, g.cpu(), w, TOL[dtype] * 10)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N, d, K, kp", [(23, 70, 6, 3), (1, 1, 3, 2), (9, 5, 40, 1)])
def test_encode_backward_matches_torch(N, d, K, kp, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", deterministic)
    gen = _gen("encode_backward", N, d, K, dtype, deterministic)
    F = 50
    idx, g = _sparse_codes(N, K, F, gen, dtype)
    slot = torch.randint(-1, kp, (N, K), generator=gen)
    xc, W, edge = torch.randn(N, d, generator=gen).to(dtype), torch.randn(F, d, generator=gen).to(dtype), \
        torch.randn(F, generator=gen).to(dtype)
    p_vals = torch.rand(N, kp, generator=gen).to(g.dtype)
    with poisoned_outputs():
        got = triton_backend.encode_backward(*_dev(g, idx, slot, xc, W, edge, p_vals), True, True, True, True)
    want = torch_sparse.encode_backward(g, idx, slot, xc, W, edge, p_vals, True, True, True, True)
    for name, a, b in zip(("g_xc", "g_W_enc", "g_b_enc", "g_edge", "g_parent_vals"), got, want):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close(name, a.cpu(), b, TOL[dtype] * 10)
    untouched = torch.ones(F, dtype=torch.bool)
    untouched[idx.unique()] = False
    for name, a in zip(("g_W_enc", "g_b_enc", "g_edge"), got[1:4]):
        assert (a.cpu()[untouched] == 0).all(), f"{name} is nonzero on a feature no slot names"


@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_skips_zero_coefficients_only(deterministic, monkeypatch):
    """Slots with a zero coefficient add no row (most of a batch-selected code, and every empty slot,
    all naming feature 0), but their extras still count: a slot is dropped only when it adds nothing."""
    from kernels.decode import scatter_rows
    monkeypatch.setattr(kernels, "DETERMINISTIC", deterministic)
    gen = _gen("scatter-zero-coefficients", deterministic)
    N, K, F, d = 37, 9, 11, 45
    idx = torch.randint(0, F, (N, K), generator=gen)
    coef = torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) > 0.6)
    empty = torch.rand(N, K, generator=gen) > 0.7
    idx, coef = idx.masked_fill(empty, 0), coef.masked_fill(empty, 0.0)  # empty slots: id 0, coefficient 0
    extras = torch.randn(2, N, K, generator=gen)
    extras[1] = extras[1].masked_fill(coef == 0, 0.0)  # one extra dead wherever the row is, one never
    R, gain = torch.randn(N, d, generator=gen), torch.rand(1, generator=gen) + 0.5
    with poisoned_outputs():
        out, sums = scatter_rows(*_dev(idx, coef, R, gain), [K], F, *_dev(extras))
    flat = idx.reshape(-1)
    rows = (gain.double() * coef.double()).reshape(-1, 1) * R.double().repeat_interleave(K, 0)
    want = torch.zeros(F, d, dtype=torch.float64).index_add_(0, flat, rows)
    want_sums = torch.zeros(2, F, dtype=torch.float64).index_add_(1, flat, extras.double().reshape(2, -1))
    assert (coef == 0).float().mean() > 0.5 and (idx[coef == 0] == 0).any()
    assert_close("rows", out.cpu(), want, 1e-5)
    assert_close("sums", sums.cpu(), want_sums, 1e-5)


def test_deterministic_scatter_is_bit_identical(monkeypatch):
    """The sorted scatter sums every feature in one fixed order: two runs agree bit for bit (on a
    GPU the atomic mode does not), and with the atomic mode to rounding."""
    gen = _gen("deterministic")
    N, K, F, d = 64, 10, 10, 33  # every feature in every row, so the order of the sum matters
    idx, vals = _sparse_codes(N, K, F, gen, torch.float32)
    g_out = torch.randn(N, d, generator=gen)
    W, gain = torch.randn(F, d, generator=gen), torch.rand(2, generator=gen)
    args = _dev(g_out, idx, vals, W, gain)
    monkeypatch.setattr(kernels, "DETERMINISTIC", True)
    runs = [triton_backend.decode_backward(*args, [6, 4], False, True, True, True)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    atomic = triton_backend.decode_backward(*args, [6, 4], False, True, True, True)[1]
    assert_close("atomic vs sorted", atomic.cpu(), runs[0].cpu(), 1e-5)


def test_deterministic_mode_follows_env_and_torch(monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", None)
    monkeypatch.delenv("HSAE_DETERMINISTIC", raising=False)
    assert kernels.deterministic() == torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("HSAE_DETERMINISTIC", "1")
    assert kernels.deterministic()


# ---------------------------------------------------------------------------------------- memory
class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes: the interpreter views arguments as bytes) that any torch
    op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_encodes_hold_no_n_by_f_buffer(monkeypatch):
    """Dense and routed encode and the backward allocate O(N * K) (plus inputs' sizes), never N x F_l;
    the dense encode's GEMM path, at most GEMM_BLOCK_SCORES scores at a time."""
    N, d, sizes, kp, kmax = 64, 4, (512, 64), 2, 4
    tensors, C = _routed_case(N, d, sizes, torch.float32, _gen("memory"), kp, False)
    xc, W, b, edge, mask, parent, p_idx, p_vals, ptr, ids = _dev(*tensors)
    F = sizes[0]  # the level's rows
    inputs = 8 * max(F * d, N * d, F)  # bytes, int64 included
    with _LargestAllocation() as routed:
        codes = triton_backend.encode_forward(xc, W, b, edge, mask, parent, p_idx, p_vals, ptr, ids, C, kmax, True)
    monkeypatch.setenv("HSAE_DENSE_ENCODE", "fused")
    with _LargestAllocation() as dense:
        triton_backend.encode_forward(xc, W, b, edge, mask, parent, None, None, None, None, 0, kmax, False)
    monkeypatch.setenv("HSAE_DENSE_ENCODE", "gemm")
    monkeypatch.setattr(encode_dense_module, "GEMM_BLOCK_SCORES", 4 * sizes[0])  # 4 rows a block
    with _LargestAllocation() as gemm:
        triton_backend.encode_forward(xc, W, b, edge, mask, parent, None, None, None, None, 0, kmax, False)
    with _LargestAllocation() as backward:
        triton_backend.encode_backward(torch.ones_like(codes[1]), codes[0], codes[2], xc, W, edge, p_vals,
                                       True, True, True, True)
    assert routed.largest <= max(inputs, 8 * N * kp * C), f"routed encode allocated {routed.largest} bytes"
    assert dense.largest <= max(inputs, 8 * N * kmax * 8), f"dense encode allocated {dense.largest} bytes"
    assert gemm.largest <= max(inputs, 8 * N * kmax * 8), f"dense encode (gemm) allocated {gemm.largest} bytes"
    assert backward.largest <= inputs, f"encode backward allocated {backward.largest} bytes"
    assert 4 * N * sizes[0] > 2 * max(inputs, 8 * N * kp * C), "the shape must tell O(N*K) from a float32 N x F"


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_training_step_has_no_graph_break(backend):
    """torch.compile(fullgraph=True) traces the layer (custom ops included) and trains a step."""
    torch._dynamo.reset()
    cfg = HSAEConfig(d_model=8, level_sizes=(24, 8, 4), k=(4, 2, 1))
    layer = HSAELayer(cfg, backend=backend).to(DEVICE if backend == "triton" else "cpu")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 8, device=layer.W_enc.device)
    out = compiled(x, return_prefixes=True)
    loss = (out.x_hat - x).pow(2).sum() + out.prefixes.pow(2).mean()
    loss.backward()
    assert layer.W_enc.grad is not None and torch.isfinite(layer.W_enc.grad).all()
    assert torch.allclose(out.x_hat, layer(x).x_hat, atol=1e-5)


# ------------------------------------------------------------------------------- CUDA: the full product
# tests/test_backends.py runs the triton backend on CPU tensors (interpreter); on a GPU this runs
# every case, dtype and selection, in both scatter modes, on CUDA tensors.
class DeviceMirror(torch.nn.Module):
    """A CPU layer whose forward runs on `device`: the shared helper keeps comparing CPU tensors
    and autograd carries every gradient back to the CPU parameters."""

    def __init__(self, layer: HSAELayer, device: str):
        super().__init__()
        self.layer = layer
        self.device = torch.device(device)
        object.__setattr__(self, "_twin", copy.deepcopy(layer).to(device))  # its tensors are replaced per call

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, x, selection=None, return_prefixes=False):
        named = itertools.chain(self.layer.named_parameters(), self.layer.named_buffers())
        tensors = {n: t.to(self.device) for n, t in named}
        out = torch.func.functional_call(self._twin, tensors, (x.to(self.device),),
                                         {"selection": selection, "return_prefixes": return_prefixes})
        levels = [LevelCodes(c.idx.cpu(), c.vals.cpu(), c.scores.cpu()) for c in out.levels]
        return HSAEOutput(out.x_hat.cpu(), [(i.cpu(), v.cpu()) for i, v in out.codes], levels,
                          out.prefixes.cpu() if out.prefixes is not None else None)


def test_device_mirror_passes_gradients_through():
    """The CUDA test's wrapper, run on the interpreter's device: a broken mirror would let it pass vacuously."""
    cfg, N = make_config("three_level", "batch")
    layer = DeviceMirror(random_layer(cfg, "triton", torch.float32, 5), DEVICE)
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(6))
    run = assert_close_to_reference(layer, x, "batch", prefixes=True, seed=5)
    assert run.grads["W_enc"].abs().sum() > 0 and run.grads["x"].abs().sum() > 0


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and TRITON_INTERPRET=0")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("selection", ["batch", "token", "threshold"])
def test_cuda_backend_matches_reference(selection, case, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", deterministic)
    cfg, N = make_config(case, selection)
    seed = case_seed("triton-cuda", dtype, case, selection)
    layer = DeviceMirror(random_layer(cfg, "triton", dtype, seed), "cuda")
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    assert_close_to_reference(layer, x, selection, prefixes=case in ("three_level", "four_level", "flat"), seed=seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_is_triton_on_cuda():
    layer = HSAELayer(HSAEConfig(d_model=8, level_sizes=(24, 8, 4), k=(4, 2, 1))).to("cuda")
    assert layer.backend_for(torch.device("cuda")) == "triton"
