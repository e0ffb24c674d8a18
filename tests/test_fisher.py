"""The output-Fisher metric (hsae_fast.data.fisher): its estimate against the exact Fisher of a small
model, the metric's square root, the fold that makes a layer trained on A x a layer of x with the same
codes, and training with `fisher_weight` end to end."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from hsae_fast import HSAEConfig
from hsae_fast.data import open_source
from hsae_fast.losses import fvu
from hsae_fast.data import lm
from hsae_fast.data.fisher import (FISHER_FILE, TransformedSource, estimate_fisher, fisher_for_cache, fold_transform,
                                   load_fisher, metric_transform)
from hsae_fast.train.checkpoint import load_checkpoint
from helpers import random_layer
from run_dirs import CONTEXT, tiny_lm


def random_psd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(d, rank or d, generator=gen, dtype=torch.float64)
    return B @ B.T * torch.linspace(0.01, 3, rank or d, dtype=torch.float64).mean()


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.9])
def test_metric_transform_is_the_square_root_of_the_metric(weight):
    d = 13
    G = random_psd(d, 0, rank=5)  # low rank, as a sampled Fisher of few positions can be
    A, A_inv = metric_transform(G, weight)
    M = (1 - weight) * torch.eye(d, dtype=torch.float64) + weight * G * d / G.trace()
    torch.testing.assert_close(A @ A, M, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A, A.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(A @ A_inv, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-9)
    if weight == 0:
        assert torch.equal(A, torch.eye(d, dtype=torch.float64))


def test_metric_transform_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="fisher_weight=1"):
        metric_transform(torch.eye(3), 1.0)
    with pytest.raises(ValueError, match="shape"):
        metric_transform(torch.ones(3, 4), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        metric_transform(torch.full((3, 3), float("nan")), 0.5)
    with pytest.raises(ValueError, match="trace"):
        metric_transform(torch.zeros(3, 3), 0.5)


@pytest.mark.parametrize("train_mode", [False, True])
def test_the_folded_layer_of_x_has_the_codes_of_the_trained_layer_of_A_x(train_mode):
    cfg = HSAEConfig(d_model=24, level_sizes=(45, 9, 3), k=(6, 3, 2))
    trained = random_layer(cfg, "torch", torch.float64, seed=3).double()
    with torch.no_grad():
        trained.threshold.copy_(torch.tensor([0.4, 0.3, 0.2]))
    A, A_inv = metric_transform(random_psd(24, 1), 0.6)
    folded = copy.deepcopy(trained)
    fold_transform(folded, A, A_inv)
    x = torch.randn(77, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    trained.train(train_mode), folded.train(train_mode)
    with torch.no_grad():
        want = trained(x @ A.T)
        got = folded(x)
    for w, g in zip(want.levels, got.levels):
        active = w.vals > 0
        assert torch.equal(active, g.vals > 0)
        assert torch.equal(w.idx[active], g.idx[active])
        torch.testing.assert_close(g.vals, w.vals, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.x_hat, want.x_hat @ A_inv.T, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(folded.W_dec, trained.W_dec)


def small_vocab_gpt2(vocab: int = 23, d: int = 8):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=d, n_layer=2, n_head=2, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


def exact_fisher(model, layer: int, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """E_n[sum_m sum_y p_m(y) g g^T], g = d log p_m(y) / d h_n: every output position, every token."""
    d = model.config.n_embd
    G, count = torch.zeros(d, d, dtype=torch.float64), 0
    for row, row_keep in zip(rows, keep):
        leaf = []

        def as_leaf(hidden):
            hidden = hidden.detach().requires_grad_()
            leaf.append(hidden)
            return hidden

        with lm.patched_layer(model, layer, as_leaf):
            log_p = model(input_ids=row[None]).logits[0, :-1].double().log_softmax(-1)
        h = leaf[0]
        per_input = torch.zeros(row.shape[0], d, d, dtype=torch.float64)
        for m in range(log_p.shape[0]):
            if not row_keep[m]:
                continue
            for y in range(log_p.shape[1]):
                (g,) = torch.autograd.grad(log_p[m, y], h, retain_graph=True)
                g = g[0].double()
                per_input += log_p[m, y].exp().detach() * g[:, :, None] * g[:, None, :]
        G += per_input[row_keep].sum(0)
        count += int(row_keep.sum())
    return G / count


def test_the_sampled_fisher_estimates_the_exact_one():
    model = small_vocab_gpt2()
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 23, (3, 7), generator=gen)
    special = rows == 1  # a "special" token id: neither an input nor an output position counts
    exact = exact_fisher(model, 1, rows, ~special)
    many = rows.repeat(400, 1)
    sampled, count = estimate_fisher(model, 1, many, special.repeat(400, 1), positions_per_row=0, batch_rows=200)
    assert count == int((~special).sum()) * 400
    cos = float((sampled * exact).sum() / (sampled.norm() * exact.norm()))
    assert cos > 0.99, cos
    assert abs(float(sampled.trace() / exact.trace()) - 1) < 0.05
    # three of the six output positions per batch, scaled back: the same Fisher
    subset, _ = estimate_fisher(model, 1, many, special.repeat(400, 1), positions_per_row=3, batch_rows=10, seed=2)
    assert abs(float(subset.trace() / exact.trace()) - 1) < 0.1
    assert float((subset * exact).sum() / (subset.norm() * exact.norm())) > 0.97


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    folder, corpus, model, tokenizer = tiny_lm(root)
    cache = lm.cache_activations(str(folder), 1, out_dir=root / "cache", corpus=str(corpus), context=CONTEXT,
                                 shard_tokens=8 * CONTEXT, batch_rows=4, progress=False)
    path = fisher_for_cache(cache, tokens=40 * CONTEXT, positions_per_row=8, progress=False, model=model, tokenizer=tokenizer)
    return cache, path


def test_training_in_the_fisher_metric_folds_into_a_layer_of_x(tiny_cache, tmp_path):
    from hsae_fast.train.run import run as run_training
    from hsae_fast import HSAELayer

    cache, path = tiny_cache
    assert path == cache / FISHER_FILE
    G, info = load_fisher(path)
    assert G.shape == (32, 32) and info["layer"] == "1" and torch.allclose(G, G.T)
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-9 * float(G.trace())
    fields = {"data": str(cache), "tokens": 2048, "batch_size": 256, "lr": 1e-2, "checkpoint_every": 100,
              "fisher_weight": 0.7, "refine": False, "progress": False, "eval_tokens": 512}
    out = tmp_path / "run"
    metrics = run_training({"level_sizes": [48, 12, 3], "k": [6, 3, 2]}, fields, out)["hsae"]
    final = HSAELayer.from_pretrained(out / "final", backend="torch")
    # the last checkpoint is the layer of A x; final/ is it folded
    tensors, _, _ = load_checkpoint(out / "checkpoints")
    trained = HSAELayer.from_pretrained(out / "final", backend="torch")
    trained.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    A, A_inv = metric_transform(G, 0.7)
    fold_transform(trained, A, A_inv)
    for name in ("W_enc", "W_dec", "b_dec", "b_enc", "threshold"):
        torch.testing.assert_close(getattr(final, name), getattr(trained, name), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["trainer"]["fisher_weight"] == 0.7
    assert not torch.allclose(final.W_dec, tensors["model.W_dec"])
    # the reported FVU is of x itself, what the folded layer reconstructs
    source = open_source(str(cache))
    x = source.sample(512, 1)
    with torch.no_grad():
        assert metrics["fvu"] == pytest.approx(float(fvu(x, final.eval()(x).x_hat)), rel=1e-4)
    # and the trainer read A x
    A_T = A.T.float()
    torch.testing.assert_close(TransformedSource(source, A).sample(64, 3), source.sample(64, 3) @ A_T)
    first = next(TransformedSource(source, A).batches(32, seed=4))
    torch.testing.assert_close(first, next(source.batches(32, seed=4)) @ A_T)


def test_fisher_weight_without_a_fisher_file_is_named(tmp_path, tiny_cache):
    from hsae_fast.train.run import run as run_training

    cache, _ = tiny_cache
    fields = {"data": str(cache), "tokens": 512, "batch_size": 256, "fisher_weight": 0.5,
              "fisher_file": str(tmp_path / "none.safetensors"), "progress": False}
    with pytest.raises(FileNotFoundError, match="python -m hsae_fast.data.fisher"):
        run_training({"level_sizes": [48, 12, 3], "k": [6, 3, 2]}, fields, tmp_path / "run")
    with pytest.raises(ValueError, match="fisher_weight"):
        run_training({"level_sizes": [48, 12, 3], "k": [6, 3, 2]}, dict(fields, fisher_weight=1.0), tmp_path / "run2")
    with pytest.raises(ValueError, match="input_norm"):
        run_training({"level_sizes": [48, 12, 3], "k": [6, 3, 2], "input_norm": "token"}, fields, tmp_path / "run3")
