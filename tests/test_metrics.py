"""SPEC 6 metrics from sparse codes against dense formulas on dense activations."""
import math

import torch

from hsae_fast import HSAEConfig
from hsae_fast.functional import LevelCodes
from hsae_fast.metrics import (
    ActivityCounter, child_parent_cosine, edge_attribution, hcs, level_stats, parent_activation, tree_use,
)

from helpers import densify, random_layer


def _model(gating="none", seed=0, prune_frac=0.1):
    cfg = HSAEConfig(d_model=11, level_sizes=(30, 10, 4), k=(6, 3, 2), gating=gating)
    layer = random_layer(cfg, "torch", torch.float64, seed, prune_frac=prune_frac)
    x = torch.randn(41, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    out = layer(x)
    active, acts = densify(layer, out.levels)
    return layer, out, active, acts


def _parent_dense(layer, acts, l):
    offs = layer.cfg.level_offsets
    ids = torch.arange(offs[l], offs[l] + layer.cfg.level_sizes[l])
    return acts[l + 1][:, layer.parent[ids] - offs[l + 1]]  # (N, F_l)


def test_parent_activation_matches_dense_lookup():
    layer, out, _, acts = _model()
    for l in range(2):
        got = parent_activation(out.levels[l].idx, layer.parent, out.levels[l + 1].idx, out.levels[l + 1].vals)
        dense = _parent_dense(layer, acts, l)
        want = dense.gather(1, out.levels[l].idx - layer.cfg.level_offsets[l])
        torch.testing.assert_close(got.detach(), want)


def test_hcs_matches_dense_count_and_chance():
    layer, out, active, acts = _model(gating="none")
    result = hcs(out.levels, layer.parent, layer.cfg.level_sizes, layer.path_mask)
    hits_all = count_all = 0
    for l in range(2):
        offs = layer.cfg.level_offsets
        mask = layer.path_mask[offs[l]: offs[l] + layer.cfg.level_sizes[l]]
        child_on = active[l] & mask
        both = child_on & (_parent_dense(layer, acts, l) != 0)
        pair = result["pairs"][l]
        assert pair["count"] == int(child_on.sum()) and pair["count"] > 0
        assert math.isclose(pair["score"], int(both.sum()) / int(child_on.sum()))
        upper_mask = layer.path_mask[offs[l + 1]: offs[l + 1] + layer.cfg.level_sizes[l + 1]]
        assert math.isclose(pair["chance"], float(active[l + 1].double().mean(0)[upper_mask].sum() / upper_mask.sum()))
        hits_all += int(both.sum())
        count_all += int(child_on.sum())
    assert math.isclose(result["mean"], hits_all / count_all)
    assert result["mean"] < 1.0, "without gating some children are orphans"


def test_hcs_is_one_under_hard_gating():
    layer, out, _, _ = _model(gating="hard")
    result = hcs(out.levels, layer.parent, layer.cfg.level_sizes, layer.path_mask)
    assert result["mean"] == 1.0 and all(p["score"] == 1.0 for p in result["pairs"])


def test_activity_counter_and_level_stats():
    layer, out, active, acts = _model()
    counter = ActivityCounter(layer.cfg.level_sizes)
    counter.update(out.levels)
    counter.update(out.levels)
    dense_fires = torch.cat([a.long().sum(0) for a in active]) * 2
    assert torch.equal(counter.fires, dense_fires)
    assert counter.tokens == 82
    assert counter.l0() == [float(a.double().sum(1).mean()) for a in active]
    offs, sizes, mask = layer.cfg.level_offsets, layer.cfg.level_sizes, layer.path_mask
    for l, frac in enumerate(counter.dead_fraction(mask)):
        m = mask[offs[l]: offs[l] + sizes[l]]
        assert math.isclose(frac, float(((dense_fires[offs[l]: offs[l] + sizes[l]] == 0) & m).sum() / m.sum()))
    stats = level_stats(out.levels, sizes, mask)
    for l in range(3):
        assert math.isclose(stats["l1"][l], float(acts[l].abs().sum(1).mean()))
        assert math.isclose(stats["density"][l], float(active[l].double().mean()))


def test_tree_use_and_child_parent_cosine():
    layer, out, active, _ = _model()
    fires = torch.cat([a.long().sum(0) for a in active])
    result = tree_use(fires, layer.parent, layer.cfg.level_sizes)
    offs, sizes = layer.cfg.level_offsets, layer.cfg.level_sizes
    for l in range(2):
        for p in range(sizes[l + 1]):
            kids = [i for i in range(offs[l], offs[l] + sizes[l]) if layer.parent[i] == offs[l + 1] + p]
            assert int(result[l]["children_used"][p]) == sum(int(fires[i] > 0) for i in kids)
            total = sum(int(fires[i]) for i in kids)
            for i in kids:
                share = float(result[l]["child_share"][i - offs[l]])
                assert (math.isnan(share) and total == 0) or math.isclose(share, int(fires[i]) / total)
    cos = child_parent_cosine(layer.W_dec, layer.parent)
    W = layer.W_dec.detach()
    for i in range(layer.cfg.dict_size):
        p = int(layer.parent[i])
        if p < 0:
            assert math.isnan(cos[i])
        else:
            assert math.isclose(float(cos[i]), float(W[i] @ W[p] / (W[i].norm() * W[p].norm())), rel_tol=1e-9)


def test_edge_attribution_matches_dense_formula():
    layer, out, active, acts = _model(gating="hard")
    result = edge_attribution(out.levels, layer.parent, layer.edge_weight)
    offs = layer.cfg.level_offsets
    for l in range(2):
        c = out.levels[l]
        dense_parent = _parent_dense(layer, acts, l)
        for n in range(c.idx.shape[0]):
            for j in range(c.idx.shape[1]):
                i = int(c.idx[n, j])
                a_parent = float(dense_parent[n, i - offs[l]])
                if c.vals[n, j] != 0 and a_parent != 0:
                    want = float(layer.edge_weight[i].detach()) * a_parent / float(c.scores[n, j].detach())
                    assert math.isclose(float(result[l][n, j]), want, rel_tol=1e-9)
                else:
                    assert result[l][n, j] == 0
    assert any((r != 0).any() for r in result)


def test_hcs_detects_orphans_in_hand_built_codes():
    parent = torch.tensor([2, 2, 3, -1])  # two levels below a top of one feature
    level0 = LevelCodes(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1.0, 2.0], [1.0, 0.0]]), torch.zeros(2, 2))
    level1 = LevelCodes(torch.tensor([[2], [2]]), torch.tensor([[0.0], [3.0]]), torch.zeros(2, 1))
    level2 = LevelCodes(torch.tensor([[3], [3]]), torch.tensor([[1.0], [1.0]]), torch.zeros(2, 1))
    result = hcs([level0, level1, level2], parent, (2, 1, 1))
    assert result["pairs"][0]["score"] == 1 / 3 and result["pairs"][0]["count"] == 3
    assert result["pairs"][1]["score"] == 1.0 and result["pairs"][0]["chance"] == 0.5
    assert result["mean"] == 2 / 4
