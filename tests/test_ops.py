"""The registered custom ops: schema, fake (meta) kernels and autograd registration pass
torch.library.opcheck on every usable backend, so torch.compile can trace them."""
import pytest
import torch

from helpers import random_layer, tree_op_inputs, usable_backends
from hsae_fast import HSAEConfig
from hsae_fast.ops import encode_tree, sparse_decode


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("gating", ["hard", "none"])
@pytest.mark.parametrize("selection", ["token", "batch"])
@pytest.mark.parametrize("row_grads", [False, True])
def test_opcheck_encode_tree(backend, gating, selection, row_grads):
    cfg = HSAEConfig(d_model=6, level_sizes=(12, 4, 2), k=(3, 2, 1), gating=gating, selection=selection)
    layer = random_layer(cfg, backend, torch.float32, seed=2)  # nonzero edges: the parent-gradient chain runs
    args = tree_op_inputs(layer, torch.randn(5, 6), selection)
    torch.library.opcheck(encode_tree, args)
    vals, _scores, idx, slot = encode_tree(*args)
    xc, W, _b, edge = args[:4]
    torch.library.opcheck(torch.ops.hsae_fast.encode_tree_backward.default, (
        torch.randn_like(vals), idx, vals.detach(), slot, xc.detach(), W.detach(), edge.detach(), args[11],
        True, True, True, backend, row_grads))
    # b_dec given (x without a gradient): xc detached, b_dec's gradient from the op, g_xc summed in it
    b_dec = layer.b_dec.detach().clone().requires_grad_(True)
    torch.library.opcheck(encode_tree, (xc.detach(), *args[1:], b_dec))
    torch.library.opcheck(torch.ops.hsae_fast.encode_tree_backward.default, (
        torch.randn_like(vals), idx, vals.detach(), slot, xc.detach(), W.detach(), edge.detach(), args[11],
        True, True, True, backend, row_grads, True))


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("prefixes", [False, True])
def test_opcheck_sparse_decode(backend, prefixes):
    cfg = HSAEConfig(d_model=6, level_sizes=(12, 4), k=(3, 1), selection="token")
    layer = random_layer(cfg, backend, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    idx = torch.cat([torch.randint(0, 12, (5, 3), generator=gen), torch.randint(12, 16, (5, 1), generator=gen)], 1)
    vals = torch.rand(5, 4, generator=gen).requires_grad_(True)
    args = (idx, vals, layer.W_dec, layer.level_gain, layer.b_dec, [3, 1], prefixes, backend, False, prefixes)
    torch.library.opcheck(sparse_decode, args)


@pytest.mark.parametrize("input_norm", ["none", "token"])
def test_compiled_training_step_has_no_graph_break(input_norm):
    cfg = HSAEConfig(d_model=8, level_sizes=(24, 8, 4), k=(4, 2, 1), input_norm=input_norm)
    layer = random_layer(cfg, "torch", torch.float32, seed=5, prune_frac=0.0)
    x = torch.randn(16, 8) * torch.logspace(-2, 3, 16)[:, None]

    def step(x):
        out = layer(x)
        return (out.x_hat - x).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    assert torch.isfinite(loss) and layer.W_enc.grad is not None and layer.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", usable_backends())
def test_opcheck_auxk_ops(backend):
    """AuxK's ops run eagerly: the dead set is data-dependent (a graph break in any case) and their
    weight gradients are sparse COO, which AOTAutograd does not trace; the rest of opcheck holds."""
    from hsae_fast.ops.auxk import dead_decode, dead_topk
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    gen = torch.Generator().manual_seed(6)
    xc = torch.randn(5, 6, generator=gen)
    W = torch.randn(12, 6, generator=gen).requires_grad_(True)
    b = torch.randn(12, generator=gen).requires_grad_(True)
    dead_ids = torch.tensor([1, 4, 5, 9, 11])
    torch.library.opcheck(dead_topk, (xc, W, b, dead_ids, 3, backend), test_utils=utils)
    _scores, local = dead_topk(xc, W, b, dead_ids, 3, backend)
    vals = torch.rand(5, 3, generator=gen).requires_grad_(True)
    torch.library.opcheck(dead_decode, (local, vals, W, dead_ids, backend), test_utils=utils)


@pytest.mark.parametrize("backend, dtype", [(b, t) for b in usable_backends() for t in (torch.float32, torch.float64)
                                            if b != "triton" or t == torch.float32])
def test_sparse_decode_grad_active_only(backend, dtype):
    """grad_active_only: the values' gradient is the full one at nonzero values and 0 at the others;
    every other gradient is unchanged (float64 too, where the cpp backend runs the torch functions)."""
    cfg = HSAEConfig(d_model=6, level_sizes=(12, 4), k=(3, 1), selection="token")
    layer = random_layer(cfg, backend, dtype, seed=3)
    gen = torch.Generator().manual_seed(8)
    idx = torch.cat([torch.randint(0, 12, (7, 3), generator=gen), torch.randint(12, 16, (7, 1), generator=gen)], 1)
    vals = (torch.rand(7, 4, generator=gen) * (torch.rand(7, 4, generator=gen) < 0.5)).to(dtype)
    upstream = torch.randn(7, 6, generator=gen).to(dtype)
    grads = []
    for active_only in (False, True):
        v = vals.clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        out = sparse_decode(idx, v, layer.W_dec, layer.level_gain, layer.b_dec, [3, 1], False, backend, False,
                            active_only)
        (out * upstream).sum().backward()
        grads.append([v.grad, layer.W_dec.grad, layer.level_gain.grad, layer.b_dec.grad])
    full, active = grads
    torch.testing.assert_close(active[0], full[0].masked_fill(vals == 0, 0), rtol=0, atol=0)
    assert (full[0][vals == 0] != 0).any(), "the case has no zero value with a nonzero gradient to drop"
    for a, b in zip(active[1:], full[1:]):
        torch.testing.assert_close(a, b)
