"""The post-training refinement (SPEC 8): refined rows with refined parent activations give the
same x_hat, and the move recovers a child's true direction when the parent holds its share."""
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.train.refine import descendants, refine_decoder

from helpers import densify, random_layer


def test_refined_rows_with_refined_parent_activations_reproduce_x_hat():
    cfg = HSAEConfig(d_model=9, level_sizes=(24, 8, 4), k=(6, 3, 2))
    layer = random_layer(cfg, "torch", torch.float64, seed=4, prune_frac=0.1, edges=False).eval()
    x = torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = refine_decoder(layer, [x[:150], x[150:]])
    out = layer(x)
    _, dense = densify(layer, out.levels)
    acts = torch.cat(dense, dim=1)  # (N, F)
    assert result["coef"], "some parent must have co-firing descendants"
    refined_acts = acts.clone()
    for p, (desc, w) in result["coef"].items():  # in refine's order: lower parents first
        refined_acts[:, p] -= refined_acts[:, desc] @ w
    level = torch.repeat_interleave(torch.arange(3), torch.tensor(cfg.level_sizes))
    gain = layer.level_gain.detach()[level]
    x_hat = layer.b_dec.detach() + (refined_acts * gain) @ result["W_dec"].double()
    torch.testing.assert_close(x_hat, out.x_hat.detach(), rtol=1e-9, atol=1e-9)
    assert not torch.equal(result["W_dec"], layer.W_dec.detach())


def test_refine_moves_the_parents_share_into_the_child_row():
    # One parent (id 2) with two children (0, 1). The true child directions are u_c = (p + v_c)/|.|,
    # but the trained model keeps p in the parent: its activation carries the children's share.
    cfg = HSAEConfig(d_model=3, level_sizes=(2, 1), k=(2, 1), gating="hard", selection="token")
    layer = HSAELayer(cfg, backend="torch").double().eval()
    p, v0, v1 = torch.eye(3, dtype=torch.float64)
    with torch.no_grad():
        layer.W_dec.copy_(torch.stack([v0, v1, p]))
        layer.W_enc.copy_(torch.stack([v0, v1, p]))
        layer.b_dec.zero_()
        layer.b_enc.copy_(torch.tensor([0.0, 0.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    a0, a1 = torch.rand(500, generator=gen) + 0.5, torch.rand(500, generator=gen) + 0.5
    own = torch.rand(500, generator=gen) * 0.1 + 1.0
    x = (own + a0 + a1)[:, None] * p + a0[:, None] * v0 + a1[:, None] * v1
    refined = refine_decoder(layer, [x])["W_dec"].double()
    truth = torch.nn.functional.normalize(torch.stack([p + v0, p + v1]), dim=1)
    cos = torch.nn.functional.cosine_similarity(refined[:2], truth, dim=1)
    assert (cos > 0.99).all(), cos
    before = torch.nn.functional.cosine_similarity(layer.W_dec.detach()[:2], truth, dim=1)
    assert (before < 0.75).all()


def test_descendants_walk_the_whole_subtree():
    parent = torch.tensor([4, 4, 5, 5, 6, 6, -1])
    assert sorted(descendants(parent, 6).tolist()) == [0, 1, 2, 3, 4, 5]
    assert sorted(descendants(parent, 4).tolist()) == [0, 1]
    assert descendants(parent, 0).numel() == 0
