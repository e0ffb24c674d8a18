"""The implementations a case times, behind one interface, and the check that each computes the model.

Every implementation offers `encode(x)`, `decode(codes)` (codes from its own encode), `loss(x)` (the
forward with autograd: mean squared error of x_hat) and `step(x)` (forward, backward, AdamW).
Ours: one per backend that `hsae_fast.available_backends()` reports usable on the device, so a new
backend is benchmarked as soon as it lands. The dense reference (`reference_forward`, straight-through
selection) and the peers (EleutherAI sparsify, SAELens; flat models only) use the same weights.
Before anything is timed, each implementation is checked once against the float64 reference on the
case's weights (`check`): a fast wrong kernel fails the benchmark instead of winning it.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch

from hsae_fast import HSAELayer
from hsae_fast.backends import available_backends, get_backend
from hsae_fast.reference import reference_forward

from helpers import (  # tests/helpers.py: the one comparison helper (bench/conftest.py puts tests/ on sys.path)
    SELECTION_TOLERANCE, TOLERANCE, assert_close, assert_close_to_reference, check_selection, upstream,
)

from .cases import ModelSpec
from .timing import steady_fused_adamw

LEARNING_RATE = 1e-4
# Rows of the case's input the float64 check runs on: it scores every feature in float64 with autograd,
# so rows shrink as F grows (256 rows at F=16384, 64 at F=65536, never under 16).
CHECK_ELEMENTS = 256 * 16384
MIN_CHECK_ROWS = 16
PEERS = ("sparsify", "saelens")


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).float().pow(2).sum(-1).mean()


def base_layer(spec: ModelSpec, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> HSAELayer:
    """The weights every implementation of a case starts from: the layer's own init (tied, unit-norm
    rows) with small random biases so that the bias paths are exercised and checked too."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        layer = HSAELayer(spec.config(d), backend="torch", device=device)
        with torch.no_grad():
            layer.b_enc.normal_(0.0, 0.05)
            layer.b_dec.normal_(0.0, 0.05)
    return layer.to(dtype)


class Implementation:
    """Common step: AdamW on the implementation's parameters, gradients set to None before the forward."""

    name: str
    encode_unavailable: Optional[str] = None  # why encode is not timed, where it is not

    def parameters(self):
        raise NotImplementedError

    def make_optimizer(self) -> None:
        trained = [p for p in self.parameters() if p.requires_grad]
        # fused: torch's one-pass AdamW kernel, on CPU and CUDA alike, for every candidate. Torch's
        # default for CPU tensors is a per-tensor loop of separate ops that took 2.0 s of a 2.5 s
        # step at F=65536 here: it would measure the optimizer, not the SAEs.
        self.optimizer = steady_fused_adamw(trained, LEARNING_RATE)
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def step(self, x: torch.Tensor) -> None:
        self.zero_grad()
        self.loss(x).backward()
        self.optimizer.step()


class OurBackend(Implementation):
    """HSAELayer on one backend, in training mode (batch selection updates the thresholds, as in training)."""

    def __init__(self, backend: str, base: HSAELayer, spec: ModelSpec):
        self.name, self.selection = backend, spec.selection
        self.layer = HSAELayer(base.cfg, backend=backend, device=base.W_enc.device, dtype=base.W_enc.dtype)
        self.layer.load_state_dict(base.state_dict())
        self.layer.train()
        self.make_optimizer()

    def parameters(self):
        return list(self.layer.parameters())

    def encode(self, x):
        return self.layer.encode(x, selection=self.selection)

    def decode(self, codes):
        return self.layer.decode(codes)

    def loss(self, x):
        return mse(self.layer(x, selection=self.selection).x_hat, x)

    def check(self, x, base, seed):
        edges = self.layer.edge_weight
        trains_edges = edges.requires_grad
        edges.requires_grad_(True)  # the helper checks every gradient, the edges' too
        try:
            assert_close_to_reference(self.layer, x, self.selection, seed=seed)
        finally:
            edges.requires_grad_(trains_edges)
            self.zero_grad()
            self.layer.threshold.copy_(base.threshold)  # the check's forward moved them


class DenseReference(Implementation):
    """`reference_forward` in the case's dtype: every feature scored, N x F buffers, autograd backward."""

    encode_unavailable = "reference_forward has no separate encode (it decodes too); the dense encode baseline is matmul+topk"

    def __init__(self, base: HSAELayer, spec: ModelSpec):
        self.name, self.selection = "reference", spec.selection
        self.layer = HSAELayer(base.cfg, backend="torch", device=base.W_enc.device, dtype=base.W_enc.dtype)
        self.layer.load_state_dict(base.state_dict())
        self.make_optimizer()

    def parameters(self):
        return list(self.layer.parameters())

    def _forward(self, x):
        m = self.layer
        return reference_forward(x, m.W_enc, m.b_enc, m.W_dec, m.b_dec, m.edge_weight, m.level_gain, m.threshold,
                                 m.parent, m.path_mask, m.cfg, selection=self.selection)

    def encode(self, x):
        """Dense (N, F_l) activations per level, for the decode timing."""
        return self._forward(x).acts

    def decode(self, acts):
        """The reference's own dense decode: b_dec + sum_l gain_l * a_l @ W_dec_l."""
        m, offsets, sizes = self.layer, self.layer.cfg.level_offsets, self.layer.cfg.level_sizes
        return m.b_dec + sum(m.level_gain[l] * (a @ m.W_dec[offsets[l]:offsets[l] + sizes[l]]) for l, a in enumerate(acts))

    def loss(self, x):
        return mse(self._forward(x).x_hat, x)

    def check(self, x, base, seed):
        """It is the reference: its float64 run is what the others are checked against."""


def _check_flat_peer(base: HSAELayer, x: torch.Tensor, forward, grads_of, seed: int) -> None:
    """A flat TopK peer against the float64 reference on the features it chose: selection (exact up to
    near-ties), activations, x_hat and the gradients of x and of every parameter it has.

    forward(x) -> (x_hat, dense (N, F) activations); grads_of() -> {our parameter name: gradient in our layout}."""
    dtype = base.W_enc.dtype
    tol = TOLERANCE[dtype]
    x = x.detach().clone().requires_grad_(True)
    x_hat, acts = forward(x)
    (x_hat.double() * upstream(x_hat.shape, seed).to(x_hat.device)).sum().backward()
    grads = dict(grads_of(), x=x.grad)
    active = acts.detach() != 0
    params = {n: getattr(base, n).detach().double().requires_grad_(True)
              for n in ("W_enc", "b_enc", "W_dec", "b_dec", "edge_weight", "level_gain")}
    x64 = x.detach().double().requires_grad_(True)
    forced = reference_forward(x64, params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"],
                               params["edge_weight"], params["level_gain"], base.threshold.double(), base.parent,
                               base.path_mask, base.cfg, selection="token", active=[active])
    check_selection(base, forced, SimpleNamespace(active=[active]), "token", SELECTION_TOLERANCE[dtype])
    assert_close("activations", acts.detach(), forced.acts[0], tol)
    assert_close("x_hat", x_hat.detach(), forced.x_hat, tol)
    (forced.x_hat * upstream(x_hat.shape, seed).to(x_hat.device)).sum().backward()
    expected = dict({n: params[n].grad for n in grads if n != "x"}, x=x64.grad)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    for name, g in expected.items():
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close(f"grad {name}", grads[name], g, tol * (4 if low_precision else 1),
                     x64.grad.abs().max().item() if name == "b_dec" and low_precision else 0.0)


class Sparsify(Implementation):
    """EleutherAI sparsify's SparseCoder as a plain TopK SAE (ASSETS.md: these settings match ours)."""

    def __init__(self, base: HSAELayer, spec: ModelSpec):
        from sparsify import SparseCoder, SparseCoderConfig

        self.name = "sparsify"
        cfg = SparseCoderConfig(activation="topk", num_latents=spec.dict_size, k=spec.k_total, normalize_decoder=False)
        self.sae = SparseCoder(base.cfg.d_model, cfg, device=base.W_enc.device, dtype=base.W_enc.dtype)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(base.W_enc)
            self.sae.encoder.bias.copy_(base.b_enc)
            self.sae.W_dec.copy_(base.W_dec)
            self.sae.b_dec.copy_(base.b_dec)
        self.make_optimizer()

    def parameters(self):
        return list(self.sae.parameters())

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, codes):
        return self.sae.decode(codes.top_acts, codes.top_indices)

    def loss(self, x):
        return mse(self.sae(x).sae_out, x)

    def check(self, x, base, seed):
        def forward(x):
            out = self.sae(x)
            acts = torch.zeros(x.shape[0], self.sae.num_latents, dtype=torch.float64, device=x.device)
            return out.sae_out, acts.scatter_(1, out.latent_indices, out.latent_acts.double())

        def grads_of():
            sae = self.sae
            return {"W_enc": sae.encoder.weight.grad, "b_enc": sae.encoder.bias.grad, "W_dec": sae.W_dec.grad,
                    "b_dec": sae.b_dec.grad}

        self.zero_grad()
        _check_flat_peer(base, x, forward, grads_of, seed)
        self.zero_grad()


class SAELens(Implementation):
    """SAELens' TopKTrainingSAE as a plain TopK SAE (ASSETS.md: these settings match ours)."""

    def __init__(self, base: HSAELayer, spec: ModelSpec):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        self.name = "saelens"
        cfg = TopKTrainingSAEConfig(d_in=base.cfg.d_model, d_sae=spec.dict_size, k=spec.k_total,
                                    apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=False,
                                    decoder_init_norm=None, device=str(base.W_enc.device),
                                    dtype=str(base.W_enc.dtype).replace("torch.", ""))
        self.sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            self.sae.W_enc.copy_(base.W_enc.T)
            self.sae.b_enc.copy_(base.b_enc)
            self.sae.W_dec.copy_(base.W_dec)
            self.sae.b_dec.copy_(base.b_dec)
        self.make_optimizer()

    def parameters(self):
        return list(self.sae.parameters())

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, codes):
        return self.sae.decode(codes)

    def loss(self, x):
        return mse(self.sae(x), x)

    def check(self, x, base, seed):
        def forward(x):
            acts = self.sae.encode(x)
            acts = acts.to_dense() if acts.is_sparse else acts
            return self.sae.decode(acts), acts

        def grads_of():
            sae = self.sae
            return {"W_enc": sae.W_enc.grad.T, "b_enc": sae.b_enc.grad, "W_dec": sae.W_dec.grad, "b_dec": sae.b_dec.grad}

        self.zero_grad()
        _check_flat_peer(base, x, forward, grads_of, seed)
        self.zero_grad()


def peer_missing(peer: str) -> Optional[str]:
    """None if the peer imports, else why not (and how to install it)."""
    module = {"sparsify": "sparsify", "saelens": "sae_lens"}[peer]
    try:
        __import__(module)
    except Exception as exc:  # any import failure means: not benchmarkable here
        return f"{module} not importable ({type(exc).__name__}: {exc}); run bench/install_peers.sh"
    return None


def backend_skip_reason(name: str, device: torch.device) -> Optional[str]:
    ok, reason = available_backends()[name]
    if not ok:
        return f"backend unavailable: {reason}"
    try:
        get_backend(name, device)
    except RuntimeError as exc:
        return str(exc)
    if name == "triton" and device.type == "cpu":
        return "Triton on CPU runs only under TRITON_INTERPRET=1, an interpreter: not a benchmark"
    return None


def implementation_plan(spec: ModelSpec, device: torch.device, reference: bool,
                        peers: tuple = PEERS) -> list[tuple[str, Optional[str]]]:
    """[(implementation name, None or why it is skipped)] for one model on this device, in table order."""
    plan = [("reference", None if reference else "dense reference left out of this case (too slow at this size)")]
    plan += [(name, backend_skip_reason(name, device)) for name in available_backends()]
    for peer in PEERS:
        if not spec.flat:
            reason = "peers implement flat TopK only"
        elif peer not in peers:
            reason = "left out of this case (a dense N x F encode: too slow at these sizes)"
        else:
            reason = peer_missing(peer)
        plan.append((peer, reason))
    return plan


def build_implementation(name: str, base: HSAELayer, spec: ModelSpec) -> Implementation:
    if name == "reference":
        return DenseReference(base, spec)
    if name == "sparsify":
        return Sparsify(base, spec)
    if name == "saelens":
        return SAELens(base, spec)
    return OurBackend(name, base, spec)


def check_rows(x: torch.Tensor, dict_size: int) -> torch.Tensor:
    return x[:max(MIN_CHECK_ROWS, CHECK_ELEMENTS // dict_size)]


def sparsify_env_for(device: torch.device) -> None:
    """sparsify decodes with a Triton kernel that fails without a GPU (ASSETS.md): use its eager path."""
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
