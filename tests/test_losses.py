"""SPEC 5 losses from sparse codes against dense, obviously-correct formulas on dense activations."""
import math

import pytest
import torch

from hsae_fast import HSAEConfig
from hsae_fast.losses import (
    DeadFeatureTracker, LossWeights, auxk_loss, consistency_loss, decoder_tie_loss, fvu, kl_consistency_loss,
    mse, orphan_loss, prefix_loss, prefix_weight, total_loss, total_variance,
)
from hsae_fast.functional import LevelCodes

from hsae_fast.backends.common import poisoned_outputs
from hsae_fast.ops.auxk import dead_decode, dead_topk

from helpers import TOLERANCE, assert_close, case_seed, densify, random_layer, usable_backends

TOL = dict(rtol=1e-9, atol=1e-12)


def _model(gating="none", parent=None, seed=0):
    cfg = HSAEConfig(d_model=11, level_sizes=(30, 10, 4), k=(6, 3, 2), gating=gating, parent=parent, k_aux=5)
    layer = random_layer(cfg, "torch", torch.float64, seed, prune_frac=0.1)
    x = torch.randn(37, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return layer, x


def _dense_levels(layer, out):
    _, dense = densify(layer, out.levels)
    return dense


def test_fvu_and_mse_match_dense_formula():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 7, dtype=torch.float64, generator=gen), torch.randn(20, 7, dtype=torch.float64, generator=gen)
    want = sum(((x[n] - y[n]) ** 2).sum() for n in range(20)) / sum(((x[n] - x.mean(0)) ** 2).sum() for n in range(20))
    torch.testing.assert_close(fvu(x, y), want, **TOL)
    torch.testing.assert_close(mse(x, y), ((x - y) ** 2).sum(1).mean(), **TOL)
    assert float(fvu(x, x)) == 0.0
    torch.testing.assert_close(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0, dtype=torch.float64), **TOL)
    # leading dims flatten to tokens; 16-bit inputs are measured in float32
    torch.testing.assert_close(fvu(x.reshape(4, 5, 7), y.reshape(4, 5, 7)), want, **TOL)
    assert fvu(x.half(), y.half()).dtype == torch.float32
    torch.testing.assert_close(total_variance(x), ((x - x.mean(0)) ** 2).sum(), **TOL)


def test_prefix_weight_schedule():
    assert prefix_weight(0.0, 0.5) == 1.0
    assert prefix_weight(0.25, 0.5) == pytest.approx(0.5)
    assert prefix_weight(0.5, 0.5) == 0.0 and prefix_weight(0.9, 0.5) == 0.0
    assert prefix_weight(0.0, 0.0) == 0.0


def test_prefix_loss_matches_dense_prefix_sums():
    layer, x = _model(gating="hard")
    out = layer(x, return_prefixes=True)
    acts = _dense_levels(layer, out)
    cfg = layer.cfg
    W = layer.W_dec.detach()
    decodes = [acts[l] @ W[cfg.level_offsets[l]: cfg.level_offsets[l] + cfg.level_sizes[l]] for l in range(3)]
    gain, b = layer.level_gain.detach(), layer.b_dec.detach()
    want = 0.0
    for m in (1, 2):
        P = b + sum(gain[l] * decodes[l] for l in range(m, 3))
        want = want + ((x - P) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(prefix_loss(x, out.prefixes).detach(), want, **TOL)


def test_orphan_loss_matches_dense_formula_and_gradient():
    layer, x = _model(gating="none")
    out = layer(x)
    acts = _dense_levels(layer, out)
    parent, offs = layer.parent, layer.cfg.level_offsets
    want = 0.0
    for l in range(2):
        ids = torch.arange(offs[l], offs[l] + layer.cfg.level_sizes[l])
        parent_act = acts[l + 1][:, parent[ids] - offs[l + 1]]
        want = want + (acts[l] * (parent_act == 0)).sum() / x.shape[0]
    assert want > 0, "the test needs orphans (gating none)"
    levels = [LevelCodes(c.idx, c.vals.detach().clone().requires_grad_(True), c.scores) for c in out.levels]
    got = orphan_loss(levels, parent)
    torch.testing.assert_close(got, want, **TOL)
    got.backward()
    # d/d a = the (constant) orphan indicator / N on each active slot
    for l in range(2):
        c = levels[l]
        orphan = torch.tensor([[float(acts[l + 1][n, int(parent[i]) - offs[l + 1]] == 0) for i in c.idx[n]]
                               for n in range(x.shape[0])], dtype=torch.float64)
        torch.testing.assert_close(c.vals.grad, orphan / x.shape[0], **TOL)


def test_orphan_loss_zero_under_hard_gating():
    layer, x = _model(gating="hard")
    assert float(orphan_loss(layer(x).levels, layer.parent).detach()) == 0.0


def test_decoder_tie_loss_over_unpruned_edges():
    layer, _ = _model()
    W, parent, mask = layer.W_dec.detach(), layer.parent, layer.path_mask
    edges = [i for i in range(W.shape[0]) if parent[i] >= 0 and mask[i]]
    want = sum(((W[i] - W[parent[i]]) ** 2).sum() for i in edges) / len(edges)
    torch.testing.assert_close(decoder_tie_loss(W, parent, mask), want, **TOL)


def _dense_kl(acts, parent, cfg):
    """Per token: q_j = children's summed activity under parent j (normalized), p_j = parent j's."""
    total, offs, eps = 0.0, cfg.level_offsets, 1e-6
    N = acts[0].shape[0]
    for l in range(cfg.num_levels - 1):
        kl = torch.zeros(N, dtype=torch.float64)
        for n in range(N):
            p = acts[l + 1][n].clone()
            q = torch.zeros_like(p)
            for i in range(cfg.level_sizes[l]):
                q[int(parent[offs[l] + i]) - offs[l + 1]] += acts[l][n, i]
            p = p / max(float(p.sum()), eps)
            q = q / max(float(q.sum()), eps)
            kl[n] = (q * torch.log((q + eps) / (p + eps))).sum()
        total = total + kl.mean()
    return total


def test_kl_consistency_matches_dense_formula():
    layer, x = _model(gating="none")
    out = layer(x)
    acts = _dense_levels(layer, out)
    torch.testing.assert_close(kl_consistency_loss(out.levels, layer.parent).detach(), _dense_kl(acts, layer.parent, layer.cfg), **TOL)


def test_kl_charges_about_14_nats_for_one_orphan():
    parent = torch.tensor([2, 3, -1, -1])
    child = LevelCodes(torch.tensor([[0, 1]]), torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2))
    upper = LevelCodes(torch.tensor([[2, 3]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2))
    # child 1's parent (3) is silent: half of q's mass sits where p has none
    value = float(kl_consistency_loss([child, upper], parent))
    assert value == pytest.approx(0.5 * math.log(0.5 / 1e-6) + 0.5 * math.log(0.5 / 1.0), rel=1e-4)


def _dense_auxk(layer, x, x_hat, dead, k_aux):
    W_enc, b_enc, W_dec = layer.W_enc, layer.b_enc, layer.W_dec
    s = (x - layer.b_dec.detach()) @ W_enc.T + b_enc  # every feature, then mask
    s = s.masked_fill(~dead, float("-inf"))
    top = s.topk(k_aux, dim=1)
    level = torch.tensor(sum(([l] * n for l, n in enumerate(layer.cfg.level_sizes)), []))
    rows = W_dec * layer.level_gain.detach()[level][:, None]
    e = (x - x_hat).detach()
    e_hat = torch.stack([(torch.nn.functional.softplus(top.values[n])[:, None] * rows[top.indices[n]]).sum(0)
                         for n in range(x.shape[0])])
    return ((e - e_hat) ** 2).sum() / (e ** 2).sum()


def _dense(g):
    return g.to_dense() if g.is_sparse else g


def test_auxk_matches_dense_formula_and_trains_only_dead_rows():
    layer, x = _model(gating="hard")
    out = layer(x)
    gen = torch.Generator().manual_seed(5)
    dead = (torch.rand(layer.cfg.dict_size, generator=gen) < 0.4) & layer.path_mask
    got = auxk_loss(layer, x, out.x_hat, dead, 5)
    grads = [_dense(g) for g in torch.autograd.grad(got, [layer.W_enc, layer.b_enc, layer.W_dec])]
    want = _dense_auxk(layer, x, out.x_hat, dead, 5)
    want_grads = torch.autograd.grad(want, [layer.W_enc, layer.b_enc, layer.W_dec])
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)
        assert (g[~dead] == 0).all()
    assert (grads[0][dead] != 0).any()
    # no dead feature: no loss, no work
    assert float(auxk_loss(layer, x, out.x_hat, torch.zeros_like(dead), 5)) == 0.0


# (N, dead fraction, k_aux): k_aux above the dead count (all of them), N=1, one dead feature.
AUXK_CASES = [(37, 0.4, 5), (1, 0.3, 4), (19, 0.05, 50), (23, 0.9, 31)]


# The sparse path runs on each backend's kernels; the dense one is plain torch (one backend suffices).
AUXK_PATHS = [(b, True) for b in usable_backends()] + [("torch", False)]


@pytest.mark.parametrize("backend, sparse", AUXK_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, dead_frac, k_aux", AUXK_CASES)
def test_auxk_every_backend_against_float64(backend, sparse, dtype, N, dead_frac, k_aux):
    """AuxK on sparse ops (ops/auxk.py, each backend) and on dense products against the dense
    float64 formula on the same rounded weights, loss and every weight gradient, with poisoned
    outputs; beside the main loss its gradients add into the dense ones (autograd accumulates the
    sparse path's rows in place)."""
    seed = case_seed("auxk", backend, sparse, str(dtype), N, dead_frac, k_aux)
    cfg = HSAEConfig(d_model=13, level_sizes=(45, 9, 3), k=(5, 3, 2), k_aux=k_aux)
    layer = random_layer(cfg, backend, dtype, seed, prune_frac=0.1)
    x = torch.randn(N, 13, generator=torch.Generator().manual_seed(seed)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    dead = (torch.rand(cfg.dict_size, generator=gen) < dead_frac) & layer.path_mask
    if not dead.any():
        dead[int(torch.nonzero(layer.path_mask)[0])] = True
    params = [layer.W_enc, layer.b_enc, layer.W_dec]
    with poisoned_outputs():
        x_hat = layer(x).x_hat.detach()
        got = auxk_loss(layer, x, x_hat, dead, k_aux, sparse=sparse)
        grads = [_dense(g).double() for g in torch.autograd.grad(got, params)]
    ref = random_layer(cfg, "torch", torch.float64, seed, prune_frac=0.1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            getattr(ref, name).copy_(p.double())
    want = _dense_auxk(ref, x.double(), x_hat.double(), dead, min(k_aux, int(dead.sum())))
    want_grads = torch.autograd.grad(want, [ref.W_enc, ref.b_enc, ref.W_dec])
    tol = TOLERANCE[dtype]
    assert_close("auxk", got.double(), want, tol)
    for name, g, w in zip(("W_enc", "b_enc", "W_dec"), grads, want_grads):
        assert_close(f"auxk grad {name}", g, w, tol)
        assert (g[~dead] == 0).all(), name
    # Beside the main loss the gradients are dense and are the sum of both.
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    main = mse(x, out.x_hat)  # not fvu: one token has no variance
    main_grads = torch.autograd.grad(main, params, retain_graph=True)
    (main + auxk_loss(layer, x, out.x_hat, dead, k_aux, sparse=sparse)).backward()
    for p, g_main, g_aux in zip(params, main_grads, grads):
        assert p.grad.layout == torch.strided
        assert_close("main + auxk", p.grad.double(), g_main.double() + g_aux, TOLERANCE[dtype])


@pytest.mark.parametrize("backend, sparse", AUXK_PATHS)
def test_auxk_far_below_zero_gives_no_subnormal_floats(backend, sparse):
    """Dead features' scores near -95 (as on Gemma's residual stream): softplus there is subnormal,
    and subnormal operands made the CPU products of AuxK tens of times slower. Scores below
    AUXK_SCORE_FLOOR count as no activation: the loss still matches the exact formula, and no
    gradient holds a subnormal float."""
    cfg = HSAEConfig(d_model=13, level_sizes=(45, 9, 3), k=(5, 3, 2), k_aux=6)
    layer = random_layer(cfg, backend, torch.float32, case_seed("auxk floor", backend, sparse), prune_frac=0.0)
    x = torch.randn(29, 13, generator=torch.Generator().manual_seed(3))
    x_hat = layer(x).x_hat.detach()
    dead = torch.zeros(cfg.dict_size, dtype=torch.bool)
    dead[::2] = True
    with torch.no_grad():  # dead rows' best scores from -95 to -84 (subnormal softplus and gradients), one at -59
        s = ((x - layer.b_dec) @ layer.W_enc.T).max(0).values
        layer.b_enc[dead] = -95.0 + 11.0 * torch.rand(int(dead.sum()), generator=torch.Generator().manual_seed(4)) - s[dead]
        layer.b_enc[0] = -59.0 - s[0]
    got = auxk_loss(layer, x, x_hat, dead, 6, sparse=sparse)
    grads = [_dense(g) for g in torch.autograd.grad(got, [layer.W_enc, layer.b_enc, layer.W_dec])]
    ref = random_layer(cfg, "torch", torch.float64, 0, prune_frac=0.0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            getattr(ref, name).copy_(p.double())
    want = _dense_auxk(ref, x.double(), x_hat.double(), dead, 6)
    assert_close("auxk far below zero", got.double(), want, TOLERANCE[torch.float32])
    tiny = torch.finfo(torch.float32).tiny
    for name, g in zip(("W_enc", "b_enc", "W_dec"), grads):
        assert not ((g != 0) & (g.abs() < tiny)).any(), f"subnormal floats in the AuxK gradient of {name}"
    # the feature at -59 keeps its (tiny, normal) gradient: the floor drops only what is below it
    assert grads[1][0] != 0


def test_auxk_ops_name_bad_input():
    xc, W, b = torch.randn(3, 4), torch.randn(6, 4), torch.zeros(6)
    with pytest.raises(ValueError, match="sorted, unique"):
        dead_topk(xc, W, b, torch.tensor([3, 1]), 1, "torch")
    with pytest.raises(ValueError, match="sorted, unique"):
        dead_topk(xc, W, b, torch.tensor([1, 6]), 1, "torch")
    with pytest.raises(ValueError, match="k=3 must lie in"):
        dead_topk(xc, W, b, torch.tensor([1, 2]), 3, "torch")
    with pytest.raises(ValueError, match="1-D int64"):
        dead_decode(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1), W, torch.tensor([1.0]), "torch")


def test_dead_feature_tracker():
    tracker = DeadFeatureTracker(4, dead_after_tokens=10)
    tracker.update(torch.tensor([True, False, False, False]), 6)
    assert not tracker.dead().any()
    tracker.update(torch.tensor([False, True, False, False]), 6)
    assert tracker.dead().tolist() == [False, False, True, True]  # feature 0 silent for 6 tokens only
    tracker.update(torch.tensor([False, True, False, False]), 6)
    assert tracker.dead().tolist() == [True, False, True, True]
    assert tracker.dead(torch.tensor([True, True, True, False])).tolist() == [True, False, True, False]
    other = DeadFeatureTracker(4, 10)
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.tokens_since_fired, tracker.tokens_since_fired)
    levels = [LevelCodes(torch.tensor([[0, 1]]), torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2)),
              LevelCodes(torch.tensor([[3]]), torch.tensor([[1.0]]), torch.zeros(1, 1))]
    assert DeadFeatureTracker.fired(levels, 4).tolist() == [False, True, False, True]


@pytest.mark.parametrize("consistency", ["orphan", "kl"])
def test_total_loss_is_the_weighted_sum(consistency):
    layer, x = _model(gating="none")
    layer.cfg = layer.cfg.replace(consistency=consistency, beta=0.3)
    out = layer(x, return_prefixes=True)
    dead = layer.path_mask.clone()
    dead[::2] = False
    weights = LossWeights(prefix=0.7, aux=0.25, cons=0.5)
    loss, parts = total_loss(layer, x, out, weights, dead)
    want = (fvu(x, out.x_hat) + 0.7 * prefix_loss(x, out.prefixes)
            + 0.25 * auxk_loss(layer, x, out.x_hat, dead, layer.cfg.resolved_k_aux)
            + 0.5 * consistency_loss(out.levels, layer))
    torch.testing.assert_close(loss, want, **TOL)
    assert set(parts) == {"fvu", "prefix", "auxk", "cons"}
    # the one-rank global sum (identity) changes nothing
    again, _ = total_loss(layer, x, out, weights, dead, global_sum=lambda t: t)
    torch.testing.assert_close(again, loss, **TOL)
    with pytest.raises(ValueError, match="prefixes"):
        total_loss(layer, x, layer(x), weights, dead)


def test_auxk_picks_sparse_ops_only_for_many_dead_features(monkeypatch):
    """The automatic choice: dense products up to AUXK_SPARSE_ABOVE * k_aux dead features, the sparse
    ops above (both give the same loss)."""
    import hsae_fast.losses as losses
    layer, x = _model(gating="hard")
    out = layer(x)
    calls = []
    real = losses.dead_topk
    monkeypatch.setattr(losses, "dead_topk", lambda *a: calls.append(a) or real(*a))
    few = torch.zeros(layer.cfg.dict_size, dtype=torch.bool)
    few[torch.nonzero(layer.path_mask)[:8, 0]] = True  # 8 dead, k_aux 2: 8 <= 4 * 2
    many = layer.path_mask.clone()  # about 39 dead, k_aux 2
    for dead, sparse in ((few, False), (many, True)):
        calls.clear()
        got = auxk_loss(layer, x, out.x_hat, dead, 2)
        assert bool(calls) == sparse
        torch.testing.assert_close(got, auxk_loss(layer, x, out.x_hat, dead, 2, sparse=not sparse), **TOL)
