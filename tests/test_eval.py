"""`hsae eval`: SPEC 7 sums against dense float64 formulas, batch-size independence, CE/KL splicing,
the end-to-end LM run, and the health verdict that must fail a broken model."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.cli import main as hsae_main
from hsae_fast.eval import CodeStats, evaluate_run, health_verdict
from hsae_fast.eval.lm_scores import ModelPreservation
from hsae_fast.data import lm
from helpers import densify, random_layer
from run_dirs import HOOK_LAYER, shared_lm_run


def dense_codes(layer, levels) -> torch.Tensor:
    """(N, F) float64 codes, for the reference formulas only."""
    return torch.cat(densify(layer, levels)[1], dim=1)


def reference_metrics(layer, x, x_hat, dense) -> dict:
    x, x_hat = x.double(), x_hat.double()
    mu = x.mean(0)
    cfg = layer.cfg
    out = {
        "explained_variance": 1 - ((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum(),
        "mse": ((x - x_hat) ** 2).sum(1).mean(),
        "cossim": torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-8).mean(),
        "l2_ratio": (x_hat.norm(dim=1) / x.norm(dim=1)).mean(),
        "relative_reconstruction_bias": (x_hat ** 2).sum() / (x * x_hat).sum(),
        "l0": (dense != 0).double().sum(1).mean(),
        "l1": dense.abs().sum(1).mean(),
    }
    on = dense != 0
    density = on.double().mean(0)
    out["density"] = density
    out["l0_per_level"] = [float(on[:, o : o + s].double().sum(1).mean()) for o, s in zip(cfg.level_offsets, cfg.level_sizes)]
    hcs, chance = [], []
    for l in range(cfg.num_levels - 1):
        o, s = cfg.level_offsets[l], cfg.level_sizes[l]
        child_on = on[:, o : o + s] & layer.path_mask[o : o + s]
        parent_on = on[:, layer.parent[o : o + s]]
        hcs.append(float((child_on & parent_on).sum().double() / child_on.sum().double()))
        chance.append(float((child_on.double() * density[layer.parent[o : o + s]]).sum() / child_on.sum()))
    out["hcs_per_pair"], out["hcs_chance_per_pair"] = hcs, chance
    return out


@pytest.fixture(scope="module")
def ungated():
    """A random, partly pruned, ungated HSAE (HCS < 1) and data: every SPEC 7 sum is exercised."""
    cfg = HSAEConfig(d_model=24, level_sizes=(48, 12, 4), k=(6, 3, 2), gating="none")
    layer = random_layer(cfg, "torch", torch.float32, seed=3).eval()
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(4)) * 2 + 1
    with torch.no_grad():
        out = layer(x)
    return layer, x, out


def accumulate(layer, x, batch: int, tokens=None, vocab=None) -> CodeStats:
    stats = CodeStats(layer, top_k=3, vocab_size=vocab)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch]
            out = layer(xb)
            stats.update(xb, out.x_hat, out.levels, start, None if tokens is None else tokens[start : start + batch])
    return stats


def test_reconstruction_sparsity_and_hcs_match_dense_formulas(ungated):
    layer, x, out = ungated
    dense = dense_codes(layer, out.levels)
    want = reference_metrics(layer, x, out.x_hat, dense)
    stats = accumulate(layer, x, batch=300)
    got = {**stats.reconstruction(), **stats.sparsity(), **stats.hierarchy()}
    for key in ("explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0", "l1"):
        assert got[key] == pytest.approx(float(want[key]), rel=1e-6), key
    assert got["l0_per_level"] == pytest.approx(want["l0_per_level"], rel=1e-9)
    assert got["hcs_per_pair"] == pytest.approx(want["hcs_per_pair"], rel=1e-9)
    assert got["hcs_chance_per_pair"] == pytest.approx(want["hcs_chance_per_pair"], rel=1e-9)
    assert 0 < got["hcs"] < 1, "an ungated random model is not consistent by construction"
    torch.testing.assert_close(stats.density(), want["density"])
    cfg = layer.cfg
    for l, (o, s) in enumerate(zip(cfg.level_offsets, cfg.level_sizes)):
        alive = layer.path_mask[o : o + s]
        assert got["frac_dead_per_level"][l] == pytest.approx(float((want["density"][o : o + s][alive] == 0).double().mean()))
        assert sum(got["density_histograms"][l]["counts"]) + got["density_histograms"][l]["dead"] == int(alive.sum())


def test_no_value_depends_on_the_batch_size(ungated):
    layer, x, _ = ungated
    tokens = torch.randint(0, 7, (x.shape[0],), generator=torch.Generator().manual_seed(5))
    whole, pieces = accumulate(layer, x, 300, tokens, vocab=7), accumulate(layer, x, 37, tokens, vocab=7)
    for part in ("reconstruction", "sparsity", "hierarchy", "specificity"):
        a, b = getattr(whole, part)(), getattr(pieces, part)()
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or _close(a, b), part
    torch.testing.assert_close(whole.top_vals, pieces.top_vals)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_top_activations_and_token_specificity_match_dense(ungated):
    layer, x, out = ungated
    dense = dense_codes(layer, out.levels)
    tokens = torch.randint(0, 7, (x.shape[0],), generator=torch.Generator().manual_seed(6))
    stats = accumulate(layer, x, 41, tokens, vocab=7)
    top = dense.topk(3, dim=0)
    fired = (dense != 0).sum(0)
    for f in range(layer.cfg.dict_size):
        n = min(3, int(fired[f]))
        torch.testing.assert_close(stats.top_vals[f, :n].double(), top.values[:n, f], rtol=1e-6, atol=1e-6)
        assert set(stats.top_index[f, :n].tolist()) <= set((dense[:, f] != 0).nonzero().squeeze(1).tolist())
    hist = torch.zeros(layer.cfg.dict_size, 7)
    for t in range(7):
        hist[:, t] = (dense[tokens == t] != 0).sum(0)
    spec = stats.specificity(min_count=5)
    for l, (o, s) in enumerate(zip(layer.cfg.level_offsets, layer.cfg.level_sizes)):
        h = hist[o : o + s]
        scored = h.sum(1) >= 5
        p = h[scored] / h[scored].sum(1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
        assert spec["features_scored"][l] == int(scored.sum())
        if scored.any():
            assert spec["token_entropy"][l] == pytest.approx(float(entropy.mean()), rel=1e-5)
            assert spec["top_token_share"][l] == pytest.approx(float(p.max(1).values.mean()), rel=1e-5)
    f = int(fired.argmax())
    assert stats.top_tokens(f, 2)[0] == (int(hist[f].argmax()), int(hist[f].max()))


def test_health_verdict_flags_each_kind_of_broken_model():
    good = {"explained_variance": 0.9, "l0": 10.0, "l0_per_level": [6.0, 3.0, 1.0], "ce_loss_without_sae": 4.0,
            "ce_loss_with_sae": 4.1, "ce_loss_with_ablation": 20.0, "kl_div_with_sae": 0.1, "kl_div_with_ablation": 15.0}
    assert health_verdict(good) == (True, [])
    broken = {
        "explained_variance": ({"explained_variance": -0.4}, "explained_variance=-0.4"),
        "dead level": ({"l0_per_level": [6.0, 3.0, 0.0]}, "level 2 has l0=0"),
        "zero l0": ({"l0": 0.0, "l0_per_level": [0.0, 0.0, 0.0]}, "l0=0"),
        "ce": ({"ce_loss_with_sae": 25.0}, "no better than zeroing"),
        "kl": ({"kl_div_with_sae": 16.0}, "kl_div_with_sae=16"),
        "nan": ({"explained_variance": float("nan")}, "not a finite number"),
    }
    for name, (change, reason) in broken.items():
        healthy, reasons = health_verdict({**good, **change})
        assert not healthy and any(reason in r for r in reasons), (name, reasons)


@pytest.fixture(scope="module")
def lm_model_run(tmp_path_factory):
    return shared_lm_run(tmp_path_factory, "eval")


def test_splicing_the_activation_itself_changes_nothing(lm_model_run):
    config = json.loads((lm_model_run / "config.json").read_text())["trainer"]
    model, tokenizer = lm.load_model(config["model"])
    rows = lm.token_rows(tokenizer, lm.corpus_documents(config["corpus"], "eval"), 16)[:3]
    special = lm.special_mask(rows, lm.special_token_ids(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    hidden = lm.layer_activations(model, HOOK_LAYER, rows)
    identity = ModelPreservation()
    identity.update(model, HOOK_LAYER, rows, special, logits, hidden[~special])
    got = identity.results()
    scored = ~special[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][scored], rows[:, 1:][scored])
    assert got["ce_loss_without_sae"] == pytest.approx(float(ce), rel=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(got["ce_loss_without_sae"], rel=1e-5)
    assert abs(got["kl_div_with_sae"]) < 1e-5 and got["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert got["kl_div_with_ablation"] > 1e-3 and got["ce_positions"] == int(scored.sum())
    # Splicing in zeros is the ablation: the splice acts, and on exactly the ablated positions.
    zeros = ModelPreservation()
    zeros.update(model, HOOK_LAYER, rows, special, logits, torch.zeros_like(hidden[~special]))
    spliced_zeros = zeros.results()
    assert spliced_zeros["ce_loss_with_sae"] == pytest.approx(got["ce_loss_with_ablation"], rel=1e-6)
    assert spliced_zeros["kl_div_with_sae"] == pytest.approx(got["kl_div_with_ablation"], rel=1e-5)


def test_eval_of_an_lm_run_writes_metrics_and_contexts(lm_model_run):
    metrics = evaluate_run(lm_model_run, progress=False)
    saved = json.loads((lm_model_run / "metrics.json").read_text())
    for key in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score",
                "kl_div_with_sae", "kl_div_with_ablation", "explained_variance", "mse", "cossim", "l0", "l1",
                "l0_per_level", "l1_per_level", "frac_dead_per_level", "hcs_per_pair", "hcs_chance_per_pair",
                "specificity", "density_histograms", "healthy", "health_reasons"):
        assert key in saved, key
    assert metrics["healthy"], metrics["health_reasons"]
    assert metrics["hcs_per_pair"] == [1.0, 1.0], "hard gating is consistent by construction"
    assert 0 < metrics["explained_variance"] < 1 and metrics["kl_div_with_sae"] < metrics["kl_div_with_ablation"]
    contexts = (lm_model_run / "eval" / "top_contexts.md").read_text()
    assert "## Level 2" in contexts and "## Level 0" in contexts and contexts.count("**") > 20


def test_a_broken_model_fails_eval(lm_model_run, tmp_path, capsys):
    for name, breakage, reason in (
        ("silent", lambda layer: layer.b_enc.fill_(-1e4), "no feature ever fires"),
        ("exploding", lambda layer: layer.W_dec.mul_(60), "explained_variance="),
    ):
        run = tmp_path / name
        shutil.copytree(lm_model_run, run)
        layer = HSAELayer.from_pretrained(run / "final")
        with torch.no_grad():
            breakage(layer)
        layer.save_pretrained(run / "final")
        assert hsae_main(["eval", str(run), "--quiet"]) == 2
        saved = json.loads((run / "metrics.json").read_text())
        assert saved["healthy"] is False and any(reason in r for r in saved["health_reasons"]), saved["health_reasons"]
        assert "UNHEALTHY" in capsys.readouterr().out


def test_eval_of_an_activation_file_run_reports_the_non_lm_subset(tmp_path):
    from run_dirs import fit_layer, write_run
    import numpy as np

    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(8)) @ torch.randn(16, 16, generator=torch.Generator().manual_seed(9))
    np.save(tmp_path / "acts.npy", x.numpy())
    layer = fit_layer(HSAEConfig(d_model=16, level_sizes=(32, 8, 2), k=(4, 2, 1)), x)
    run = write_run(tmp_path / "run", layer, {"data": str(tmp_path / "acts.npy")})
    metrics = evaluate_run(run, tokens=1500, progress=False)
    assert metrics["n_tokens"] == 1500 and metrics["kind"] == "activations"
    assert not any(k.startswith(("ce_", "kl_")) for k in metrics) and "specificity" not in metrics
    assert metrics["healthy"] and 0 < metrics["explained_variance"] < 1 and metrics["hcs"] == 1.0
    with pytest.raises(ValueError, match="tokens=0: must be a positive int"):  # not the default, silently
        evaluate_run(run, tokens=0, progress=False)


def test_a_run_trained_on_an_lm_cache_folder_is_an_lm_run(tmp_path):
    from hsae_fast.eval import load_run
    from run_dirs import write_run

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"model": "some/model", "layer": 4, "corpus": "shakespeare", "context": 128}))
    layer = HSAELayer(HSAEConfig(d_model=8, level_sizes=(8, 2), k=(2, 1)))
    run = load_run(write_run(tmp_path / "run", layer, {"data": str(cache)}))
    assert run.is_lm and run.lm == {"model": "some/model", "layer": 4, "corpus": "shakespeare", "context": 128}
    plain = load_run(write_run(tmp_path / "plain", layer, {"data": "synthetic"}))
    assert not plain.is_lm


def sparsify_or_skip():
    """sparsify through the peer module (which switches its Triton decode off on CPU), or skip."""
    from hsae_fast.eval.peers import import_sparsify

    try:
        return import_sparsify()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def test_a_sparsify_coder_as_a_flat_layer_computes_its_x_hat_and_codes():
    from hsae_fast.eval.peers import sparse_coder_to_layer

    _, SparseCoder, SparseCoderConfig = sparsify_or_skip()
    torch.manual_seed(0)
    sae = SparseCoder(16, SparseCoderConfig(activation="topk", num_latents=64, k=5, normalize_decoder=False), "cpu", torch.float32)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # rows not unit-norm: the conversion must not assume it
    layer = sparse_coder_to_layer(sae, backend="torch")
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        theirs, ours = sae(x), layer(x)
    torch.testing.assert_close(ours.x_hat, theirs.sae_out, atol=1e-5, rtol=1e-5)
    indices, values = ours.codes[0]
    theirs_dense = torch.zeros(40, 64).scatter_(1, theirs.latent_indices, theirs.latent_acts)
    ours_dense = torch.zeros(40, 64).scatter_add_(1, indices, values)
    torch.testing.assert_close(ours_dense, theirs_dense, atol=1e-5, rtol=1e-5)
    assert layer.cfg.num_levels == 1 and layer.cfg.selection == "token" and layer.cfg.k == (5,)


def test_the_sparsify_peer_trains_into_a_run_that_hsae_eval_scores(tmp_path):
    sparsify_or_skip()
    pytest.importorskip("schedulefree")
    import numpy as np
    from hsae_fast.eval.peers import train_sparsify

    gen = torch.Generator().manual_seed(5)
    atoms = torch.randn(48, 16, generator=gen)
    codes = torch.rand(4000, 48, generator=gen) * (torch.rand(4000, 48, generator=gen) < 0.06)
    np.save(tmp_path / "acts.npy", (codes @ atoms + 3).numpy())
    final = train_sparsify(tmp_path / "acts.npy", tmp_path / "peer", dict_size=64, k=4, tokens=30 * 256,
                           batch_size=256, log_every=10, progress=False)
    assert final["steps"] == 30 and final["tokens"] == 30 * 256
    log = [json.loads(line) for line in (tmp_path / "peer" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["fvu"] < log[0]["fvu"]
    metrics = evaluate_run(tmp_path / "peer", tokens=2000, progress=False, backend="torch")
    assert metrics["healthy"] and metrics["explained_variance"] > 0.3 and 0 < metrics["l0"] <= 4
    # A wall-time budget stops the run: a budget below one step's time gives exactly one step.
    assert train_sparsify(tmp_path / "acts.npy", tmp_path / "short", dict_size=64, k=4, seconds=1e-9,
                          batch_size=256, progress=False)["steps"] == 1


def test_the_comparison_table_puts_each_runs_metrics_in_its_column(tmp_path):
    from hsae_fast.eval.compare import comparison_table

    for name, ev, secs in (("a", 0.91, 12.0), ("b", 0.5, None)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"explained_variance": ev, "l0_per_level": [30.0, 8.0],
                                                       "ce_loss_increase": float("nan"), "n_tokens": 8192}))
        if secs:
            (run / "final_metrics.json").write_text(json.dumps({"tokens": 1024, "steps": 1, "train_seconds": secs}))
    lines = comparison_table([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert lines[0] == "| metric | a | b |"
    assert "| explained variance | 0.910 | 0.500 |" in lines
    assert "| L0 per level (bottom first) | 30.0 / 8.0 | 30.0 / 8.0 |" in lines
    assert "| CE increase (nats) | - | - |" in lines and "| training seconds | 12.0 | - |" in lines
    with pytest.raises(FileNotFoundError, match="hsae eval"):
        comparison_table([tmp_path])
