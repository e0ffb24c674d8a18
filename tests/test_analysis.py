"""`hsae analyze`: active paths against a brute-force walk, co-firing and attribution per edge, and
the report's pruning and merge candidates on an LM run."""
from __future__ import annotations

import json

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.analysis import PathStats
from hsae_fast.cli import main as hsae_main
from helpers import random_layer
from run_dirs import shared_lm_run


def brute_force_paths(layer, levels) -> tuple[dict, torch.Tensor]:
    """{(leaf, top level): uses} and per-feature co-firing counts, walking each token's forest."""
    cfg, parent = layer.cfg, layer.parent
    counts, cofire = {}, torch.zeros(cfg.dict_size, dtype=torch.int64)
    level_of = {f: l for l, (o, s) in enumerate(zip(cfg.level_offsets, cfg.level_sizes)) for f in range(o, o + s)}
    for n in range(levels[0].idx.shape[0]):
        active = {int(i) for c in levels for i, v in zip(c.idx[n], c.vals[n]) if v != 0}
        for f in active:
            if int(parent[f]) in active:
                cofire[f] += 1
            if any(int(parent[g]) == f for g in active):
                continue  # not a leaf of this token's forest
            top, g = level_of[f], f
            while int(parent[g]) >= 0 and int(parent[g]) in active:
                g, top = int(parent[g]), top + 1
            counts[(f, top)] = counts.get((f, top), 0) + 1
    return counts, cofire


def test_paths_and_edges_match_a_brute_force_walk():
    cfg = HSAEConfig(d_model=16, level_sizes=(24, 8, 3), k=(5, 3, 2), gating="none", learn_edges=True)
    layer = random_layer(cfg, "torch", torch.float32, seed=11).eval()
    x = torch.randn(120, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        levels = layer(x).levels
    stats = PathStats(layer)
    stats.update([type(c)(c.idx[:50], c.vals[:50], c.scores[:50]) for c in levels])
    stats.update([type(c)(c.idx[50:], c.vals[50:], c.scores[50:]) for c in levels])
    want, cofire = brute_force_paths(layer, levels)
    L = cfg.num_levels
    got = {divmod(k, L): int(c) for k, c in enumerate(stats.path_counts.tolist()) if c}
    assert got == want
    assert any(top < L - 1 for _, top in want), "an ungated model has paths that stop below the top"
    torch.testing.assert_close(stats.cofire, cofire)
    assert stats.paths_per_token == sum(want.values()) and stats.n == 120
    assert stats.path_length_counts.sum() == sum(want.values())
    key = max(range(stats.path_counts.numel()), key=lambda k: stats.path_counts[k])
    chain = stats.path_features(key)
    assert all(int(layer.parent[a]) == b for a, b in zip(chain, chain[1:])) and len(chain) == key % L - _level(cfg, chain[0]) + 1
    # SPEC 6 attribution, recomputed from the scores of the active edges.
    assert (stats.attribution_abs_sum[stats.cofire > 0] > 0).all() and (stats.attribution_abs_sum[stats.cofire == 0] == 0).all()


def _level(cfg, f):
    return next(l for l, (o, s) in enumerate(zip(cfg.level_offsets, cfg.level_sizes)) if o <= f < o + s)


def test_analyze_reports_paths_pruning_and_merges(tmp_path_factory):
    run = shared_lm_run(tmp_path_factory, "analysis")
    layer = HSAELayer.from_pretrained(run / "final")
    cfg = layer.cfg
    # Plant a dead subtree (a level-1 feature that never fires) and a near-duplicate sibling pair.
    dead = cfg.level_offsets[1] + 3
    siblings = (layer.parent[: cfg.level_sizes[0]] == layer.parent[0]).nonzero().squeeze(1)[:2].tolist()
    with torch.no_grad():
        layer.b_enc[dead] = -1e4
        layer.W_dec[siblings[1]] = layer.W_dec[siblings[0]] * 2
    layer.save_pretrained(run / "final")
    assert hsae_main(["analyze", str(run), "--quiet"]) == 0
    result = json.loads((run / "analysis.json").read_text())
    report = (run / "analysis.md").read_text()
    paths = result["paths"]
    assert paths["full_paths_possible"] == cfg.level_sizes[0] and 0 < paths["path_utilization"] < 1
    assert sum(paths["length_counts"]) > 0 and paths["top"][0]["uses"] >= paths["top"][-1]["uses"]
    top = paths["top"][0]
    assert len(top["features"]) == 3 and top["levels"] == [0, 1, 2] and "«" in top["leaf_contexts"][0]
    heads = result["pruning_candidates"]["dead_subtree_heads"]
    assert {"feature": dead, "level": 1, "subtree_size": int((layer.parent == dead).sum()) + 1} in heads
    assert not any(int(layer.parent[h["feature"]]) == dead for h in heads), "only the head of a dead subtree is listed"
    assert result["merge_candidates"][0]["features"] == siblings
    assert result["merge_candidates"][0]["decoder_cosine"] > 0.999
    assert all(e["mean_attribution"] == 0 for e in result["edges"]["pairs"]), "edges are not learned in this run"
    assert all(0 < e["mean_cofire_share"] <= 1 for e in result["edges"]["pairs"])
    for section in ("## Most used paths", "## Edges", "## Tree use", "## Pruning candidates", "## Merge candidates"):
        assert section in report
    assert f"feature {dead} (level 1)" in report


@pytest.mark.parametrize("gating", ["hard", "none"])
def test_pruning_candidates_are_subtrees_where_nothing_fires(gating):
    """Under gating "none" a silent feature's children may fire: it is then no subtree to prune (its
    live children were once listed with it); a silent feature over silent children is one."""
    from hsae_fast.analysis.analyze import _pruning

    cfg = HSAEConfig(d_model=8, level_sizes=(16, 4, 2), k=(4, 2, 1), gating=gating)
    layer = HSAELayer(cfg, backend="torch")
    density = torch.full((cfg.dict_size,), 0.1, dtype=torch.float64)
    loud_parent, quiet_parent = 16, 17  # level 1; children 0-3 and 4-7 under the default map
    density[[loud_parent, quiet_parent]] = 0.0
    density[(layer.parent == quiet_parent).nonzero().squeeze(1)] = 0.0
    heads = {h["feature"]: h["subtree_size"] for h in _pruning(layer, density, None, 1000, 0.01)["dead_subtree_heads"]}
    assert (layer.parent == loud_parent).sum() > 0 and heads == {quiet_parent: 5}


def test_children_per_parent_counts_unpruned_parents():
    from hsae_fast.analysis.analyze import CodeStats, _tree_summary

    cfg = HSAEConfig(d_model=8, level_sizes=(16, 4, 2), k=(4, 2, 1))
    layer = HSAELayer(cfg, backend="torch")
    layer.prune([cfg.level_offsets[1]])  # a middle feature and its 4 children
    codes = CodeStats.__new__(CodeStats)
    codes.counts = torch.ones(cfg.dict_size)
    pairs = _tree_summary(layer, codes)["pairs"]
    assert [p["children_per_parent"] for p in pairs] == [4.0, 1.5]
