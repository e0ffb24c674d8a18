"""The tree-shape comparison (hsae_fast/train/shapes.py): shapes, the matched true tree, equal time."""
import json

import pytest

from hsae_fast.train.shapes import main, mean_active, parse_shape


def test_shapes_parse_bottom_first_and_the_true_tree_doubles_downward():
    assert parse_shape("512/64/8") == (512, 64, 8)
    assert mean_active((512, 64, 8)) == (8.0, 4.0, 2.0)
    assert mean_active((4096, 512, 64, 8)) == (16.0, 8.0, 4.0, 2.0)
    assert mean_active((8, 4, 1)) == (8.0, 4.0, 1.0)  # never more active than there are concepts
    with pytest.raises(ValueError, match="whole multiple"):
        parse_shape("100/30/8")


def test_each_shape_trains_an_hsae_and_the_matched_flat_sae_for_the_same_time(tmp_path):
    out = tmp_path / "shapes"
    code = main(["--out", str(out), "--seconds", "0.3", "--shapes", "32/8/4", "--probe-steps", "4",
                 "--d-model", "16", "--batch-size", "32", "--eval-tokens", "256", "--b-dec-init-tokens", "256",
                 "--backend", "torch"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["hsae", "flat"]
    hsae, flat = rows
    assert hsae["level_sizes"] == [32, 8, 4] and hsae["k"] == [8, 4, 2]
    assert flat["level_sizes"] == [44] and flat["k"] == [14]
    assert len(hsae["recovery"]) == len(flat["recovery"]) == 3 and hsae["hcs"] == 1.0
    assert hsae["tree_recovery"] is not None and flat["tree_recovery"] is None
    for r in rows:
        assert r["tokens"] >= 32 and r["tokens"] % 32 == 0
    table = (out / "table.md").read_text()
    assert "| 32/8/4 | 0 | hsae |" in table and "| 32/8/4 | 0 | flat |" in table
    assert main(["--out", str(out), "--shapes", "10/3"]) == 2
