"""Row gradients (`HSAELayer.row_grads`): backward leaves W_enc's and W_dec's gradients as sparse
COO tensors of the rows the batch touched, and the trainer's row update steps from them. Checked:
every backend against the float64 reference (poisoned outputs, every dtype and case), equality with
the dense gradients, the update bit for bit the dense one's (AuxK's gradients added, pruned rows,
clipping), the trainer's use of it, and compiled code keeping dense gradients."""
import itertools

import pytest
import torch

from cases import CASES, make_config
from helpers import assert_close_to_reference, case_seed, needs_cpp, random_layer, usable_backends
from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.backends import get_backend
from hsae_fast.data.synthetic import SyntheticHierarchy
from hsae_fast.train.config import TrainConfig
from hsae_fast.train.optim import MaskedAdamW, grad_rows
from hsae_fast.train.trainer import Trainer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SELECTIONS = ["batch", "token", "threshold"]


def cpu_backends():
    return [b for b in usable_backends()
            if getattr(get_backend(b), "supports", lambda _d: True)(torch.device("cpu"))]


def row_grad_cases():
    for backend in cpu_backends():
        for dtype in DTYPES:
            for i, case in enumerate(CASES):
                # each case under each selection across the dtypes
                selection = SELECTIONS[(i + DTYPES.index(dtype)) % len(SELECTIONS)]
                if backend == "triton" and dtype != torch.float32:
                    continue  # the interpreter is slow; triton writes dense gradients that the op converts
                yield pytest.param(backend, dtype, case, selection, id=f"{selection}-{case}-{dtype}-{backend}")


@pytest.mark.parametrize("backend, dtype, case, selection", list(row_grad_cases()))
def test_row_gradients_match_reference(backend, dtype, case, selection):
    cfg, N = make_config(case, selection)
    seed = case_seed(backend, dtype, case, selection) + 7
    layer = random_layer(cfg, backend, dtype, seed)
    layer.row_grads = True
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    # run_backend checks each row gradient's form (sparse COO, strictly increasing rows, finite values)
    assert_close_to_reference(layer, x, selection, prefixes=case in ("three_level", "four_level"), seed=seed)


def _grads(layer, x, row_grads, prefixes=True):
    layer.row_grads = row_grads
    for p in layer.parameters():
        p.grad = None
    out = layer(x, return_prefixes=prefixes)
    target = out.prefixes if prefixes else out.x_hat
    (target.float() * torch.linspace(-1, 1, target.numel()).reshape(target.shape)).sum().backward()
    return {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend, dtype", [(b, t) for b in cpu_backends() for t in (torch.float32, torch.bfloat16)
                                            if b != "triton" or t == torch.float32])  # the interpreter is slow
def test_row_gradients_are_the_dense_gradients(backend, dtype):
    """The same numbers as the dense gradients (bit for bit: the same sums in the same order), on
    the touched rows only: every nonzero row of the dense gradient is among them, pruned ones never."""
    cfg = HSAEConfig(d_model=24, level_sizes=(120, 24, 6), k=(6, 3, 2), selection="batch")
    layer = random_layer(cfg, backend, dtype, seed=11)  # some features pruned
    x = torch.randn(45, 24, generator=torch.Generator().manual_seed(12)).to(dtype)
    dense, rows = _grads(layer, x, False), _grads(layer, x, True)
    for name in ("b_enc", "b_dec", "level_gain"):
        assert torch.equal(dense[name], rows[name]), name
    for name in ("W_enc", "W_dec"):
        g = rows[name]
        assert g.layout == torch.sparse_coo and g.sparse_dim() == 1 and g.dtype == dtype, name
        ids = g._indices()[0]
        assert ids.numel() < cfg.dict_size, f"{name}: every row touched, nothing to skip in this case"
        assert torch.equal(g.to_dense(), dense[name]), name
        nonzero = dense[name].abs().sum(1).nonzero().flatten()
        assert torch.isin(nonzero, ids).all(), f"{name}: a nonzero gradient row is missing"
        assert layer.path_mask[ids].all(), f"{name}: a pruned feature's row is in the row gradient"


def test_compiled_code_keeps_dense_gradients():
    cfg = HSAEConfig(d_model=8, level_sizes=(24, 8, 4), k=(4, 2, 1))
    layer = random_layer(cfg, "torch", torch.float32, seed=5, prune_frac=0.0)
    layer.row_grads = True
    x = torch.randn(16, 8)
    compiled = torch.compile(lambda x: (layer(x).x_hat - x).square().sum(), fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    assert layer.W_enc.grad.layout == torch.strided and layer.W_dec.grad.layout == torch.strided


def test_plain_adamw_gets_an_error_and_masked_adamw_steps_anything():
    """row_grads is off by default (torch.optim.AdamW cannot take sparse gradients); MaskedAdamW's
    `step` expands row gradients, so its torch path takes them too."""
    cfg = HSAEConfig(d_model=8, level_sizes=(24, 8, 4), k=(4, 2, 1))
    layers = [HSAELayer(cfg, backend="torch") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    assert not layers[0].row_grads
    x = torch.randn(16, 8)
    opts = [MaskedAdamW(layer, lr=1e-2, row_update=False) for layer in layers]
    for layer, opt, row_grads in zip(layers, opts, (False, True)):
        _grads(layer, x, row_grads)
        opt.step()
    for name in ("W_enc", "W_dec"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name))
    _grads(layers[1], x, True)
    with pytest.raises(RuntimeError, match="sparse"):
        torch.optim.AdamW(layers[1].parameters(), lr=1e-2).step()


def test_grad_rows_coalesces_contributions_side_by_side():
    values = torch.arange(12.0).reshape(4, 3)
    g = torch.sparse_coo_tensor(torch.tensor([[5, 1, 5, 2]]), values, (8, 3), check_invariants=True)
    v, rows = grad_rows(g)
    assert rows.tolist() == [1, 2, 5]
    assert torch.equal(v, torch.stack([values[1], values[3], values[0] + values[2]]))
    dense = torch.ones(8, 3)
    assert grad_rows(dense) == (dense, None)


@needs_cpp
@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
@pytest.mark.parametrize("unit_decoder", [True, False])
def test_update_from_row_gradients_is_the_dense_update(grad_clip, unit_decoder):
    """MaskedAdamW.update from row gradients against the same update from dense ones: parameters
    and both moments bit for bit over five steps, with weight decay, a pruned feature from the
    second step and a gradient from a second loss (AuxK's shape: sparse rows added side by side)."""
    cfg = HSAEConfig(d_model=20, level_sizes=(60, 12, 3), k=(5, 2, 1))
    torch.manual_seed(3)
    layers = [HSAELayer(cfg, backend="cpp") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [MaskedAdamW(layer, lr=3e-2, weight_decay=0.1) for layer in layers]
    assert all(opt.takes_row_grads() for opt in opts)
    gen = torch.Generator().manual_seed(4)
    for step in range(5):
        x = torch.randn(33, 20, generator=gen) * 2
        if step == 1:
            for layer in layers:
                layer.prune([0, 61])
        for layer, opt, row_grads in zip(layers, opts, (False, True)):
            layer.row_grads = row_grads
            opt.zero_grad(set_to_none=True)
            out = layer(x, return_prefixes=True)
            second = layer(x[:7] * 0.5)  # its own touched rows, accumulated beside the first
            ((out.x_hat - x).pow(2).sum() + out.prefixes.pow(2).mean() + second.x_hat.pow(2).sum()).backward()
            if row_grads:
                assert layer.W_enc.grad.layout == torch.sparse_coo and layer.W_dec.grad.layout == torch.sparse_coo
            opt.update(grad_clip, unit_decoder)
        for name, p0 in layers[0].named_parameters():
            assert torch.equal(p0, getattr(layers[1], name)), f"{name} at step {step}"
        for name in ("W_enc", "W_dec"):
            p0, p1 = getattr(layers[0], name), getattr(layers[1], name)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opts[0].state[p0][key], opts[1].state[p1][key]), f"{name} {key} at step {step}"


@needs_cpp
def test_trainer_uses_row_gradients_and_trains_as_with_dense_ones(tmp_path):
    """The trainer turns row gradients on where its update takes them; with AuxK, the prefix loss and
    clipping all active, training with them is training without them, bit for bit."""
    cfg = HSAEConfig(d_model=16, level_sizes=(40, 8, 2), k=(4, 2, 1), dead_after_tokens=64)
    data = dict(d_model=16, level_sizes=(40, 8, 2), mean_active=(4.0, 2.0, 1.0), seed=1)
    tcfg = TrainConfig(tokens=64 * 10, batch_size=64, log_every=5, checkpoint_every=100, progress=False, backend="cpp",
                       b_dec_init_tokens=256, eval_tokens=256)
    trainers = [Trainer(cfg, tcfg, SyntheticHierarchy(**data), tmp_path / name) for name in ("rows", "dense")]
    assert trainers[0].layer.row_grads
    trainers[1].layer.row_grads = False
    batches = list(itertools.islice(SyntheticHierarchy(**data).batches(64, seed=5), 10))
    for batch in batches:
        parts = [t.train_step(batch) for t in trainers]
        assert parts[0] == parts[1]
    assert parts[0].get("auxk", 0) > 0, "AuxK never ran: the test would not cover its gradients"
    # AuxK's gradients (its dense path, with this few dead features) kept them row gradients
    assert trainers[0].layer.W_enc.grad.layout == trainers[0].layer.W_dec.grad.layout == torch.sparse_coo
    for name, p in trainers[0].layer.named_parameters():
        assert torch.equal(p, getattr(trainers[1].layer, name)), name
    # a float64 trainer has no row update: dense gradients
    torch_cfg = TrainConfig(tokens=640, batch_size=64, progress=False, backend="torch", dtype="float64",
                            b_dec_init_tokens=256, eval_tokens=256)
    assert not Trainer(cfg, torch_cfg, SyntheticHierarchy(**data), tmp_path / "f64").layer.row_grads


@needs_cpp
@pytest.mark.parametrize("sparse_auxk", [False, True])
def test_update_with_auxk_gradients_is_the_dense_update(sparse_auxk):
    """AuxK's gradients on either of its paths (dense products or its sparse ops) added to row
    gradients: the update is bit for bit the one from dense gradients."""
    from hsae_fast.losses import auxk_loss
    cfg = HSAEConfig(d_model=20, level_sizes=(60, 12, 3), k=(5, 2, 1))
    torch.manual_seed(6)
    layers = [HSAELayer(cfg, backend="cpp") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [MaskedAdamW(layer, lr=3e-2, weight_decay=0.1) for layer in layers]
    dead = torch.zeros(75, dtype=torch.bool)
    dead[torch.randperm(75, generator=torch.Generator().manual_seed(7))[:30]] = True
    gen = torch.Generator().manual_seed(8)
    for step in range(3):
        x = torch.randn(33, 20, generator=gen)
        for layer, opt, row_grads in zip(layers, opts, (False, True)):
            layer.row_grads = row_grads
            opt.zero_grad(set_to_none=True)
            out = layer(x)
            aux = auxk_loss(layer, x, out.x_hat, dead, 4, sparse=sparse_auxk)
            ((out.x_hat - x).pow(2).sum() + aux).backward()
            if row_grads:
                assert layer.W_enc.grad.layout == layer.W_dec.grad.layout == torch.sparse_coo
            opt.update(1e-3, True)
        for name, p0 in layers[0].named_parameters():
            assert torch.equal(p0, getattr(layers[1], name)), f"{name} at step {step}"
