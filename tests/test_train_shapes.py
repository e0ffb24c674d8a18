"""The tree-shape comparison (hsae_fast/train/shapes.py): shapes, the matched true tree, equal time."""
import json

import pytest

from hsae_fast.train.shapes import main, mean_active, parse_shape, parse_shape_k


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


def test_shape_k_parses_after_a_colon():
    assert parse_shape_k("4608/288/18:32/8/2") == ((4608, 288, 18), (32, 8, 2))
    assert parse_shape_k("512/64/8") == ((512, 64, 8), None)
    with pytest.raises(ValueError, match="3 level sizes but 2 values of k"):
        parse_shape_k("512/64/8:8/2")


def test_lm_shapes_are_evaluated_held_out_and_share_the_matched_flat_sae(tmp_path):
    from hsae_fast.data import lm

    from run_dirs import CONTEXT, HOOK_LAYER, corpus_text, tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    cache = lm.cache_activations(str(folder), HOOK_LAYER, out_dir=tmp_path / "cache", corpus=str(corpus),
                                 context=CONTEXT, batch_rows=8, progress=False)
    out = tmp_path / "lm_shapes"
    # Two shapes of the same dict size (84) and total L0 (14): one flat SAE serves both.
    args = ["--out", str(out), "--data", str(cache), "--seconds", "0.2", "--probe-steps", "2",
            "--shapes", "64/16/4:8/4/2,72/8/4:10/2/2", "--eval-tokens-lm", "256", "--batch-size", "32",
            "--eval-tokens", "128", "--b-dec-init-tokens", "128", "--backend", "torch"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["shape"], r["model"]) for r in rows] == [("64/16/4", "hsae"), ("64/16/4", "flat"),
                                                        ("72/8/4", "hsae"), ("72/8/4", "flat")]
    assert rows[2]["k"] == [10, 2, 2] and rows[1]["level_sizes"] == [84] and rows[1]["k"] == [14]
    assert rows[3]["shared_with"] == "64/16/4" and rows[3]["held_out"] == rows[1]["held_out"]
    assert not (out / "72-8-4_k10-2-2_s0" / "flat").exists()
    for r in rows:
        held = r["held_out"]
        assert held["n_tokens"] > 0 and held["ce_loss_increase"] is not None and len(held["frac_dead_per_level"]) == len(r["k"])
    assert (out / "64-16-4_k8-4-2_s0" / "hsae" / "metrics.json").is_file()
    table = (out / "table.md").read_text()
    assert "| 64/16/4 | 8/4/2 | hsae | 84 |" in table and "| 72/8/4 | 14 | flat (= 64/16/4) | 84 |" in table
    # LM shapes need their k.
    assert main(["--out", str(out), "--data", str(cache), "--shapes", "64/16/4"]) == 2
