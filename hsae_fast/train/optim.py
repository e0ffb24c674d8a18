"""Optimizer pieces that keep SPEC 2 and 3 invariants: AdamW that never moves a pruned feature,
unit-norm decoder rows with the parallel gradient removed, and the data-driven `b_dec` init."""
from __future__ import annotations

import torch

# Parameters with one row (or entry) per feature: the ones a pruned feature owns.
FEATURE_PARAMS = ("W_enc", "b_enc", "W_dec", "edge_weight")
DECAYED_PARAMS = ("W_enc", "W_dec")


class MaskedAdamW(torch.optim.AdamW):
    """AdamW over a layer's trainable parameters, with decoupled weight decay on the weight
    matrices only, that restores the rows of pruned features after every step: neither a stale
    moment, weight decay nor anything else can move a pruned feature (SPEC 2)."""

    def __init__(self, layer, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0):
        self.layer = layer
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in DECAYED_PARAMS], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in DECAYED_PARAMS], "weight_decay": 0.0},
        ]
        # fused: torch's one-pass AdamW kernel (CPU and CUDA), elementwise, so the same arithmetic on
        # every run and a resumed run is bit-identical. The CPU default, a loop of separate ops per
        # tensor, took 2 s of a 2.5 s step at F=65536 (bench/README.md).
        super().__init__(groups, lr=lr, betas=betas, fused=True)
        self._feature_params = [p for n, p in named if n in FEATURE_PARAMS]

    @torch.no_grad()
    def step(self, closure=None):
        pruned = ~self.layer.path_mask
        if not pruned.any():
            return super().step(closure)
        kept = [p[pruned].clone() for p in self._feature_params]
        result = super().step(closure)
        for p, rows in zip(self._feature_params, kept):
            p[pruned] = rows
        return result


@torch.no_grad()
def remove_parallel_decoder_grad(layer) -> None:
    """Project each decoder row's gradient onto the row's tangent space (g -= (g . w) w / |w|^2):
    the renormalization after the step would undo the parallel part anyway."""
    W, g = layer.W_dec, layer.W_dec.grad
    if g is None:
        return
    # In place, no F x d temporary: `g -= (g * W).sum(1) / W.pow(2).sum(1) * W` took 57 ms of a
    # 224 ms step at F=17472, d=576 (more than the sparse decode's whole backward); this takes 8.
    coef = row_dots(g, W).unsqueeze(1)
    coef /= torch.linalg.vector_norm(W, dim=1, keepdim=True).square_().clamp_min_(1e-12)
    g.addcmul_(coef, W, value=-1.0)


def row_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """(a * b).sum(1), bit for bit, through one cache-sized buffer: the product of two F x d
    matrices as one temporary costs a fresh allocation's page faults (4x slower here, 2 cores)."""
    if a.device.type != "cpu":  # the caching allocator has no page faults; a loop would launch F / rows kernels
        return torch.linalg.vecdot(a, b, dim=1)
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    buf = torch.empty(min(rows, a.shape[0]), a.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], rows):
        stop = min(start + rows, a.shape[0])
        chunk = buf[: stop - start]
        torch.mul(a[start:stop], b[start:stop], out=chunk)
        torch.sum(chunk, 1, out=out[start:stop])
    return out


@torch.no_grad()
def renormalize_decoder(layer) -> None:
    """Unit-norm decoder rows for unpruned features (pruned rows never change)."""
    W = layer.W_dec
    norms = torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min_(1e-12)
    # Dividing a pruned row by exactly 1 leaves it bit-identical, without the boolean gathers and
    # scatter of `W[mask] = W[mask] / ...` (67 ms of a 224 ms step at F=17472, d=576).
    W.div_(torch.where(layer.path_mask.unsqueeze(1), norms, torch.ones_like(norms)))


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimizing the sum of Euclidean distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iterations):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * max(1.0, float(y.norm())):
            return new
        y = new
    return y


@torch.no_grad()
def init_b_dec(layer, sample: torch.Tensor, how: str) -> None:
    """b_dec from data: "geometric_median" (robust to heavy tails), "mean", or "zero"."""
    if how == "zero":
        layer.b_dec.zero_()
        return
    sample = sample.reshape(-1, sample.shape[-1])
    center = geometric_median(sample) if how == "geometric_median" else sample.double().mean(0)
    layer.b_dec.copy_(center.to(layer.b_dec))
