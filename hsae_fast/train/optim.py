"""Optimizer pieces that keep SPEC 2 and 3 invariants: AdamW that never moves a pruned feature,
unit-norm decoder rows with the parallel gradient removed, and the data-driven `b_dec` init.
`MaskedAdamW.update` is the trainer's whole update after backward; on CPU it runs the weight
matrices' part as one pass over their rows (csrc/adamw_rows.cpp), the functions below otherwise."""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import torch

from ..backends import cpp
from ..ops import row_norms
from . import host

# Parameters with one row (or entry) per feature: the ones a pruned feature owns.
FEATURE_PARAMS = ("W_enc", "b_enc", "W_dec", "edge_weight")
DECAYED_PARAMS = ("W_enc", "W_dec")


class MaskedAdamW(torch.optim.AdamW):
    """AdamW over a layer's trainable parameters, with decoupled weight decay on the weight
    matrices only, that restores the rows of pruned features after every step: neither a stale
    moment, weight decay nor anything else can move a pruned feature (SPEC 2)."""

    def __init__(self, layer, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, row_update: bool = True):
        self.layer = layer
        self.row_update = row_update  # False: `update` always takes the torch path
        named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in DECAYED_PARAMS], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in DECAYED_PARAMS], "weight_decay": 0.0},
        ]
        # fused: torch's one-pass AdamW kernel (CPU and CUDA), elementwise, so the same arithmetic on
        # every run and a resumed run is bit-identical. The CPU default, a loop of separate ops per
        # tensor, took 2 s of a 2.5 s step at F=65536 (bench/README.md).
        super().__init__(groups, lr=lr, betas=betas, fused=True)
        self._index_layer()
        # On CPU, every step passes over these matrices and their moments whole: on 2 MiB pages that
        # is a page walk per 2 MiB, not per 4 KiB (host.py). Same values, same Parameter objects.
        with torch.no_grad():
            for n, p in named:
                if n in DECAYED_PARAMS and p.is_contiguous():
                    p.data = host.to_huge_pages(p.data)

    def _index_layer(self) -> None:
        """What this optimizer derives from its layer (rebuilt after a copy, whose parameters are new
        objects), and no step pending."""
        named = [(n, p) for n, p in self.layer.named_parameters() if p.requires_grad]
        self._feature_params = [p for n, p in named if n in FEATURE_PARAMS]
        self._matrices = {id(p) for n, p in named if n in DECAYED_PARAMS}  # what `update` may take by rows
        self._fused_encoder = False  # inside `encoder_step_in_forward` with the cpp backend
        self._pending_encoder_step: Optional[dict] = None  # W_enc's step not yet taken by every row

    @contextlib.contextmanager
    def encoder_step_in_forward(self):
        """Within the block, `update` leaves W_enc's step pending (its gradient rows, clip factor and
        scalars) and the next forward takes it row by row as the cpp encode reads each row (the routed
        levels read almost all of W_enc: one pass over it instead of two, the update's traffic next to
        the encode's arithmetic). Rows the forward does not read take it when anything else would read
        them (`finish_encoder_step`: AuxK, a state_dict of the layer or of this optimizer, a copy, the
        next update, the end of the block). Each row takes the step exactly once, with adamw_rows'
        arithmetic: every result is bit for bit the one of taking it in `update`. Code of one's own
        that reads `layer.W_enc` inside the block sees rows one step old: call `finish_encoder_step()`
        first. Only with the cpp backend's row update (CPU, float32, row gradients); a no-op otherwise.
        The trainer runs its loop inside this block."""
        if self._fused_encoder:
            raise RuntimeError("encoder_step_in_forward is already active on this optimizer")
        self._fused_encoder = self.takes_row_grads() and self.layer.backend_for(self.layer.W_enc.device) == "cpp"
        self.layer._pending_encoder = weakref.ref(self)
        try:
            yield self
        finally:
            try:
                self.finish_encoder_step()
            finally:
                self._fused_encoder = False
                self.layer._pending_encoder = None

    @torch.no_grad()
    def finish_encoder_step(self) -> None:
        """Takes W_enc's pending step (see `encoder_step_in_forward`) for every row that has not."""
        z = self._pending_encoder_step
        if z is None:
            return
        W = self.layer.W_enc
        cpp.row_update_module().take_pending_step(W, 0, *(z[k] for k in cpp.PENDING_KEYS))
        cpp.set_pending_step(W, None)
        self._pending_encoder_step = None

    def state_dict(self):
        self.finish_encoder_step()  # the moments as the step leaves them
        return super().state_dict()

    def __getstate__(self):
        # torch's Optimizer pickles its defaults, state and groups only: the layer and the row-update
        # switch go along, so a copy (deepcopy, pickle, torch.save of the optimizer) still works.
        self.finish_encoder_step()
        return {**super().__getstate__(), "layer": self.layer, "row_update": self.row_update}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "layer" in state:  # a copy; torch's load_state_dict calls this too, with the state and groups only
            self._index_layer()

    def load_state_dict(self, state_dict) -> None:
        self.finish_encoder_step()
        super().load_state_dict(state_dict)
        # torch makes the loaded moments fresh tensors; back onto 2 MiB pages (see __init__)
        for p in (p for group in self.param_groups for p in group["params"] if id(p) in self._matrices):
            state = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].is_contiguous():
                    state[key] = host.to_huge_pages(state[key])

    def takes_row_grads(self) -> bool:
        """Whether `update` steps W_enc and W_dec from row gradients (sparse COO, `HSAELayer.row_grads`)
        without making them dense: the row update can run (CPU, float32, the C++ module built)."""
        return self.row_update and cpp.row_update_module() is not None and all(
            p.device.type == "cpu" and p.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous()
            for group in self.param_groups for p in group["params"] if id(p) in self._matrices)

    def _expand_row_grads(self) -> None:
        """Row gradients (sparse COO) made dense, for the torch ops and torch's fused AdamW."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.layout == torch.sparse_coo:
                    p.grad = p.grad.to_dense()

    @torch.no_grad()
    def step(self, closure=None):
        if self.layer.W_enc.grad is not None:  # W_enc steps here (not from `update`, which hides it)
            self.finish_encoder_step()
        self._expand_row_grads()
        pruned = ~self.layer.path_mask
        if not pruned.any():
            return super().step(closure)
        kept = [p[pruned].clone() for p in self._feature_params]
        result = super().step(closure)
        for p, rows in zip(self._feature_params, kept):
            p[pruned] = rows
        return result

    @torch.no_grad()
    def update(self, grad_clip: float = 0.0, unit_decoder: bool = False, backward_norms: bool = False) -> None:
        """The trainer's whole update after backward: with `unit_decoder`, the decoder gradient's
        part along each row removed (`remove_parallel_decoder_grad`); with `grad_clip` > 0, every
        gradient scaled as `torch.nn.utils.clip_grad_norm_` would; this optimizer's step; with
        `unit_decoder`, unit-norm decoder rows (`renormalize_decoder`).

        On CPU with float32 weights and the C++ module built, W_enc and W_dec take all of that in one
        pass over their rows (csrc/adamw_rows.cpp) instead of five or six passes over F x d buffers;
        the result is the same up to float32 rounding, but the gradients are left as backward wrote
        them (unprojected, unclipped) instead of being changed in place. Row gradients
        (`HSAELayer.row_grads`) go in as they are: only their rows are read, and every other row
        steps with gradient zero; elsewhere they are made dense first.

        `backward_norms`: the clip norm takes the row gradients' squared norms that the backward
        computed as it wrote them (ops/row_norms.py; the same bits as computing them here), where
        they still match the gradient; for a caller that changes no gradient between its backward
        and this update (the trainer)."""
        self.finish_encoder_step()  # the last step's rows that no forward read since
        matrices = self._row_update_matrices()
        if matrices is None:
            self._expand_row_grads()
            if unit_decoder:
                remove_parallel_decoder_grad(self.layer)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], grad_clip)
            self.step()
            if unit_decoder:
                renormalize_decoder(self.layer)
            return
        ext = cpp.row_update_module()
        W_dec = self.layer.W_dec
        by_rows = {id(p): grad_rows(p.grad) for p, _ in matrices}  # (values, rows or None)
        scale = 1.0
        if grad_clip > 0:
            sq = 0.0
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if id(p) in by_rows:
                        values, rows = by_rows[id(p)]
                        projected = unit_decoder and p is W_dec
                        cached = row_norms.take(values, p.grad._values()._version, projected) if (
                            backward_norms and rows is not None) else None
                        # a sum in row order, as grad_sq_norm adds its rows (cumsum runs left to right)
                        sq += float(cached.double().cumsum(0)[-1]) if cached is not None else \
                            ext.grad_sq_norm(values, p if projected else None, rows)
                    else:
                        sq += float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) ** 2
            # clip_grad_norm_'s factor, clamped to 1 (a NaN norm gives NaN, as there)
            coef = grad_clip / (math.sqrt(sq) + 1e-6)
            scale = 1.0 if coef >= 1.0 else coef
        # The small parameters: scaled, then stepped by torch's fused AdamW with the matrices hidden.
        hidden = [(p, p.grad) for p, _ in matrices]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in by_rows and grad_clip > 0:
                    p.grad.mul_(scale)
        try:
            for p, _ in hidden:
                p.grad = None
            self.step()
        finally:
            for p, g in hidden:
                p.grad = g
        for p, group in matrices:
            state = self.state[p]
            if not state:  # as torch's fused AdamW initializes it, so checkpoints stay interchangeable
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = host.huge_page_empty(p.shape, p.dtype).zero_()
                state["exp_avg_sq"] = host.huge_page_empty(p.shape, p.dtype).zero_()
            state["step"] += 1
            step = float(state["step"])
            beta1, beta2 = group["betas"]
            unit = unit_decoder and p is W_dec
            values, rows = by_rows[id(p)]
            # lr, betas, eps, weight decay, bias corrections, clip factor: one step's, wherever it is taken
            scalars = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                       1.0 - beta1 ** step, 1.0 - beta2 ** step, scale)
            if self._fused_encoder and p is self.layer.W_enc and rows is not None:
                # Taken by the next forward's encode, row by row (encoder_step_in_forward).
                index = torch.full((p.shape[0],), -1, dtype=torch.int64)
                index[rows] = torch.arange(rows.numel())
                self._pending_encoder_step = dict(
                    exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"], grad=values, grad_index=index,
                    keep=self.layer.path_mask.clone(),
                    done=torch.zeros(p.shape[0], dtype=torch.uint8),
                    scalars=ext.step_scalars(*scalars))
                cpp.set_pending_step(p, self._pending_encoder_step)
                continue
            ext.adamw_rows(p, values, state["exp_avg"], state["exp_avg_sq"], self.layer.path_mask.contiguous(), rows,
                           *scalars, unit, unit)
        if unit_decoder and id(W_dec) not in by_rows:
            renormalize_decoder(self.layer)

    def _row_update_matrices(self):
        """[(W, its group)] for W_enc and W_dec when `update` can take them row by row (float32,
        contiguous, CPU, dense gradients, the C++ module built, plain AdamW settings); None when
        any of them cannot, and then the whole update takes the torch path."""
        if not self.row_update or cpp.row_update_module() is None:
            return None
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._matrices or p.grad is None:
                    continue
                g = p.grad
                if g.layout == torch.sparse_coo:
                    if g.sparse_dim() != 1 or g.dense_dim() != 1:  # not a row gradient: stepped dense
                        g = p.grad = g.to_dense()
                    else:
                        g = g._values()
                state = self.state.get(p, {})
                plain = not (group["amsgrad"] or group["maximize"] or group.get("differentiable"))
                ok = (p.device.type == "cpu" and p.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous()
                      and g.dtype == torch.float32 and g.layout == torch.strided
                      and g.shape[1:] == p.shape[1:] and (p.grad.is_sparse or (g.shape == p.shape and g.is_contiguous()))
                      and plain
                      and all(state[key].is_contiguous() and state[key].dtype == torch.float32
                              for key in ("exp_avg", "exp_avg_sq") if key in state))
                if not ok:
                    return None
                out.append((p, group))
        return out or None


def grad_rows(g: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A weight gradient as the row update takes it: (g, None) for a dense one; for a row gradient
    (sparse COO over rows) its (values (R, d), rows (R,)) with rows strictly increasing, coalescing
    first where needed (several backward contributions, such as AuxK's, sit side by side)."""
    if g.layout != torch.sparse_coo:
        return g, None
    rows = g._indices()[0]
    if not g.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        g = g.coalesce()
        rows = g._indices()[0]
    return g._values().contiguous(), rows.contiguous()


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
    scale = layer.input_scale(sample.to(layer.b_dec.dtype))
    if scale is not None:
        sample = sample * scale
    center = geometric_median(sample) if how == "geometric_median" else sample.double().mean(0)
    layer.b_dec.copy_(center.to(layer.b_dec))
