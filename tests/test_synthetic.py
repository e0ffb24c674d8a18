"""The synthetic hierarchy (issue 7), its scores, and the file sources."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.data import open_source
from hsae_fast.data.synthetic import (
    SyntheticConfig, SyntheticHierarchy, feature_recovery, induced_tree, score_model, tree_recovery,
)


def test_children_fire_only_under_active_parents_at_the_configured_rates():
    source = SyntheticHierarchy(SyntheticConfig(d_model=32, seed=3))
    x, codes = source.generate(20000, torch.Generator().manual_seed(0), return_codes=True)
    truth = source.truth
    active = codes > 0
    children = torch.nonzero(truth.parent >= 0).squeeze(1)
    assert not (active[:, children] & ~active[:, truth.parent[children]]).any()
    for l, size in enumerate(truth.level_sizes):
        off = truth.level_offsets[l]
        mean = active[:, off: off + size].sum(1).double().mean()
        assert float(mean) == pytest.approx(source.cfg.mean_active[l], rel=0.05)
    assert x.shape == (20000, 32) and x.dtype == torch.float32
    # heavy tail: the largest magnitudes sit far above the median
    mags = codes[active]
    assert float(mags.max()) > 5 * float(mags.median())


def test_directions_are_unit_and_children_lean_on_their_parent():
    source = SyntheticHierarchy(child_parent_cos=0.3, d_model=64)
    truth = source.truth
    torch.testing.assert_close(truth.directions.norm(dim=1), torch.ones(truth.directions.shape[0]))
    children = torch.nonzero(truth.parent >= 0).squeeze(1)
    cos = (truth.directions[children] * truth.directions[truth.parent[children]]).sum(1)
    torch.testing.assert_close(cos, torch.full_like(cos, 0.3), atol=1e-5, rtol=0)


def test_batches_are_a_pure_function_of_seed_and_index():
    source = SyntheticHierarchy(d_model=16)
    stream = source.batches(8, seed=5)
    first = [next(stream) for _ in range(3)]
    resumed = next(source.batches(8, seed=5, start=2))
    assert torch.equal(first[2], resumed)
    assert not torch.equal(first[0], next(source.batches(8, seed=6)))
    assert torch.equal(source.sample(10, 1), source.sample(10, 1))


def test_bad_synthetic_config_is_rejected():
    with pytest.raises(ValueError, match="mean_active"):
        SyntheticConfig(mean_active=(20.0, 4.0, 2.0))
    with pytest.raises(ValueError, match="multiple"):
        SyntheticConfig(level_sizes=(30, 8, 4))


def _perfect_layer(source, flat=False):
    truth = source.truth
    sizes = truth.level_sizes
    if flat:
        cfg = HSAEConfig(d_model=source.d_model, level_sizes=(sum(sizes),), k=(14,))
    else:
        cfg = HSAEConfig(d_model=source.d_model, level_sizes=sizes, k=(8, 4, 2))
    layer = HSAELayer(cfg, backend="torch")
    with torch.no_grad():
        layer.W_dec.copy_(truth.directions)
        layer.W_enc.copy_(truth.directions)
        layer.b_dec.copy_(truth.offset)
    return layer


def test_scores_of_the_true_dictionary():
    source = SyntheticHierarchy(d_model=64, child_parent_cos=0.0)
    layer = _perfect_layer(source)
    assert torch.equal(layer.parent, source.truth.parent)  # the default map is the true tree here
    rec = feature_recovery(source.truth, layer.W_dec, layer.cfg.level_sizes)
    assert rec["per_level"] == pytest.approx([1.0, 1.0, 1.0])
    assert tree_recovery(source.truth, rec["match"], layer.parent) == 1.0
    # swapping two top features' rows breaks the links of their 8 children
    swapped = layer.W_dec.detach().clone()
    swapped[[160, 161]] = swapped[[161, 160]]
    rec2 = feature_recovery(source.truth, swapped, layer.cfg.level_sizes)
    assert tree_recovery(source.truth, rec2["match"], layer.parent) == pytest.approx(1 - 8 / 160)
    scores = score_model(layer, source, n_tokens=2048)
    assert scores["hcs"] == 1.0 and scores["recovery"] == pytest.approx([1.0, 1.0, 1.0])


def test_flat_model_is_matched_against_all_rows_and_has_no_tree():
    source = SyntheticHierarchy(d_model=64)
    flat = _perfect_layer(source, flat=True)
    scores = score_model(flat, source, n_tokens=2048)
    assert scores["recovery"] == pytest.approx([1.0, 1.0, 1.0])
    assert np.isnan(scores["tree_recovery"])
    assert 0.0 <= scores["hcs"] <= 1.0
    parent = induced_tree(source.truth, feature_recovery(source.truth, flat.W_dec, (168,))["match"], 168)
    assert torch.equal(parent, source.truth.parent)


def test_npy_source_epochs_cover_every_row_and_resume(tmp_path):
    data = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    np.save(tmp_path / "acts.npy", data)
    source = open_source(str(tmp_path / "acts.npy"))
    assert source.d_model == 3
    stream = source.batches(10, seed=1)
    epoch = torch.cat([next(stream) for _ in range(4)])
    assert sorted(epoch[:, 0].tolist()) == sorted(data[:, 0].tolist())
    next_batch = next(stream)
    assert torch.equal(next_batch, next(source.batches(10, seed=1, start=4)))
    with pytest.raises(ValueError, match="batch_size"):
        next(source.batches(41))


def test_shard_source_reads_activations_from_every_shard(tmp_path):
    rows = torch.arange(25 * 4, dtype=torch.float32).reshape(25, 4)
    save_file({"activations": rows[:10]}, str(tmp_path / "a.safetensors"))
    save_file({"activations": rows[10:].half()}, str(tmp_path / "b.safetensors"))
    source = open_source(str(tmp_path))
    assert source.d_model == 4 and source.n_rows == 25
    stream = source.batches(5, seed=0)
    seen = torch.cat([next(stream) for _ in range(5)])
    assert sorted(seen[:, 0].tolist()) == sorted(rows[:, 0].tolist())
    assert source.sample(7).shape == (7, 4)
    save_file({"other": rows}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="activations"):
        open_source(str(tmp_path))


def test_open_source_rejects_unknown_data(tmp_path):
    with pytest.raises(ValueError, match="expected 'synthetic'"):
        open_source(str(tmp_path / "missing.npy"))


def test_a_model_seeded_like_the_data_does_not_start_from_the_truth():
    source = SyntheticHierarchy(seed=0)
    torch.manual_seed(0)
    layer = HSAELayer(HSAEConfig(d_model=128, level_sizes=(128, 32, 8), k=(8, 4, 2)))
    cos = torch.nn.functional.normalize(source.truth.directions, dim=1) @ layer.W_dec.detach().T
    assert cos.abs().max() < 0.6
    first = next(source.batches(64, seed=0))
    torch.manual_seed(0)
    assert not torch.allclose(first, torch.rand(64, 128))


def test_any_level_recovery_finds_concepts_in_the_wrong_level():
    source = SyntheticHierarchy(d_model=64)
    layer = _perfect_layer(source)
    with torch.no_grad():  # swap a bottom and a middle concept between levels
        rows = layer.W_dec.detach().clone()
        rows[[0, 128]] = rows[[128, 0]]
        layer.W_dec.copy_(rows)
    scores = score_model(layer, source, n_tokens=512)
    assert scores["recovery"][1] < 1.0 and scores["recovery_any_level"] == pytest.approx([1.0, 1.0, 1.0])


def test_file_sources_refuse_sizes_below_one(tmp_path):
    """batch_size 0 divided by zero, -1 gave batches of N - 1 rows, sample(-3) N - 3 rows."""
    np.save(tmp_path / "acts.npy", np.zeros((103, 4), dtype=np.float32))
    source = open_source(str(tmp_path / "acts.npy"))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size={bad}: must be a positive int"):
            next(iter(source.batches(bad)))
    with pytest.raises(ValueError, match="sample n=-3"):
        source.sample(-3)
    assert source.sample(0).shape == (0, 4)


def test_file_sources_refuse_empty_and_integer_data(tmp_path):
    from safetensors.torch import save_file

    np.save(tmp_path / "none.npy", np.zeros((0, 4), dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((5, 0), dtype=np.float32))
    for name in ("none.npy", "flat.npy"):
        with pytest.raises(ValueError, match="expected at least one row of width >= 1"):
            open_source(str(tmp_path / name))
    (tmp_path / "shards").mkdir()
    save_file({"activations": torch.zeros(5, 4, dtype=torch.int32)}, str(tmp_path / "shards" / "a.safetensors"))
    with pytest.raises(ValueError, match="dtype I32, expected a float dtype"):
        open_source(str(tmp_path / "shards"))
