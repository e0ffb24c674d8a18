"""`hsae train` (SPEC 9): flags, config files, the run directory, errors before any work."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hsae_fast import HSAELayer
from hsae_fast.cli import main
from hsae_fast.train.config import load_config_file, parse_field_flags

TINY = ["--d-model", "16", "--synthetic-sizes", "16,4,2", "--synthetic-active", "4,2,1", "--tokens", "640", "--batch_size", "64",
        "--eval-tokens", "256", "--b-dec-init-tokens", "256", "--progress", "false", "--backend", "torch",
        "--log-every", "5", "--checkpoint-every", "5"]


def test_field_flags_parse_dashes_underscores_lists_and_bools():
    fields = parse_field_flags(["--level-sizes", "128,32,8", "--learn_edges", "true", "--lr=1e-3", "--k-aux", "none",
                                "--prefix-until", "0.25", "--seed", "-3"])
    assert fields == {"level_sizes": (128, 32, 8), "learn_edges": True, "lr": 1e-3, "k_aux": None,
                      "prefix_until": 0.25, "seed": -3}
    with pytest.raises(ValueError, match="unknown field --colour"):
        parse_field_flags(["--colour", "blue"])
    with pytest.raises(ValueError, match="--tokens 'many': expected int"):
        parse_field_flags(["--tokens", "many"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_field_flags(["--lr"])


def test_config_files_json_yaml_and_sections(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.001\nlevel_sizes: [64, 16, 4]\n")
    assert load_config_file(tmp_path / "a.yaml") == {"lr": 0.001, "level_sizes": [64, 16, 4]}
    (tmp_path / "b.json").write_text(json.dumps({"hsae": {"k": [4, 2, 1]}, "trainer": {"tokens": 100}}))
    assert load_config_file(tmp_path / "b.json") == {"k": [4, 2, 1], "tokens": 100}
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        load_config_file(tmp_path / "c.json")


def test_errors_come_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--colour", "blue"]) == 2
    assert "unknown field --colour" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--lr", "-1"]) == 2
    assert "TrainConfig.lr" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--k", "4,8,1", "--level-sizes", "16,4,2", "--data", "missing.npy"]) == 2
    assert "HSAEConfig.k" in capsys.readouterr().err
    assert not out.exists()


def test_run_directory_layout_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--data-seed", "1", *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"hsae", "trainer"}
    assert config["hsae"]["level_sizes"] == [16, 4, 2] and config["trainer"]["tokens"] == 640
    assert {"data", "model", "layer"} <= set(config["trainer"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10]
    for key in ("step", "tokens", "loss", "fvu", "l0", "dead_frac", "lr", "elapsed_s"):
        assert key in lines[0]
    layer = HSAELayer.from_pretrained(out / "final")
    assert layer.cfg.level_sizes == (16, 4, 2)
    final = json.loads((out / "final_metrics.json").read_text())
    assert {"recovery", "tree_recovery", "hcs", "fvu", "l0", "refined"} <= set(final)
    assert (out / "final" / "refined_decoder.safetensors").is_file()
    assert "| tree recovery |" in capsys.readouterr().out
    # a finished run resumes to the same result without training again
    assert main(["train", "--data", "synthetic", "--out", str(out), "--data-seed", "1", "--resume", *TINY]) == 0
    again = HSAELayer.from_pretrained(out / "final")
    assert torch.equal(again.W_dec, layer.W_dec)
    # resuming with another configuration is refused
    assert main(["train", "--out", str(out), "--data-seed", "1", "--resume", *TINY, "--lr", "0.5"]) == 2
    assert "trainer.lr" in capsys.readouterr().err


def test_config_file_with_flag_override_on_npy_data(tmp_path):
    data = np.random.default_rng(0).normal(size=(512, 12)).astype(np.float32)
    np.save(tmp_path / "acts.npy", data)
    (tmp_path / "cfg.yaml").write_text("level_sizes: [12, 6, 3]\nk: [3, 2, 1]\ntokens: 256\nbatch_size: 64\n"
                                       "progress: false\nbackend: torch\neval_tokens: 128\nlr: 0.5\n")
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "acts.npy"), "--out", str(out), "--config",
                 str(tmp_path / "cfg.yaml"), "--lr", "0.002", "--b-dec-init", "mean"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"]["lr"] == 0.002 and config["trainer"]["b_dec_init"] == "mean"
    assert config["hsae"]["d_model"] == 12
    final = json.loads((out / "final_metrics.json").read_text())
    assert {"fvu", "mse", "l0", "dead_frac", "hcs"} <= set(final)


def test_flat_baseline_trains_beside_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--baseline", "flat", *TINY, "--tokens", "320"]) == 0
    flat = HSAELayer.from_pretrained(out / "flat" / "final")
    assert flat.cfg.level_sizes == (22,) and flat.cfg.k == (7,)
    table = capsys.readouterr().out
    assert "| metric | HSAE | flat SAE |" in table and "recovery bottom/mid/top" in table and "any level" in table
    flat_metrics = json.loads((out / "flat" / "final_metrics.json").read_text())
    assert flat_metrics["tree_recovery"] is None  # a flat SAE has no tree


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_every_config_file_is_checked():
    assert {"synthetic.yaml", "lm_smollm2.yaml", "lm_gemma.yaml"} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_are_valid(name):
    from hsae_fast.train.config import TrainConfig, resolve_model_config, split_fields

    model, trainer = split_fields(load_config_file(CONFIG_DIR / name))
    tcfg = TrainConfig(**trainer)
    cfg = resolve_model_config(model, 128 if tcfg.synthetic else 576, tcfg)
    assert cfg.num_levels == 3


def test_default_model_for_any_width_is_valid():
    from hsae_fast.train.config import TrainConfig, resolve_model_config

    for d in (1, 7, 576, 640):
        assert resolve_model_config({}, d, TrainConfig(data="acts.npy")).level_sizes == (16 * d, 4 * d, d)


def test_a_diverged_run_exits_with_the_reason(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(256, 12)).astype(np.float32) * 1e25
    np.save(tmp_path / "huge.npy", data)
    code = main(["train", "--data", str(tmp_path / "huge.npy"), "--out", str(tmp_path / "run"), "--level-sizes",
                 "12,6,3", "--k", "3,2,1", "--tokens", "128", "--batch-size", "64", "--progress", "false",
                 "--b-dec-init", "zero"])
    assert code == 3
    assert "loss is not finite at step 0" in capsys.readouterr().err


def test_yaml_reads_exponent_floats(tmp_path):
    """`lr: 1e-3` is a float (PyYAML's YAML 1.1 reads it as a string, which TrainConfig then refused)."""
    (tmp_path / "a.yaml").write_text("lr: 1e-3\nwarmup_frac: 5E-2\n")
    assert load_config_file(tmp_path / "a.yaml") == {"lr": 1e-3, "warmup_frac": 0.05}
    from hsae_fast.train.config import yaml_load

    assert yaml_load("lr: 1e-3\nb: -2.5e+1\nc: 7\nd: 1e3x\n") == {"lr": 1e-3, "b": -25.0, "c": 7, "d": "1e3x"}
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")


def test_run_files_follow_the_umask_and_paths_are_resolved(tmp_path, monkeypatch):
    """Files written atomically get 0666 less the umask (mkstemp's 0600 once made a shared run folder's
    models unreadable to the group); the data path is stored absolute and resume accepts it named
    another way, and a change of progress or threads."""
    import os
    import stat

    data = np.random.default_rng(0).normal(size=(512, 12)).astype(np.float32)
    np.save(tmp_path / "acts.npy", data)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        args = ["train", "--data", "acts.npy", "--out", "run", "--level-sizes", "12,6,3", "--k", "3,2,1", "--tokens",
                "256", "--batch-size", "64", "--progress", "false", "--backend", "torch", "--eval-tokens", "128"]
        assert main(args) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "final_metrics.json", "final/model.safetensors", "checkpoints/latest.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["trainer"]["data"] == str(tmp_path / "acts.npy")
    resume = [a if a != "acts.npy" else "./acts.npy" for a in args] + ["--resume", "--threads", "1", "--progress", "true"]
    assert main(resume) == 0


@pytest.mark.parametrize("command", ["eval", "analyze", "plot"])
def test_a_missing_run_folder_is_a_one_line_error(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hsae {command}: error:") and "Traceback" not in err


def test_train_refuses_an_unusable_device_or_out_path_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", "--out", str(tmp_path / "file"), *TINY]) == 2
    assert "hsae train: error:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--out", str(tmp_path / "run"), *TINY, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
