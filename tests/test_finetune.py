"""`hsae finetune`: the KL it trains on is the eval's KL, it lowers that KL on the tiny LM run, keeps the
update's invariants, never touches the source run, and rejects bad input by name."""
from __future__ import annotations

import json

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.cli import main as hsae_main
from hsae_fast.data import lm
from hsae_fast.eval import evaluate_run
from hsae_fast.io import sha256_file
from hsae_fast.train.finetune import FinetuneConfig, finetune_run, kl_clean_to_spliced
from run_dirs import CONTEXT, D_MODEL, fit_layer, shared_lm_run, write_run


@pytest.fixture(scope="module")
def lm_model_run(tmp_path_factory):
    return shared_lm_run(tmp_path_factory, "finetune")


@pytest.fixture(scope="module")
def metrics_before(lm_model_run):
    return evaluate_run(lm_model_run, tokens=1024, progress=False)


def test_kl_matches_the_dense_formula_and_is_zero_for_the_clean_logits():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    spliced = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    scored = torch.rand(3, 5, generator=gen) > 0.3
    p = clean.softmax(-1)
    want = (p * (p.log() - spliced.log_softmax(-1))).sum(-1)[scored].mean()
    assert torch.allclose(kl_clean_to_spliced(clean, spliced, scored).double(), want, rtol=1e-5, atol=1e-7)
    assert float(kl_clean_to_spliced(clean, clean, scored)) == pytest.approx(0.0, abs=1e-6)
    none = kl_clean_to_spliced(clean, spliced.requires_grad_(), torch.zeros(3, 5, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_logits_at_kept_positions_are_the_full_logits_there(lm_model_run):
    # The fine-tune asks the model for logits at a subset of positions (`logits_to_keep`, an index
    # tensor): they must be the full forward's logits at those positions, in that order.
    config = json.loads((lm_model_run / "config.json").read_text())
    model, tokenizer = lm.load_model(config["trainer"]["model"])
    rows = lm.token_rows(tokenizer, lm.corpus_documents(config["trainer"]["corpus"], "train"), CONTEXT)[:3]
    positions = torch.tensor([0, 3, 7, CONTEXT - 2])
    with torch.no_grad():
        full = model(input_ids=rows, use_cache=False).logits
        kept = model(input_ids=rows, use_cache=False, logits_to_keep=positions).logits
    assert kept.shape == (3, len(positions), full.shape[-1])
    torch.testing.assert_close(kept, full[:, positions], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kl_positions", [0, 6])
def test_finetune_lowers_the_held_out_kl_and_keeps_the_invariants(lm_model_run, metrics_before, tmp_path, kl_positions):
    before = metrics_before
    source_sha = sha256_file(lm_model_run / "final" / "model.safetensors")
    out = tmp_path / "kl"
    record = finetune_run(lm_model_run, out, FinetuneConfig(tokens=4096, batch_rows=8, lr=2e-3, kl_positions=kl_positions),
                          progress=False)
    assert sha256_file(lm_model_run / "final" / "model.safetensors") == source_sha  # the source run is untouched
    config = json.loads((out / "config.json").read_text())
    assert config["finetune"]["source_run"] == str(lm_model_run) and config["finetune"]["kl_positions_used"] == kl_positions
    assert config["hsae"] == json.loads((lm_model_run / "config.json").read_text())["hsae"]
    log = [json.loads(line) for line in (out / "finetune.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1] == record and record["tokens"] == 4096
    layer = HSAELayer.from_pretrained(out / "final")
    norms = torch.linalg.vector_norm(layer.W_dec, dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)  # unit decoder rows
    after = evaluate_run(out, tokens=1024, progress=False)
    assert after["healthy"], after["health_reasons"]
    assert after["kl_div_with_sae"] < 0.95 * before["kl_div_with_sae"]


def test_pruned_features_do_not_move(tmp_path, lm_model_run):
    config = json.loads((lm_model_run / "config.json").read_text())
    layer = HSAELayer.from_pretrained(lm_model_run / "final")
    layer.prune(torch.tensor([1, 70]))  # a bottom feature, and a middle feature with its children
    run = write_run(tmp_path / "pruned", layer, config["trainer"])
    finetune_run(run, tmp_path / "out", FinetuneConfig(tokens=1024, batch_rows=8, lr=1e-2), progress=False)
    tuned = HSAELayer.from_pretrained(tmp_path / "out" / "final")
    pruned = ~layer.path_mask
    assert pruned.sum() > 2
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(getattr(tuned, name)[pruned], getattr(layer, name)[pruned]), name
        assert not torch.equal(getattr(tuned, name)[~pruned], getattr(layer, name)[~pruned]), name


def test_the_command_writes_a_run_that_hsae_eval_reads(lm_model_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert hsae_main(["finetune", str(lm_model_run), "--out", str(out), "--tokens", "512", "--kl-positions", "4",
                      "--quiet"]) == 0
    assert "last step" in capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "model.safetensors").is_file()
    # a second fine-tune into the same directory would overwrite a result: refused
    assert hsae_main(["finetune", str(lm_model_run), "--out", str(out), "--tokens", "512", "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--kl-weight", "1.5"], "kl_weight"),
    (["--lr", "0"], "lr"),
    (["--tokens", "0"], "tokens"),
    (["--kl-positions", "-1"], "kl_positions"),
    (["--bogus", "1"], "unknown"),
])
def test_bad_options_are_named(lm_model_run, tmp_path, capsys, flags, message):
    assert hsae_main(["finetune", str(lm_model_run), "--out", str(tmp_path / "x"), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_run_without_a_language_model_is_refused(tmp_path):
    x = torch.randn(256, D_MODEL)
    run = write_run(tmp_path / "npy", fit_layer(HSAEConfig(d_model=D_MODEL, level_sizes=(16, 4), k=(4, 2)), x),
                    {"data": "synthetic"})
    with pytest.raises(ValueError, match="not a language-model run"):
        finetune_run(run, tmp_path / "out", FinetuneConfig(tokens=64), progress=False)
    with pytest.raises(ValueError, match="the run itself"):
        finetune_run(run, run, FinetuneConfig(tokens=64), progress=False)
    assert not (tmp_path / "out").exists()
