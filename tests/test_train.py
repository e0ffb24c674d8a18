"""The trainer's pieces, each shown to do what it says on a tiny synthetic hierarchy."""
import contextlib
import json

import pytest
import torch

from helpers import CPP_OK, needs_cpp
from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.data.synthetic import SyntheticHierarchy
from hsae_fast.train.config import TrainConfig, flat_baseline_config
from hsae_fast.train.optim import (
    MaskedAdamW, geometric_median, init_b_dec, remove_parallel_decoder_grad, renormalize_decoder, row_dots,
)
from hsae_fast.train.schedules import AdaptiveSparsity, feasible_k, lambda_cons, lr_factor, progressive_k
from hsae_fast.train.trainer import Trainer, TrainingDiverged

TINY_DATA = dict(d_model=16, level_sizes=(16, 4, 2), mean_active=(4.0, 2.0, 1.0), seed=1)


def tiny_cfg(**changes):
    base = dict(d_model=16, level_sizes=(16, 4, 2), k=(4, 2, 1))
    base.update(changes)
    return HSAEConfig(**base)


def tiny_train(**changes):
    base = dict(tokens=64 * 12, batch_size=64, log_every=4, checkpoint_every=6, progress=False, backend="torch",
                b_dec_init_tokens=256, eval_tokens=256)
    base.update(changes)
    return TrainConfig(**base)


def make_trainer(tmp_path, cfg=None, resume=False, **train):
    return Trainer(cfg or tiny_cfg(), tiny_train(**train), SyntheticHierarchy(**TINY_DATA), tmp_path, resume=resume)


# ------------------------------------------------------------------ optimizer pieces
def test_masked_adamw_never_moves_pruned_features():
    torch.manual_seed(0)
    layer = HSAELayer(tiny_cfg(), backend="torch")
    opt = MaskedAdamW(layer, lr=1e-2, weight_decay=0.5)
    x = torch.randn(64, 16)

    def step():
        opt.zero_grad()
        layer(x).x_hat.pow(2).sum().backward()
        opt.step()

    step()  # moments now nonzero everywhere
    layer.prune([3, 17])  # a bottom feature, and a middle one with its 4 children
    pruned = ~layer.path_mask
    before = {n: getattr(layer, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "edge_weight")}
    for _ in range(3):
        step()
    for name, old in before.items():
        new = getattr(layer, name).detach()
        assert torch.equal(new[pruned], old[pruned]), f"{name} moved on a pruned feature"
    assert not torch.equal(layer.W_enc.detach()[~pruned], before["W_enc"][~pruned])


def test_decoder_renorm_removes_the_parallel_gradient():
    torch.manual_seed(0)
    layer = HSAELayer(tiny_cfg(), backend="torch")
    layer(torch.randn(32, 16)).x_hat.pow(2).sum().backward()
    remove_parallel_decoder_grad(layer)
    dots = (layer.W_dec.grad * layer.W_dec).sum(1)
    assert dots.abs().max() < 1e-5 * layer.W_dec.grad.norm()
    layer.prune([0])
    with torch.no_grad():
        layer.W_dec.mul_(3.0)
    renormalize_decoder(layer)
    norms = layer.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms[1:], torch.ones(norms.shape[0] - 1))
    assert float(norms[0]) == pytest.approx(3.0)  # pruned rows never change


@needs_cpp
@pytest.mark.parametrize("sizes,k,d", [((16, 4, 2), (4, 2, 1), 16), ((37, 5, 1), (6, 2, 1), 3), ((1,), (1,), 130)])
@pytest.mark.parametrize("grad_clip", [0.0, 1e-3, 1e3])
@pytest.mark.parametrize("unit_decoder", [True, False])
def test_row_update_matches_the_torch_update(sizes, k, d, grad_clip, unit_decoder):
    """MaskedAdamW.update's one pass over W_enc and W_dec rows (csrc/adamw_rows.cpp) against the
    unfused path (projection, clip_grad_norm_, AdamW, renorm) over four steps, with weight decay,
    a pruned feature from the second step (where there are two), and clipping that binds (1e-3) or not (1e3)."""
    torch.manual_seed(len(sizes) * 100 + d)
    layers = [HSAELayer(HSAEConfig(d_model=d, level_sizes=sizes, k=k), backend="torch") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [MaskedAdamW(layer, lr=3e-2, weight_decay=0.1, row_update=row) for layer, row in zip(layers, (True, False))]
    x = torch.randn(29, d) * 3
    for step in range(4):
        if step == 1 and sum(sizes) > 1:
            for layer in layers:
                layer.prune([0])
        raw = None
        for layer, opt in zip(layers, opts):
            opt.zero_grad()
            (layer(x).x_hat - x).pow(2).sum().backward()
            raw = layer.W_dec.grad.clone() if raw is None else raw
            opt.update(grad_clip, unit_decoder)
        # the row path took the matrices: their gradients are as backward left them
        assert torch.equal(layers[0].W_dec.grad, raw)
        kept = layers[0].path_mask
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            fused, torch_path = getattr(layers[0], name).detach(), getattr(layers[1], name).detach()
            torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
        for name in ("W_enc", "W_dec"):
            p0, p1 = getattr(layers[0], name), getattr(layers[1], name)
            for key in ("exp_avg", "exp_avg_sq"):
                fused, torch_path = opts[0].state[p0][key][kept], opts[1].state[p1][key][kept]
                # float32 rounding relative to the tensor's scale: the projection g - c w cancels
                torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-5 * float(torch_path.abs().max()),
                                           msg=lambda m: f"{name} {key} at step {step}: {m}")
            assert float(opts[0].state[p0]["step"]) == step + 1
        # Each step is compared from the same point: carried along, the paths' float32 rounding
        # differences (1e-8 after one step) feed the next gradients, and where a clipped gradient
        # element sits under eps, AdamW multiplies its error by lr / eps (3e6 here): the 1e-3 clip
        # case then drifted past the tolerance on one CPU (session 10's EPYC) and not on another.
        layers[1].load_state_dict(layers[0].state_dict())
        for p0, p1 in zip(layers[0].parameters(), layers[1].parameters()):
            for key, value in opts[0].state[p0].items():
                opts[1].state[p1][key].copy_(value)
    if unit_decoder:
        norms = layers[0].W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms[kept], torch.ones(int(kept.sum())))


@needs_cpp
@pytest.mark.parametrize("in_forward", [False, True])
@pytest.mark.parametrize("unit_decoder", [True, False])
def test_row_update_of_a_step_where_no_feature_fires(in_forward, unit_decoder):
    """A batch where no feature fires gives row gradients with no rows; every row then steps with
    gradient zero (its moments still move it). The update once read such an empty gradient as a dense
    one (its rows tensor had no data pointer) and stepped with whatever its buffer held."""
    cfg = HSAEConfig(d_model=24, level_sizes=(40, 6, 2), k=(5, 2, 1), selection="batch")
    torch.manual_seed(0)
    base = HSAELayer(cfg, backend="cpp").train()
    layers = [HSAELayer(cfg, backend="cpp").train() for _ in range(2)]
    opts = []
    for layer, row in zip(layers, (True, False)):
        layer.load_state_dict(base.state_dict())
        layer.row_grads = row
        opts.append(MaskedAdamW(layer, lr=1e-2, weight_decay=0.1, row_update=row))
    x = torch.randn(33, 24)
    with opts[0].encoder_step_in_forward() if in_forward else contextlib.nullcontext():
        for step in range(3):
            if step == 1:  # from here on every score is below zero: nothing fires
                for layer in layers:
                    with torch.no_grad():
                        layer.b_enc.fill_(-1e3)
            for layer, opt in zip(layers, opts):
                opt.zero_grad()
                out = layer(x)
                assert step == 0 or all(int((v != 0).sum()) == 0 for _, v in out.codes)
                (out.x_hat - x).pow(2).sum().backward()
                opt.update(1.0, unit_decoder, backward_norms=True)
        opts[0].finish_encoder_step()
        for name in ("W_enc", "W_dec"):
            fused, torch_path = getattr(layers[0], name).detach(), getattr(layers[1], name).detach()
            torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("in_forward", [False, True])
def test_a_copied_optimizer_steps_its_copied_layer_as_the_original(how, in_forward):
    """A copy of MaskedAdamW (deepcopy, pickle, torch.save) carries its layer along and steps it as
    the original steps its own, bit for bit (a copy once lost its layer: every method raised)."""
    import copy
    import io

    backend = "cpp" if CPP_OK else "torch"
    torch.manual_seed(0)
    layer = HSAELayer(HSAEConfig(d_model=16, level_sizes=(64, 16, 4), k=(8, 4, 2)), backend=backend).train()
    opt = MaskedAdamW(layer, lr=1e-2, weight_decay=0.1)
    layer.row_grads = opt.takes_row_grads()
    x = torch.randn(32, 16)

    def step(o):
        o.zero_grad()
        (o.layer(x).x_hat - x).pow(2).sum().backward()
        o.update(1.0, True, backward_norms=True)

    with opt.encoder_step_in_forward() if in_forward else contextlib.nullcontext():
        step(opt)
        if how == "deepcopy":
            twin = copy.deepcopy(opt)
        else:
            buffer = io.BytesIO()
            torch.save(opt, buffer)
            buffer.seek(0)
            twin = torch.load(buffer, weights_only=False)
        assert twin.layer is not layer and twin.param_groups[0]["params"][0] is twin.layer.W_dec
        step(opt)
        step(opt)
    for _ in range(2):
        step(twin)
    for p, q in zip(layer.parameters(), twin.layer.parameters()):
        assert torch.equal(p, q)
    assert twin.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


@needs_cpp
def test_row_update_rejects_what_it_cannot_take():
    from hsae_fast.backends import cpp
    ext = cpp.row_update_module()
    W = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="grad must be a contiguous float32"):
        ext.adamw_rows(W, W.double(), W.clone(), W.clone(), None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, 1.0,
                       False, False)
    with pytest.raises(RuntimeError, match=r"exp_avg must have shape \(4, 3\)"):
        ext.adamw_rows(W, W, W[:2].clone(), W.clone(), None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, 1.0,
                       False, False)
    with pytest.raises(RuntimeError, match="keep_rows must be a contiguous bool tensor of 4"):
        ext.adamw_rows(W, W, W.clone(), W.clone(), torch.ones(3, dtype=torch.bool), None, 1e-3, 0.9, 0.999, 1e-8,
                       0.0, 0.1, 0.001, 1.0, False, False)
    # a row gradient's rows: one per gradient row, strictly increasing, inside the matrix
    for rows, why in ((torch.tensor([0, 2, 3]), "of 2 entries"), (torch.tensor([2, 1]), "strictly increasing"),
                      (torch.tensor([1, 1]), "strictly increasing"), (torch.tensor([0, 4]), r"in \[0, 4\)"),
                      (torch.tensor([0, 1], dtype=torch.int32), "int64")):
        with pytest.raises(RuntimeError, match=why):
            ext.adamw_rows(W, W[:2].clone(), W.clone(), W.clone(), None, rows, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1,
                           0.001, 1.0, False, False)
        with pytest.raises(RuntimeError, match=why):
            ext.grad_sq_norm(W[:2].clone(), W, rows)
    with pytest.raises(RuntimeError, match="pass grad_rows"):
        ext.grad_sq_norm(W[:2].clone(), W, None)
    # a float64 layer takes the torch path instead
    layer = HSAELayer(tiny_cfg(), backend="torch").double()
    opt = MaskedAdamW(layer, lr=1e-2)
    layer(torch.randn(8, 16, dtype=torch.float64)).x_hat.pow(2).sum().backward()
    assert opt._row_update_matrices() is None
    opt.update(1.0, True)
    torch.testing.assert_close(layer.W_dec.detach().norm(dim=1), torch.ones(22, dtype=torch.float64))


@pytest.mark.parametrize("F,rows", [(1029, 512), (1, 512), (7, 3), (512, 512)])
def test_row_dots_match_the_product_sum_bit_for_bit(F, rows):
    gen = torch.Generator().manual_seed(F)
    a, b = torch.randn(F, 37, generator=gen), torch.randn(F, 37, generator=gen)
    assert torch.equal(row_dots(a, b, rows=rows), (a * b).sum(1))


def test_geometric_median_resists_outliers():
    gen = torch.Generator().manual_seed(0)
    center = torch.tensor([1.0, -2.0, 0.5])
    x = center + 0.1 * torch.randn(200, 3, generator=gen)
    x[:20] += 50.0  # heavy-tailed outliers drag the mean
    gm = geometric_median(x)
    assert (gm.float() - center).norm() < 0.1 < (x.mean(0) - center).norm()
    # optimality: the sum of unit vectors toward the points vanishes at the median
    unit = torch.nn.functional.normalize(x.double() - gm, dim=1).sum(0)
    assert unit.norm() < 1e-3 * x.shape[0]
    layer = HSAELayer(tiny_cfg(d_model=3, level_sizes=(4, 2, 1), k=(2, 1, 1)))
    init_b_dec(layer, x, "mean")
    torch.testing.assert_close(layer.b_dec.detach(), x.mean(0))
    init_b_dec(layer, x, "zero")
    assert (layer.b_dec == 0).all()


# ------------------------------------------------------------------------ schedules
def test_lr_warmup_and_decay():
    assert lr_factor(0, 100, 0.1, 0.5) == pytest.approx(0.1)
    assert lr_factor(9, 100, 0.1, 0.5) == 1.0 and lr_factor(49, 100, 0.1, 0.5) == 1.0
    assert lr_factor(75, 100, 0.1, 0.5) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.1, 0.5) == pytest.approx(0.02)
    assert lambda_cons(0.0, 2.0, 0.1) == 0.0 and lambda_cons(0.05, 2.0, 0.1) == 1.0 and lambda_cons(0.5, 2.0, 0.1) == 2.0


def test_feasible_k_respects_the_config_rules():
    cfg = tiny_cfg()
    assert feasible_k(cfg, [40, 40, 40]) == (16, 4, 2)  # capped by F_l and by gating
    assert feasible_k(cfg, [8, 2, 1]) == (8, 2, 1)
    assert feasible_k(cfg, [1, 3, 1]) == (2, 2, 1)  # non-increasing upward, gating cap 1 * 4 / 2
    for wanted in ([0.2, 0.1, 0.1], [5.5, 2.4, 1.6], [100, 1, 1]):
        HSAEConfig(**dict(tiny_cfg().to_dict(), k=feasible_k(cfg, wanted)))  # always valid
    assert progressive_k((4, 2, 1), 0.0, 3.0, 0.5) == [12, 6, 3]
    assert progressive_k((4, 2, 1), 0.25, 3.0, 0.5) == [8, 4, 2]
    assert progressive_k((4, 2, 1), 0.9, 3.0, 0.5) == [4, 2, 1]


def test_adaptive_sparsity_raises_k_of_underused_levels():
    adaptive = AdaptiveSparsity(3, target_util=0.9, rate=0.5, max_mult=2.0)
    adaptive.update([0.5, 0.95, float("nan")])
    assert adaptive.mult.tolist() == [1.5, 1.0, 1.0]
    adaptive.update([0.5, 0.95, 1.0])
    assert adaptive.mult.tolist() == [2.0, 1.0, 1.0]  # capped
    adaptive.update([0.95, 0.95, 1.0])
    assert adaptive.mult[0] == pytest.approx(2.0 / 1.5)


# -------------------------------------------------------------------------- trainer
def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss_and_logs_every_field(tmp_path):
    trainer = make_trainer(tmp_path, tokens=64 * 24, lr=1e-2)
    trainer.fit()
    log = _log(tmp_path)
    for key in ("step", "tokens", "loss", "fvu", "l0", "dead_frac", "lr", "elapsed_s"):
        assert key in log[0]
    assert len(log[0]["l0"]) == 3 and len(log[0]["dead_frac"]) == 3
    assert log[-1]["fvu"] < 0.7 * log[0]["fvu"]
    assert log[-1]["step"] == 24 and log[-1]["tokens"] == 64 * 24
    # prefix loss present while w(t) > 0, gone after prefix_until
    assert "prefix" in log[0] and "prefix" not in log[-1]
    norms = trainer.layer.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_progressive_k_starts_dense_and_ends_at_target(tmp_path):
    trainer = make_trainer(tmp_path, k_start_mult=2.0, k_schedule_until=0.5)
    trainer.fit()
    log = _log(tmp_path)
    assert log[0]["k"] == [7, 3, 2] or log[0]["k"][0] > 4
    assert log[-1]["k"] == [4, 2, 1]


def test_adaptive_sparsity_in_training(tmp_path):
    # a level whose features mostly cannot fire stays under the utilization target, so its k grows
    trainer = make_trainer(tmp_path, adaptive_sparsity=True, adapt_every_tokens=128, adapt_target_util=0.99,
                           adapt_rate=0.5)
    with torch.no_grad():
        trainer.layer.b_enc[:12] = -1e4
    trainer.fit()
    assert trainer.adaptive.mult[0] > 1.0
    assert _log(tmp_path)[-1]["k"][0] > 4


def test_pruning_unused_paths_freezes_them(tmp_path):
    trainer = make_trainer(tmp_path, prune_unused=True, prune_after=0.0, prune_window_tokens=128, tokens=64 * 8)
    with torch.no_grad():
        trainer.layer.b_enc[16] = -1e4  # middle feature 16 never fires: pruned with its 4 children
    trainer.fit()
    mask = trainer.layer.path_mask
    assert not mask[16] and not mask[:4].any()  # other features that stayed silent may go too
    assert _log(tmp_path)[-1]["pruned"] >= 5


def test_pruned_parameters_are_bit_identical_after_pruning(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.1, tokens=64 * 10)
    batches = trainer.source.batches(64, 0)
    for _ in range(3):
        trainer.train_step(next(batches))
    trainer.layer.prune([17])
    frozen = {n: getattr(trainer.layer, n).detach()[~trainer.layer.path_mask].clone() for n in ("W_enc", "b_enc", "W_dec")}
    for _ in range(4):
        trainer.train_step(next(batches))
    for name, old in frozen.items():
        assert torch.equal(getattr(trainer.layer, name).detach()[~trainer.layer.path_mask], old)


def test_auxk_revives_dead_features(tmp_path):
    cfg = tiny_cfg(dead_after_tokens=64, aux_coef=1.0, k_aux=4)
    trainer = make_trainer(tmp_path, cfg=cfg, tokens=64 * 10)
    with torch.no_grad():
        trainer.layer.b_enc[4:8] = -3.0  # silent at first: dead after one batch
    before = trainer.layer.W_enc.detach().clone()
    trainer.fit()
    log = _log(tmp_path)
    assert any("auxk" in r for r in log)
    assert not torch.equal(trainer.layer.W_enc.detach()[4:8], before[4:8])
    # without AuxK the silent features get no gradient at all
    plain = make_trainer(tmp_path / "plain", cfg=tiny_cfg(dead_after_tokens=64, aux_coef=0.0), tokens=64 * 10)
    with torch.no_grad():
        plain.layer.b_enc[4:8] = -1e4
    start = plain.layer.W_enc.detach()[4:8].clone()
    plain.fit()
    assert torch.equal(plain.layer.W_enc.detach()[4:8], start)


def test_resume_is_bit_identical(tmp_path):
    # every schedule and tracker on: progressive and adaptive k, consistency warmup, AuxK
    cfg = tiny_cfg(lambda_cons=0.1, dead_after_tokens=128)
    options = dict(k_start_mult=2.0, adaptive_sparsity=True, adapt_every_tokens=128, cons_warmup_frac=0.5,
                   checkpoint_every=5)
    straight = make_trainer(tmp_path / "straight", cfg=cfg, **options)
    straight.fit()

    first = make_trainer(tmp_path / "resumed", cfg=cfg, **options)
    batches = first._batches()
    for _ in range(5):
        first.train_step(next(batches))
    first.save_checkpoint()
    second = make_trainer(tmp_path / "resumed", cfg=cfg, resume=True, **options)
    assert second.step == 5
    second.fit()
    for (name, a), (_, b) in zip(straight.layer.state_dict().items(), second.layer.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    for a, b in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


class _AlteredSource(SyntheticHierarchy):
    """The synthetic data with batch `at` replaced by `alter(batch)`."""

    def __init__(self, at: int, alter, **overrides):
        super().__init__(**overrides)
        self.at, self.alter = at, alter

    def batches(self, batch_size, seed=0, start=0):
        for i, batch in enumerate(super().batches(batch_size, seed, start), start):
            yield self.alter(batch) if i == self.at else batch


def test_nan_loss_stops_with_step_batch_and_checkpoint(tmp_path):
    trainer = Trainer(tiny_cfg(), tiny_train(), _AlteredSource(3, lambda batch: batch * 1e25, **TINY_DATA), tmp_path)
    with pytest.raises(TrainingDiverged, match="step 3") as info:
        trainer.fit()
    assert "nan_batch_step_000000003" in str(info.value)
    saved = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert saved["step"] == 3
    assert (tmp_path / "checkpoints" / "nan_batch_step_000000003.safetensors").is_file()
    # the checkpoint is the state before the step: the thresholds the exploding batch moved are not in it
    clean = make_trainer(tmp_path / "clean")
    batches = clean._batches()
    for _ in range(3):
        clean.train_step(next(batches))
    resumed = make_trainer(tmp_path, resume=True)
    assert torch.equal(resumed.layer.threshold, clean.layer.threshold)


def test_a_new_run_in_an_old_run_folder_replaces_its_checkpoints_and_log(tmp_path):
    """Without resume, a run in a folder holding a longer earlier run removes that run's checkpoints
    and log: its later steps once outlived the new run's checkpoints (pruned as older), and latest.json
    named a deleted file."""
    make_trainer(tmp_path, tokens=64 * 12, checkpoint_every=4, log_every=4).fit()
    make_trainer(tmp_path, tokens=64 * 6, checkpoint_every=2, log_every=2, keep_checkpoints=2).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.json")) == [
        "step_000000004.json", "step_000000006.json"]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 6
    assert [r["step"] for r in _log(tmp_path)] == [2, 4, 6]
    assert make_trainer(tmp_path, resume=True, tokens=64 * 6).step == 6


def test_resume_cuts_the_log_back_to_the_checkpoint_and_logs_the_lr_each_step_used(tmp_path):
    options = dict(tokens=64 * 8, checkpoint_every=4, log_every=1, warmup_frac=0.5)
    first = make_trainer(tmp_path, **options)
    first.fit()
    straight = _log(tmp_path)
    factors = [lr_factor(s, 8, 0.5, first.tcfg.decay_start) * first.tcfg.lr for s in range(8)]
    assert [r["lr"] for r in straight] == pytest.approx(factors)  # the step's lr, not the next one's
    # interrupted after step 6, resumed from the checkpoint at step 4: steps 5 and 6 are logged once
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:6]) + lines[6][:20])  # killed mid-record
    ckpt_dir = tmp_path / "checkpoints"
    for name in ("step_000000008.json", "step_000000008.safetensors"):
        (ckpt_dir / name).unlink()
    (ckpt_dir / "latest.json").write_text(json.dumps({"step": 4, "meta": "step_000000004.json"}))
    make_trainer(tmp_path, resume=True, **options).fit()
    resumed = _log(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["lr"] for r in resumed] == pytest.approx(factors)


def test_prefix_coef_scales_the_prefix_weight_and_zero_turns_it_off(tmp_path):
    strong = make_trainer(tmp_path / "strong", prefix_coef=8.0)
    plain = make_trainer(tmp_path / "plain", prefix_coef=1.0)
    for progress in (0.0, 0.25, 0.49):
        assert strong.loss_weights(progress).prefix == pytest.approx(8 * plain.loss_weights(progress).prefix)
        assert plain.loss_weights(progress).prefix == pytest.approx(1 - progress / 0.5)
    assert strong.loss_weights(0.5).prefix == 0.0
    off = make_trainer(tmp_path / "off", prefix_coef=0.0)
    off.fit()
    assert not any("prefix" in r for r in _log(tmp_path / "off"))
    strong.fit()
    assert "prefix" in _log(tmp_path / "strong")[0]


def test_synthetic_runs_revive_features_dead_for_50k_tokens_unless_told_otherwise():
    from hsae_fast.train.config import resolve_model_config

    synthetic = TrainConfig()
    assert resolve_model_config({}, 128, synthetic).dead_after_tokens == 50_000
    assert resolve_model_config({"level_sizes": (64, 16, 4), "k": (4, 2, 1)}, 128, synthetic).dead_after_tokens == 50_000
    assert resolve_model_config({"dead_after_tokens": 7}, 128, synthetic).dead_after_tokens == 7
    other = resolve_model_config({}, 16, TrainConfig(data="acts.npy"))
    assert other.dead_after_tokens == HSAEConfig(d_model=16, k=(1,), level_sizes=(4,)).dead_after_tokens


def test_synthetic_runs_use_one_cpu_thread_unless_told_otherwise():
    assert TrainConfig().cpu_threads() == 1
    assert TrainConfig(threads=2).cpu_threads() == 2
    assert TrainConfig(data="acts.npy").cpu_threads() == 0  # torch's default
    with pytest.raises(ValueError, match="TrainConfig.threads"):
        TrainConfig(threads=-1)


def test_flat_baseline_matches_dict_size_and_total_l0():
    flat = flat_baseline_config(tiny_cfg())
    assert flat.level_sizes == (22,) and flat.k == (7,) and flat.num_levels == 1


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="TrainConfig.prefix_coef"):
        TrainConfig(prefix_coef=-1.0)
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size="big")
    with pytest.raises(ValueError, match="b_dec_init"):
        TrainConfig(b_dec_init="median")
    with pytest.raises(ValueError, match="--model and --layer"):
        TrainConfig(model="gpt2")


def _squared_error(layer: HSAELayer, x: torch.Tensor, with_auxk: bool) -> torch.Tensor:
    """The summed squared error of layer(x), plus AuxK with every third feature counted dead."""
    from hsae_fast.losses import auxk_loss

    out = layer(x)
    loss = (out.x_hat - x).pow(2).sum()
    if with_auxk:
        loss = loss + auxk_loss(layer, x, out.x_hat, torch.arange(layer.cfg.dict_size) % 3 == 0, 2)
    return loss


def _row_gradient_twin(base: HSAELayer) -> tuple:
    """A cpp copy of `base` with row gradients, and its MaskedAdamW (lr 1e-2, weight decay 0.1)."""
    layer = HSAELayer(base.cfg, backend="cpp").train()
    layer.load_state_dict(base.state_dict())
    layer.row_grads = True
    return layer, MaskedAdamW(layer, lr=1e-2, weight_decay=0.1)


@needs_cpp
@pytest.mark.parametrize("sizes,k,d", [((40, 6, 2), (5, 2, 1), 24), ((37,), (4,), 130), ((29, 3, 1), (4, 2, 1), 1)])
@pytest.mark.parametrize("unit_decoder", [True, False])
@pytest.mark.parametrize("change", [None, "values in place", "sparse op", "auxk"])
def test_backward_row_norms_give_the_update_it_computes_itself(sizes, k, d, unit_decoder, change):
    """`update(backward_norms=True)` takes the clip norm's row norms from the cpp backward (ops/row_norms.py):
    the same parameters, bit for bit, as computing them in the update, with a binding clip; a gradient
    changed after backward (in place through it, by a sparse op, or by AuxK's second contribution) is
    not taken for the rows the backward wrote."""
    from hsae_fast.ops import row_norms

    cfg = HSAEConfig(d_model=d, level_sizes=sizes, k=k, selection="batch")
    torch.manual_seed(0)
    base = HSAELayer(cfg, backend="cpp").train()
    x = torch.randn(33, d)
    final = []
    for use_norms in (False, True):
        layer, opt = _row_gradient_twin(base)
        for step in range(3):
            row_norms.clear()
            opt.zero_grad(set_to_none=True)
            _squared_error(layer, x, with_auxk=change == "auxk").backward()
            assert layer.W_enc.grad.layout == torch.sparse_coo
            if change == "values in place":
                layer.W_dec.grad._values().mul_(3.0)
            elif change == "sparse op":
                layer.W_enc.grad = layer.W_enc.grad * 0.5
            taken = {}
            if use_norms:  # what update takes, looked at without taking it
                for name in ("W_enc", "W_dec"):
                    g = getattr(layer, name).grad.coalesce() if change == "auxk" else getattr(layer, name).grad
                    taken[name] = row_norms._entries.get(g._values().data_ptr()) is not None
            opt.update(1e-3, unit_decoder, backward_norms=use_norms)  # 1e-3: the clip binds
            if use_norms and change is None:
                assert all(taken.values()), "the backward's row norms were not there to take"
        final.append({n: p.detach().clone() for n, p in layer.named_parameters()})
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), f"{name} differs with the backward's row norms"


@needs_cpp
@pytest.mark.parametrize("sizes,k,d,selection", [((40, 6, 2), (5, 2, 1), 24, "batch"), ((37,), (4,), 130, "batch"),
                                                 ((29, 3, 1), (4, 2, 1), 1, "token"), ((90, 12, 3), (7, 3, 1), 17, "token"),
                                                 ((400, 100, 4), (2, 1, 1), 9, "token")])
@pytest.mark.parametrize("event", [None, "auxk", "prune", "state_dict", "load", "copy", "eval forward"])
def test_encoder_step_in_forward_is_the_step_taken_in_update(sizes, k, d, selection, event):
    """`MaskedAdamW.encoder_step_in_forward`: W_enc's step left for the next forward's cpp encode to take
    row by row gives the parameters and moments of taking it in `update`, bit for bit, over steps with
    a binding clip, weight decay, a changing lr, and something else reading W_enc in between."""
    import copy

    cfg = HSAEConfig(d_model=d, level_sizes=sizes, k=k, selection=selection)
    torch.manual_seed(0)
    base = HSAELayer(cfg, backend="cpp").train()
    # 19 tokens: most parents active in the small trees; the last tree's middle level has 100 parents,
    # of which these tokens activate few (its rows then take the step in one pass before the encode)
    xs = torch.randn(5, 19, d)
    final, snapshots = [], []
    for fused in (False, True):
        layer, opt = _row_gradient_twin(base)
        snapshot = []
        with opt.encoder_step_in_forward() if fused else contextlib.nullcontext():
            for step, x in enumerate(xs):
                for group in opt.param_groups:
                    group["lr"] = 1e-2 / (1 + step)
                opt.zero_grad(set_to_none=True)
                _squared_error(layer, x, with_auxk=event == "auxk").backward()
                opt.update(1e-3, True)  # 1e-3: the clip binds
                if fused:  # the step is left pending, not taken
                    assert opt._pending_encoder_step is not None
                if step == 2 and event == "prune":
                    layer.prune([1, cfg.dict_size - 1])
                elif step == 2 and event == "state_dict":  # what is saved is the stepped W_enc and moments
                    saved = opt.state_dict()["state"]
                    snapshot = [layer.state_dict()["W_enc"].clone()] + [
                        saved[i][key].clone() for i in saved for key in ("exp_avg", "exp_avg_sq")]
                elif step == 2 and event == "load":
                    opt.load_state_dict(opt.state_dict())
                elif step == 2 and event == "copy":
                    twin = copy.deepcopy(layer)
                    assert twin._pending_encoder is None
                    snapshot = [twin.W_enc.detach().clone()]
                elif step == 2 and event == "eval forward":
                    with torch.no_grad():
                        layer.eval()(xs[0])
                    layer.train()
        assert opt._pending_encoder_step is None and layer._pending_encoder is None  # taken on leaving
        snapshots.append(snapshot)
        state = opt.state[layer.W_enc]
        final.append({**{n: p.detach().clone() for n, p in layer.named_parameters()},
                      "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()})
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), f"{name} differs with the step taken in the forward"
    for eager, fused in zip(*snapshots):
        assert torch.equal(eager, fused), f"{event}: a copy or state_dict saw W_enc before its step"


@needs_cpp
@pytest.mark.parametrize("tokens", [8, 64])
def test_encoder_step_in_forward_is_taken_by_the_encode(tokens):
    """The forward's encode takes the pending step for every row it reads (a dense level's rows, a routed
    level's children of active parents: as its runs read them where most parents are active, else all
    its rows first), before reading them; the other rows wait for the finish."""
    from hsae_fast.backends import cpp

    cfg = HSAEConfig(d_model=12, level_sizes=(40, 6, 2), k=(3, 1, 1))
    torch.manual_seed(0)
    layer = HSAELayer(cfg, backend="cpp").train()
    layer.row_grads = True
    opt = MaskedAdamW(layer, lr=1e-2)
    x = torch.randn(tokens, 12)
    with opt.encoder_step_in_forward():
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            (layer(x).x_hat - x).pow(2).sum().backward()
            opt.update(1.0, True)
        done = opt._pending_encoder_step["done"]
        assert not done.any()
        before = layer.W_enc.detach().clone()
        with torch.no_grad():
            out = layer(x)
        taken = done.bool()
        middle = out.levels[1]
        active_parents = middle.idx[middle.vals != 0].unique()
        read = torch.isin(layer.parent[:40], active_parents)  # the bottom rows the routed encode scored
        assert taken[40:].all() and taken[:40][read].all()
        changed = (layer.W_enc.detach() != before).any(1)
        assert changed.any() and not (changed & ~taken).any()  # only taken rows moved (a row with no
        # gradient yet, moments zero, takes a step of zero)
        assert cpp._pending_args(layer.W_enc)  # still registered until the finish
    assert done.all() and opt._pending_encoder_step is None  # the rest taken on leaving the block
    assert not cpp._pending_args(layer.W_enc)


@needs_cpp
def test_row_norms_are_not_taken_for_other_rows():
    """Rows that reuse a remembered gradient's storage (the gradient pool) but are not the rows it held."""
    from hsae_fast.ops import row_norms

    row_norms.clear()
    values = torch.randn(7, 5)
    norms = values.pow(2).sum(1)
    row_norms.remember(values, norms)
    assert torch.equal(row_norms.take(values, 0, projected=False), norms)
    assert row_norms.take(values, 0, projected=False) is None  # taken once
    row_norms.remember(values, norms)
    values.copy_(torch.randn(7, 5))  # another step's rows in the same storage
    assert row_norms.take(values, 0, projected=False) is None
    row_norms.remember(values, norms)
    assert row_norms.take(values, 1, projected=False) is None  # changed in place through the gradient
    row_norms.remember(values, norms)
    assert row_norms.take(values[:6], 0, projected=False) is None  # another shape
    row_norms.remember(values, norms)
    assert row_norms.take(values, 0, projected=True) is None  # no projected norms were given
    big = torch.zeros(2**24 + 3, 1)  # sampled past float32's integers (a routed step's rows: 15M floats and more)
    assert row_norms._sample(big).shape == (8,) and row_norms._sample(big[:1]).shape == (1,)


def _with_a_nan(batch):
    batch = batch.clone()
    batch[5, 0] = float("nan")
    return batch


def test_a_nan_in_the_data_stops_like_a_diverged_loss(tmp_path):
    """A NaN in a batch stops training as a diverged loss does (it once ended the run with a ValueError
    and no checkpoint): the batch and the state before the step are saved, and the run resumes from it."""
    trainer = Trainer(tiny_cfg(), tiny_train(), _AlteredSource(2, _with_a_nan, **TINY_DATA), tmp_path)
    with pytest.raises(TrainingDiverged, match="the batch holds NaN or Inf at step 2"):
        trainer.fit()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert (tmp_path / "checkpoints" / "nan_batch_step_000000002.safetensors").is_file()
    assert make_trainer(tmp_path, resume=True).step == 2


def test_train_config_refuses_a_one_token_batch_and_decay_before_warmup_ends():
    with pytest.raises(ValueError, match="batch_size=1: must be >= 2"):
        TrainConfig(batch_size=1, tokens=64)
    with pytest.raises(ValueError, match="decay_start=0.2: must be >= warmup_frac=0.5"):
        TrainConfig(warmup_frac=0.5, decay_start=0.2)
