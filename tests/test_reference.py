"""The float64 reference itself: differentiable (gradcheck), and SPEC 4's rules on hand-made cases."""
import pytest
import torch

from hsae_fast import HSAEConfig
from hsae_fast.reference import reference_forward
from hsae_fast.tree import default_parent

from helpers import random_layer


def _args(layer, x):
    return (x, layer.W_enc, layer.b_enc, layer.W_dec, layer.b_dec, layer.edge_weight, layer.level_gain,
            layer.threshold.double(), layer.parent, layer.path_mask, layer.cfg)


@pytest.mark.parametrize("selection", ["batch", "token", "threshold"])
@pytest.mark.parametrize("gating", ["hard", "none"])
def test_gradcheck_every_input(selection, gating):
    cfg = HSAEConfig(d_model=5, level_sizes=(12, 6, 3), k=(3, 2, 1), gating=gating, selection=selection)
    layer = random_layer(cfg, "torch", torch.float64, seed=11)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "edge_weight", "level_gain")
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *p):
        out = reference_forward(x, p[0], p[1], p[2], p[3], p[4], p[5], layer.threshold.double(), layer.parent,
                                layer.path_mask, cfg, selection=selection)
        return out.x_hat

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-7, atol=1e-6)


def test_hard_gating_child_needs_active_parent():
    cfg = HSAEConfig(d_model=2, level_sizes=(4, 2), k=(2, 1), selection="token")
    W = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]], dtype=torch.float64)
    parent = default_parent(cfg)  # children 0,1 -> 4 ; children 2,3 -> 5
    assert parent.tolist() == [4, 4, 5, 5, -1, -1]
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    out = reference_forward(x, W, torch.zeros(6, dtype=torch.float64), W, torch.zeros(2, dtype=torch.float64),
                            torch.zeros(6, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                            torch.zeros(2), parent, torch.ones(6, dtype=torch.bool), cfg)
    assert out.acts[1].tolist() == [[3.0, 0.0]]  # top: feature 4 wins (3 > 1)
    # bottom: only children of feature 4 (ids 0, 1) are candidates, though 2, 3 score 1 > 0
    assert out.acts[0].tolist() == [[3.0, 3.0, 0.0, 0.0]]


def test_batch_selection_keeps_k_times_n_over_the_batch_and_edges_add_parent_activation():
    cfg = HSAEConfig(d_model=1, level_sizes=(2, 1), k=(1, 1), selection="batch", cap=2)
    W = torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.float64)
    edge = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    out = reference_forward(x, W, torch.zeros(3, dtype=torch.float64), W, torch.zeros(1, dtype=torch.float64),
                            edge, torch.ones(2, dtype=torch.float64), torch.zeros(2),
                            default_parent(cfg), torch.ones(3, dtype=torch.bool), cfg)
    # top: both tokens active (k*N = 2 slots); bottom: scores [1 + .5*1, 2], [3 + .5*3, 6]: the two
    # largest of the batch are 6 and 4.5, both in token 1, so token 0 keeps nothing at the bottom.
    assert out.acts[1].flatten().tolist() == [1.0, 3.0]
    assert out.acts[0].tolist() == [[0.0, 0.0], [4.5, 6.0]]


def test_pruned_features_never_fire():
    cfg = HSAEConfig(d_model=4, level_sizes=(8, 4, 2), k=(4, 2, 1), selection="token", gating="none")
    layer = random_layer(cfg, "torch", torch.float64, seed=5, prune_frac=0.0)
    layer.prune([9])  # a mid-level feature: its children 2 and 3 go with it
    assert layer.path_mask.tolist().count(False) == 3
    out = reference_forward(torch.randn(50, 4, dtype=torch.float64), *_args(layer, None)[1:])
    for l, a in enumerate(out.acts):
        pruned = ~layer.path_mask[cfg.level_offsets[l]: cfg.level_offsets[l] + cfg.level_sizes[l]]
        assert (a[:, pruned] == 0).all()
