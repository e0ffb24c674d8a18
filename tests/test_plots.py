"""`hsae plot`: every figure is written, is not blank, and the path graph leaves pruned features out."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from hsae_fast.cli import main as hsae_main
from hsae_fast.plots import make_all
from hsae_fast.plots.figures import select_subtrees
from run_dirs import shared_lm_run

FIGURES = ("training_progression.png", "feature_paths.png", "level_activations.png", "density_histograms.png")


def assert_drawn(path):
    from PIL import Image

    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[0] > 300 and image.shape[1] > 600, f"{path.name} is too small to read: {image.shape}"
    assert (image < 128).mean() > 0.005, f"{path.name} is nearly empty"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_lm_run(tmp_path_factory, "plots")


def test_make_all_writes_every_figure(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    written = make_all(run, others=[other])
    assert sorted(p.name for p in written) == sorted(FIGURES)
    for path in written:
        assert_drawn(path)
    assert (run / "analysis.json").is_file(), "the path graph runs the analysis when it is missing"


def test_plot_cli_without_a_training_log(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "metrics.jsonl").unlink()
    (bare / "analysis.json").unlink(missing_ok=True)
    assert hsae_main(["plot", str(bare)]) == 0
    out = capsys.readouterr().out
    assert "training_progression.png" not in out and "feature_paths.png" in out
    with pytest.raises(SystemExit, match="unknown arguments"):
        hsae_main(["plot", str(bare), "--colour", "red"])


def test_path_graph_leaves_out_pruned_and_silent_features():
    sizes = (8, 4, 2)
    parent = [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, -1, -1]
    features = {"mean_activation": [1.0] * 14, "path_mask": [True] * 14, "parent": parent}
    features["path_mask"][9] = False  # a pruned middle feature: its children must vanish too
    features["path_mask"][2] = features["path_mask"][3] = False
    features["mean_activation"][5] = 0.0  # never fired
    drawn = select_subtrees(features, sizes, branching=(3, 3, 2))
    assert drawn[2] == [12, 13] and drawn[1] == [8, 10, 11]
    assert drawn[0] == [0, 1, 4, 6, 7]
