"""input_norm="token": every token scaled to norm sqrt(d) before the SPEC forward, the output scaled
back, and the training loss taken on the scaled tokens. Checked against the plain layer (input_norm
"none", same weights) run on explicitly scaled inputs, on every backend."""
from __future__ import annotations

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.losses import LossWeights, total_loss
from hsae_fast.train.optim import geometric_median, init_b_dec

from helpers import PARAM_NAMES, assert_close, case_seed, random_layer, usable_backends

CFG = HSAEConfig(d_model=19, level_sizes=(45, 9, 3), k=(6, 3, 2), input_norm="token")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _pair(backend: str, dtype, seed: int):
    """The token-normalized layer and a plain layer with the same weights."""
    layer = random_layer(CFG, backend, dtype, seed)
    plain = HSAELayer(CFG.replace(input_norm="none"), backend=backend).to(dtype)
    plain.load_state_dict(layer.state_dict())
    plain.edge_weight.requires_grad_(layer.edge_weight.requires_grad)
    return layer, plain


def _tokens(n: int, d: int, seed: int, dtype) -> torch.Tensor:
    """Rows whose norms span four decades (the massive-activation case), one zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 10 ** (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 4 - 1)
    x[n // 2] = 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", usable_backends())
def test_forward_is_the_plain_layer_on_scaled_tokens(backend, dtype):
    seed = case_seed("input_norm_forward", backend, dtype)
    layer, plain = _pair(backend, dtype, seed)
    x = _tokens(37, CFG.d_model, seed, dtype)
    norms = x.double().norm(dim=1, keepdim=True)
    scale = torch.where(norms > 0, CFG.d_model ** 0.5 / norms, 1.0)
    # the plain layer on the very tensor the normalizing layer feeds its SPEC forward
    scaled = x * layer.input_scale(x)
    for selection in ("token", "batch", "threshold"):
        out = layer(x, selection=selection, return_prefixes=True)
        want = plain(scaled, selection=selection, return_prefixes=True)
        assert_close(f"{selection} input_scale", out.input_scale, scale, TOL[dtype])
        for (i, v), (wi, wv) in zip(out.codes, want.codes):
            assert torch.equal(i, wi) and torch.equal(v, wv), f"{selection}: codes differ from the scaled input's"
        for name, got, ref in (("x_hat", out.x_hat, want.x_hat), ("prefixes", out.prefixes, want.prefixes)):
            # relative to each token's own norm: a tiny token's reconstruction is tiny
            assert_close(f"{selection} {name}", got.double() * scale, ref.double(), TOL[dtype], scale=CFG.d_model ** 0.5)
    zero = x.shape[0] // 2  # factor 1: the zero token's reconstruction is the plain layer's
    assert_close("zero token", layer(x, selection="token").x_hat[zero], plain(x[zero : zero + 1], selection="token").x_hat[0], TOL[dtype])
    for (i, v), (wi, wv) in zip(layer.encode(x, selection="token"), plain.encode(scaled, selection="token")):
        assert torch.equal(i, wi) and torch.equal(v, wv), "encode: codes differ from the scaled input's"


def test_output_scales_with_the_input():
    """x -> c x gives x_hat -> c x_hat for any c > 0: the model sees only directions."""
    layer, _ = _pair("torch", torch.float64, 5)
    x = _tokens(23, CFG.d_model, 5, torch.float64)
    x = torch.cat([x[:11], x[12:]])  # not the zero token: factor 1 there
    base = layer(x, selection="token").x_hat
    for c in (1e-3, 7.0, 4e4):
        torch.testing.assert_close(layer(c * x, selection="token").x_hat, c * base, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", usable_backends())
def test_training_loss_and_gradients_are_the_scaled_problem(backend):
    """total_loss on raw tokens through the normalizing layer equals the plain layer's loss on the
    scaled tokens (FVU, prefix and AuxK terms), with the same parameter gradients."""
    seed = case_seed("input_norm_loss", backend)
    layer, plain = _pair(backend, torch.float32, seed)
    x = _tokens(41, CFG.d_model, seed, torch.float32)
    scaled = (x.double() * layer.input_scale(x.double())).float()
    dead = torch.zeros(CFG.dict_size, dtype=torch.bool)
    dead[::3] = True
    weights = LossWeights(prefix=0.7, aux=0.25)
    results = []
    for model, inputs in ((layer, x), (plain, scaled)):
        model.zero_grad(set_to_none=True)
        out = model(inputs, selection="batch", return_prefixes=True)
        loss, parts = total_loss(model, inputs, out, weights, dead)
        loss.backward()
        results.append((loss, parts, {n: getattr(model, n).grad for n in PARAM_NAMES}))
    (loss, parts, grads), (want, want_parts, want_grads) = results
    assert set(parts) == {"fvu", "prefix", "auxk"}
    assert_close("loss", loss, want, 1e-5)
    for name in PARAM_NAMES:
        assert_close(f"grad {name}", grads[name], want_grads[name], 1e-4)


def test_gradient_reaches_the_input_through_the_scale():
    """The factor is part of the function: the input gradient matches finite differences."""
    layer, _ = _pair("torch", torch.float64, 11)
    x = _tokens(5, CFG.d_model, 11, torch.float64)[:2].requires_grad_(True)
    torch.autograd.gradcheck(lambda t: layer(t, selection="token").x_hat, (x,))


def test_b_dec_starts_at_the_scaled_tokens_median():
    layer = HSAELayer(CFG, backend="torch")
    sample = _tokens(200, CFG.d_model, 3, torch.float32)
    init_b_dec(layer, sample, "geometric_median")
    scaled = sample.double() * layer.input_scale(sample.double())
    torch.testing.assert_close(layer.b_dec.double(), geometric_median(scaled), rtol=1e-5, atol=1e-5)


def test_config_names_a_bad_input_norm_and_checkpoints_keep_it(tmp_path):
    with pytest.raises(ValueError, match="input_norm='layer'"):
        CFG.replace(input_norm="layer")
    layer, _ = _pair("torch", torch.float32, 2)
    layer.save_pretrained(tmp_path)
    again = HSAELayer.from_pretrained(tmp_path, backend="torch")
    assert again.cfg.input_norm == "token"
    x = _tokens(9, CFG.d_model, 2, torch.float32)
    layer.eval(), again.eval()
    assert torch.equal(layer(x).x_hat, again(x).x_hat)
    # a config written before the field existed loads as "none"
    data = CFG.to_dict()
    del data["input_norm"]
    assert HSAEConfig.from_dict(data).input_norm == "none"
