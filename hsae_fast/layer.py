"""`HSAELayer`: parameters, buffers and dispatch (SPEC 3). The math lives in `functional.py`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import functional
from .backends import resolve_backend
from .backends.common import accumulation_dtype
from .config import HSAEConfig
from .tree import TreePlan, config_parent, subtree_mask


@dataclass
class HSAEOutput:
    """x_hat: same shape and dtype as the input. codes: one (indices, values) pair per level, bottom
    first, each (..., kmax_l), global ids, value 0 = inactive. levels: the same codes flattened to
    (N, kmax_l) with their scores, for losses and metrics. prefixes: (L, N, d) coarse-to-fine
    reconstructions P_m when asked for (P_0 is x_hat). input_scale: (N, 1), the factor that took each
    token to the SPEC forward's input under input_norm="token" (x_hat and prefixes are scaled back;
    codes are the scaled input's), else None."""

    x_hat: torch.Tensor
    codes: list
    levels: list
    prefixes: Optional[torch.Tensor] = None
    input_scale: Optional[torch.Tensor] = None


def _all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN and no +-Inf: its min and max propagate a NaN and are +-Inf exactly
    when an Inf is there. One reduction pass, no temporaries: `isfinite(x).all()` built three
    x-sized masks (2 ms of a 140 ms routed training step at N=1024, d=768)."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class NonFiniteInputError(ValueError):
    """The input holds NaN or Inf (cfg.check_finite): a ValueError that a training loop can tell apart."""


def _capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's device (no host syncs allowed then)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _current_rows_before_saving(module, prefix, keep_vars) -> None:
    module.current_encoder_rows()


class HSAELayer(nn.Module):
    """A hierarchical sparse autoencoder (a flat TopK SAE when the config has one level).

    >>> cfg = HSAEConfig(d_model=64, dict_size=336, k=(8, 4, 2))
    >>> out = HSAELayer(cfg)(torch.randn(10, 64))
    """

    def __init__(self, cfg: HSAEConfig, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        F, d, L = cfg.dict_size, cfg.d_model, cfg.num_levels
        factory = {"device": device, "dtype": dtype or torch.float32}
        W_dec = torch.randn(F, d, **factory)
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(F, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d, **factory))
        self.edge_weight = nn.Parameter(torch.zeros(F, **factory), requires_grad=cfg.learn_edges)
        self.level_gain = nn.Parameter(torch.ones(L, **factory))
        self.register_buffer("threshold", torch.zeros(L, dtype=torch.float32, device=device))
        self.register_buffer("parent", config_parent(cfg).to(device))
        self.register_buffer("path_mask", torch.ones(F, dtype=torch.bool, device=device))
        self._plan: Optional[tuple] = None
        self._mask_version = 0  # bumped when path_mask changes in place (prune, load): rebuilds the plan
        self._resolved: dict = {}
        # True: backward leaves W_enc's and W_dec's gradients as sparse COO tensors of the rows the
        # batch touched (a routed step touches a few thousand of F rows), not dense (F, d) ones.
        # Only optimizers that take sparse gradients can step with them: the trainer's MaskedAdamW
        # does (set `layer.row_grads = optimizer.takes_row_grads()`, as the trainer does);
        # torch.optim.AdamW does not. Eager only:
        # under torch.compile the gradients stay dense.
        self.row_grads = False
        # While an optimizer leaves W_enc's step for the next forward to take (MaskedAdamW's
        # `encoder_step_in_forward`), a weak reference to it: what reads W_enc outside the encode asks
        # it to finish the step first (`current_encoder_rows`).
        self._pending_encoder = None
        self.register_state_dict_pre_hook(_current_rows_before_saving)

    # ------------------------------------------------------------------ helpers
    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16(), .double() and .to(dtype) cast every floating buffer; the thresholds are
        # running averages of scores and stay float32 (as a layer built with that dtype keeps them, and
        # as checkpoints store them), only moving to the weights' device.
        threshold = self._buffers["threshold"]
        out = super()._apply(fn, recurse)
        self._buffers["threshold"] = threshold.to(device=self._buffers["threshold"].device)
        return out

    def tree_plan(self) -> TreePlan:
        """Child lists for routed encodes; rebuilt when the tree, the mask or the device changes."""
        # _version: an in-place edit of either buffer (layer.path_mask[ids] = False) is seen too
        key = (self.parent.device, self.parent.data_ptr(), self.path_mask.data_ptr(), self._mask_version,
               self.parent._version, self.path_mask._version)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, TreePlan.build(self.cfg, self.parent, self.path_mask))
        return self._plan[1]

    def backend_for(self, device: torch.device) -> str:
        if device not in self._resolved:
            self._resolved[device] = resolve_backend(self.backend, device)
        return self._resolved[device]

    def row_grads_now(self) -> bool:
        """Whether this call's weight gradients are row gradients (`row_grads`, never when compiling)."""
        return self.row_grads and not torch.compiler.is_compiling()

    def default_selection(self) -> str:
        """SPEC 1: batch selection trains, threshold selection evaluates (token stays token)."""
        if self.cfg.selection == "batch" and not self.training:
            return "threshold"
        return self.cfg.selection

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"HSAELayer input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"HSAELayer input has shape {tuple(x.shape)}; expected (..., d_model={self.cfg.d_model})")
        if not x.is_floating_point():
            raise TypeError(f"HSAELayer input has dtype {x.dtype}; expected a floating dtype")
        if x.dtype != self.W_enc.dtype:
            raise TypeError(
                f"HSAELayer input has dtype {x.dtype} but the weights are {self.W_enc.dtype}; "
                f"cast one of them (x.to({self.W_enc.dtype}) or layer.to({x.dtype}))"
            )
        if x.device != self.W_enc.device:
            raise ValueError(f"HSAELayer input is on {x.device} but the weights are on {self.W_enc.device}")
        x2 = x.reshape(-1, self.cfg.d_model)
        if self.cfg.check_finite and (torch.compiler.is_compiling() or _capturing(x2)):
            # a compiled graph or a captured CUDA graph cannot branch on data: the check runs
            # inside it and raises there
            torch._assert_async(torch.isfinite(x2).all(), "HSAELayer input holds NaN or Inf")
        elif self.cfg.check_finite and x2.numel() and not _all_finite(x2):
            bad = (~torch.isfinite(x2)).nonzero()[0].tolist()
            raise NonFiniteInputError(
                f"HSAELayer input holds NaN or Inf (first at flattened row {bad[0]}, column {bad[1]}); "
                f"set cfg.check_finite=False to skip this check"
            )
        return x2

    def input_scale(self, x2: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, 1) factor taking each row of x2 (N, d) to the SPEC function's input, or None.

        input_norm="token" scales every token to norm sqrt(d_model) before the SPEC forward and
        scales the reconstruction back (SAELens's "constant_norm_rescale"), so the loss weighs
        every token alike. On residual streams with massive activations (Gemma's few tokens at
        10x the median norm carry most of the variance) an unscaled loss spends the dictionary on
        those tokens. The factor is part of the function: the input's gradient flows through it.
        A zero row keeps factor 1 (and stays zero); the factor is capped at the dtype's largest
        finite value, so a tiny float16 row cannot overflow it."""
        if self.cfg.input_norm == "none":
            return None
        acc = accumulation_dtype(x2.dtype)
        norms = x2.to(acc).norm(dim=1, keepdim=True)
        scale = torch.where(norms > 0, self.cfg.d_model ** 0.5 / norms.clamp_min(torch.finfo(acc).tiny), 1.0)
        return scale.clamp_max(torch.finfo(x2.dtype).max).to(x2.dtype)

    def spec_input(self, x2: torch.Tensor) -> tuple:
        """(x2 as the SPEC forward takes it, the factor that made it or None): see `input_scale`."""
        scale = self.input_scale(x2)
        return (x2 if scale is None else x2 * scale), scale

    def current_encoder_rows(self) -> None:
        """Every row of W_enc up to date where an optimizer left its step for the next forward
        (MaskedAdamW.encoder_step_in_forward); nothing otherwise."""
        owner = self._pending_encoder() if self._pending_encoder is not None else None
        if owner is not None:
            owner.finish_encoder_step()

    def __getstate__(self):
        self.current_encoder_rows()  # a copy gets W_enc up to date, and no optimizer
        state = self.__dict__.copy()
        state["_pending_encoder"] = None
        return state

    # ------------------------------------------------------------------ the API
    def encode_levels(self, x2: torch.Tensor, selection: Optional[str] = None) -> list:
        """(N, d) -> per-level LevelCodes (N, kmax_l), bottom first."""
        selection = selection or self.default_selection()
        b_dec = self.b_dec
        # Where x takes no gradient (training on stored activations), only the sum over tokens of
        # xc's gradient reaches b_dec: the encode op computes that sum directly (ops/encode.py).
        through_op = torch.is_grad_enabled() and b_dec.requires_grad and not x2.requires_grad
        return functional.encode(
            x2 - b_dec.detach() if through_op else x2 - b_dec, self.W_enc, self.b_enc, self.edge_weight,
            self.path_mask, self.threshold, self.tree_plan(), self.cfg, selection, self.backend_for(x2.device),
            row_grads=self.row_grads_now(), b_dec=b_dec if through_op else None,
        )

    def encode(self, x: torch.Tensor, selection: Optional[str] = None) -> list:
        """Codes of x: one (indices, values) pair per level, bottom first, each (..., kmax_l).
        Under input_norm="token" the codes are those of the scaled input (as in `forward`)."""
        x2, _ = self.spec_input(self._check_input(x))
        return self._shape_codes(self.encode_levels(x2, selection), x.shape[:-1], x.dtype)

    def decode(self, codes: list, prefixes: bool = False) -> torch.Tensor:
        """x_hat from codes (as `encode` returns them): (..., d). Under input_norm="token" this is the
        reconstruction of the scaled input, x * input_scale(x); `forward` scales it back."""
        codes = self._check_codes(codes)
        lead = codes[0][0].shape[:-1]
        levels = [
            # values in the encode's precision: float32 for 16-bit codes, float64 kept float64
            functional.LevelCodes(i.reshape(-1, i.shape[-1]),
                                  v.reshape(-1, v.shape[-1]).to(accumulation_dtype(v.dtype)), v)
            for i, v in codes
        ]
        out = functional.decode(
            levels, self.W_dec, self.level_gain, self.b_dec, self.backend_for(self.W_dec.device), prefixes,
            row_grads=self.row_grads_now(),
        )
        return out.reshape(*out.shape[:-2], *lead, out.shape[-1]) if prefixes else out.reshape(*lead, out.shape[-1])

    def _check_codes(self, codes) -> list:
        """Codes given to `decode`, checked (a wrong id or width would read outside W_dec in a kernel),
        with integer ids as int64."""
        L, F = self.cfg.num_levels, self.cfg.dict_size
        if not isinstance(codes, (list, tuple)) or len(codes) != L:
            got = f"{len(codes)} levels" if isinstance(codes, (list, tuple)) else type(codes).__name__
            raise ValueError(f"decode takes one (indices, values) pair per level ({L}, bottom first); got {got}")
        checked, lead = [], None
        for l, pair in enumerate(codes):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(t, torch.Tensor) for t in pair)):
                raise TypeError(f"codes[{l}] must be an (indices, values) pair of tensors")
            i, v = pair
            if i.is_floating_point() or i.is_complex() or i.dtype == torch.bool:
                raise TypeError(f"codes[{l}] indices have dtype {i.dtype}; expected integer feature ids")
            if not v.is_floating_point():
                raise TypeError(f"codes[{l}] values have dtype {v.dtype}; expected a floating dtype")
            if i.shape != v.shape or i.dim() < 1:
                raise ValueError(f"codes[{l}] indices {tuple(i.shape)} and values {tuple(v.shape)} must have one "
                                 f"shape (..., width)")
            if lead is not None and i.shape[:-1] != lead:
                raise ValueError(f"codes[{l}] has leading shape {tuple(i.shape[:-1])}; codes[0] has {tuple(lead)}")
            if i.device != self.W_dec.device or v.device != self.W_dec.device:
                raise ValueError(f"codes[{l}] are on {i.device} / {v.device} but the weights are on {self.W_dec.device}")
            lead = i.shape[:-1]
            i = i.long()
            if torch.compiler.is_compiling() or _capturing(i):
                torch._assert_async(((i >= 0) & (i < F)).all(), "decode: a feature id is outside [0, dict_size)")
            elif i.numel():
                lo, hi = (int(t) for t in torch.aminmax(i))
                if lo < 0 or hi >= F:
                    raise ValueError(f"codes[{l}] holds feature id {lo if lo < 0 else hi}, outside [0, {F})")
            checked.append((i, v))
        return checked

    def forward(self, x: torch.Tensor, selection: Optional[str] = None, return_prefixes: bool = False) -> HSAEOutput:
        x2, scale = self.spec_input(self._check_input(x))
        selection = selection or self.default_selection()
        levels = self.encode_levels(x2, selection)
        if self.training and selection == "batch":
            self._update_thresholds(levels)
        backend = self.backend_for(x2.device)
        # The encode's backward keeps the gradient of active slots only: the decode need not make the rest.
        out = functional.decode(levels, self.W_dec, self.level_gain, self.b_dec, backend, prefixes=return_prefixes,
                                row_grads=self.row_grads_now(), grad_active_only=True)
        if scale is not None:
            out = out / scale
        x_hat = out[0] if return_prefixes else out
        return HSAEOutput(
            x_hat=x_hat.reshape(x.shape),
            codes=self._shape_codes(levels, x.shape[:-1], x.dtype),
            levels=levels,
            prefixes=out if return_prefixes else None,
            input_scale=scale,
        )

    @torch.no_grad()
    def _update_thresholds(self, levels) -> None:
        """SPEC 4: threshold[l] <- 0.99 threshold[l] + 0.01 * (smallest kept positive score), for
        every level at once (a handful of ops: on a GPU each costs the host a launch)."""
        vals = functional.joined([codes.vals for codes in levels])
        if vals.shape[0] == 0:
            return
        column_min = torch.where(vals > 0, vals, torch.inf).amin(0)
        smallest = torch.stack([m.amin() for m in column_min.split([c.vals.shape[1] for c in levels])]).float()
        updated = 0.99 * self.threshold + 0.01 * smallest
        self.threshold.copy_(torch.where(smallest < torch.inf, updated, self.threshold))  # none positive: kept

    @staticmethod
    def _shape_codes(levels, lead_shape, dtype) -> list:
        # the width spelled out: with no tokens (lead_shape holds a 0) -1 would be ambiguous
        return [(c.idx.reshape(*lead_shape, c.idx.shape[-1]), c.vals.to(dtype).reshape(*lead_shape, c.vals.shape[-1]))
                for c in levels]

    @torch.no_grad()
    def prune(self, ids) -> torch.Tensor:
        """Prune features `ids` (global ids, or a bool mask over all F features) and their whole
        subtrees (SPEC 2); returns the new path_mask."""
        ids = torch.as_tensor(ids, device=self.parent.device)
        if ids.dtype == torch.bool:  # a mask, not the ids 0 and 1
            if ids.shape != (self.cfg.dict_size,):
                raise ValueError(f"a bool prune mask needs shape ({self.cfg.dict_size},) (one entry per feature); "
                                 f"got {tuple(ids.shape)}")
            ids = ids.nonzero().reshape(-1)
        elif ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"prune ids must be integer feature ids or a bool mask; got dtype {ids.dtype}")
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.dict_size):
            raise ValueError(f"prune ids must be in [0, {self.cfg.dict_size}); got min {int(ids.min())}, max {int(ids.max())}")
        self.path_mask &= ~subtree_mask(self.parent, ids)
        self._mask_version += 1
        return self.path_mask

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d_model={c.d_model}, level_sizes={list(c.level_sizes)}, k={list(c.k)}, gating={c.gating}, "
                f"selection={c.selection}, backend={self.backend}")

    def _load_from_state_dict(self, *args, **kwargs):
        self.current_encoder_rows()  # the pending step first, as it would have been taken
        super()._load_from_state_dict(*args, **kwargs)
        self._mask_version += 1

    # ----------------------------------------------------------- persistence
    def save_pretrained(self, directory) -> None:
        from .io import save_layer

        save_layer(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "auto", device=None) -> "HSAELayer":
        from .io import load_layer

        return load_layer(cls, directory, backend=backend, device=device)
