"""The model's sensitivity to its hooked activation, and training in the metric it defines.

An SAE trained on the FVU weighs every direction of the residual stream alike; the next-token loss
does not. Measured on Gemma-3-270M's `hidden_states[10]`, the eigenvalues of the output Fisher below
span five orders of magnitude (its top 10 directions hold 35% of its trace), and an HSAE at FVU
0.014 on training positions has a Fisher-weighted FVU of 0.097: it reconstructs the high-variance
directions and misses the ones the model reads.

- `estimate_fisher`: G = E_n[g_n g_n^T], g_n = d/dh_n sum_m log p_m(y_m), y_m ~ P_clean(. | prefix)
  at sampled output positions m of each row, h_n the hooked activation at input position n. That is
  the diagonal (per-position) block of the sequence's output Fisher with respect to the activation:
  KL(P_clean || P_patched) ~ 1/2 sum_n e_n^T G_n e_n to second order, cross-position terms dropped.
- `metric_transform(G, w)`: A = M^(1/2), M = (1 - w) I + w G d / tr(G) (both parts trace d).
- Training with `fisher_weight = w` (TrainConfig) trains on x' = A x, so SPEC 5's FVU becomes
  sum ||A (x - x_hat)||^2 / sum ||A (x - mean)||^2, and `fold_transform` then rewrites the layer for
  x itself: W_enc <- W_enc' A, b_dec <- A^-1 b_dec', W_dec <- W_dec' A^-1. The folded layer is the
  SPEC's function of x with the very same scores, codes and selection as the trained one of A x;
  its decoder rows are unit-norm in the metric (||A^-1 ... ||), not in x.

`python -m hsae_fast.data.fisher CACHE` estimates G for an activation cache of `hsae_fast.data.lm`
from its model, layer and corpus (training split) and writes CACHE/fisher/output_fisher.safetensors.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import torch

FISHER_FILE = "fisher/output_fisher.safetensors"  # in a subfolder: every .safetensors beside the shards is read as one


def estimate_fisher(model, layer: int, rows: torch.Tensor, special: torch.Tensor, positions_per_row: int = 64,
                    batch_rows: int = 4, seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, int]:
    """(G (d, d) float64, positions counted). rows, special: (R, C) token ids and their special-token
    mask; only non-special positions count, as inputs n and as outputs m. Output positions m are
    `positions_per_row` random ones per batch (all when 0 or >= C - 1), scaled so G estimates the
    Fisher of all C - 1 outputs; the unembedding at every position is most of a small model's cost."""
    from tqdm.auto import tqdm

    from .lm import patched_layer

    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    context = rows.shape[1]
    device = next(model.parameters()).device
    outputs = context - 1
    subset = 0 < positions_per_row < outputs
    G, count = None, 0
    bar = tqdm(total=rows.shape[0], unit="row", desc="output Fisher", disable=not progress)
    for start in range(0, rows.shape[0], batch_rows):
        batch = rows[start : start + batch_rows].to(device)
        keep = ~special[start : start + batch_rows].to(device)
        if subset:
            positions = torch.randperm(outputs, generator=generator)[:positions_per_row].sort().values.to(device)
            kwargs, scale = {"logits_to_keep": positions}, outputs / positions_per_row
        else:
            positions, kwargs, scale = torch.arange(outputs, device=device), {}, 1.0
        leaf = []

        def as_leaf(hidden):
            hidden = hidden.detach().requires_grad_()
            leaf.append(hidden)
            return hidden

        with patched_layer(model, layer, as_leaf):
            logits = model(input_ids=batch, use_cache=False, **kwargs).logits
        if not subset:
            logits = logits[:, :-1]
        logits = logits.float()
        sampled = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1,
                                    generator=_device_generator(generator, device)).view(logits.shape[:-1])
        log_p = logits.log_softmax(-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        (log_p * keep[:, positions]).sum().backward()
        g = leaf[0].grad[keep].double() * math.sqrt(scale)
        G = g.T @ g if G is None else G.addmm_(g.T, g)
        count += g.shape[0]
        bar.update(batch.shape[0])
    bar.close()
    if count == 0:
        raise ValueError("no non-special positions to estimate the Fisher on")
    return (G / count).cpu(), count


def _device_generator(generator: torch.Generator, device) -> torch.Generator:
    """Sampling on `device` with a generator seeded from the CPU one (reproducible per seed)."""
    if torch.device(device).type == "cpu":
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    return seeded


def metric_transform(G: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A^-1), float64, A = M^(1/2) symmetric, M = (1 - weight) I + weight G d / tr(G)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"fisher_weight={weight}: must be in [0, 1) (at 1 the metric can be singular)")
    G = G.double()
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"the Fisher matrix has shape {tuple(G.shape)}; expected (d, d)")
    if not torch.isfinite(G).all():
        raise ValueError("the Fisher matrix has non-finite entries")
    d = G.shape[0]
    trace = float(G.trace())
    if weight > 0 and not trace > 0:
        raise ValueError(f"the Fisher matrix has trace {trace}: nothing to weigh by")
    eye = torch.eye(d, dtype=torch.float64)
    M = (1.0 - weight) * eye + (weight * d / trace) * (G + G.T) / 2 if weight > 0 else eye
    values, vectors = torch.linalg.eigh(M)
    values = values.clamp_min(1e-12)  # G is PSD: M's eigenvalues are >= 1 - weight up to rounding
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


@torch.no_grad()
def fold_transform(layer, A: torch.Tensor, A_inv: torch.Tensor) -> None:
    """Rewrite a layer trained on x' = A x as the same function of x (see the module docstring).
    Pruned features' rows are rewritten too: they contribute nothing either way."""
    dtype = layer.W_enc.dtype
    A64, A_inv64 = A.to(layer.W_enc.device, torch.float64), A_inv.to(layer.W_enc.device, torch.float64)
    layer.W_enc.copy_((layer.W_enc.double() @ A64).to(dtype))
    layer.W_dec.copy_((layer.W_dec.double() @ A_inv64).to(dtype))
    layer.b_dec.copy_((A_inv64 @ layer.b_dec.double()).to(dtype))


class TransformedSource:
    """An activation source whose rows come out as x' = A x (batches and samples alike)."""

    def __init__(self, source, A: torch.Tensor):
        self.source = source
        self.A_T = A.T.float().contiguous()
        self.d_model = source.d_model

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.A_T.to(x.device)).to(x.dtype)

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.source.batches(batch_size, seed, start=start):
            yield self._map(batch)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        return self._map(self.source.sample(n, seed))

    def describe(self) -> str:
        return f"{self.source.describe()} in the output-Fisher metric"

    def __getattr__(self, name):  # anything else (cached text, sizes) is the wrapped source's
        return getattr(self.source, name)


def load_fisher(path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make it with `python -m hsae_fast.data.fisher {path.parent}`")
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("fisher"), dict(f.metadata() or {})


def fisher_for_cache(cache, tokens: int = 24_576, positions_per_row: int = 64, seed: int = 7,
                     device: str = "cpu", progress: bool = True, model=None, tokenizer=None) -> Path:
    """Estimate G for an activation cache folder from its model, layer and corpus (training split);
    write CACHE/fisher/output_fisher.safetensors atomically and return its path."""
    from ..io import atomic_save_tensors
    from . import lm

    cache = Path(cache)
    meta = lm.read_meta(cache)
    if meta is None or not meta.get("model"):
        raise ValueError(f"{cache} is not an activation cache of hsae_fast.data.lm (no meta.json naming a model)")
    if model is None:
        model, tokenizer = lm.load_model(meta["model"], device)
    rows = lm.token_rows(tokenizer, lm.corpus_documents(meta.get("corpus") or "shakespeare", "train"), int(meta["context"]))
    rows = lm.sample_rows(rows, tokens, seed)
    special = lm.special_mask(rows, lm.special_token_ids(tokenizer))
    G, count = estimate_fisher(model, int(meta["layer"]), rows, special, positions_per_row, seed=seed, progress=progress)
    if G.shape[0] != int(meta["d_model"]):
        raise ValueError(f"the Fisher has d={G.shape[0]}, the cache d_model={meta['d_model']}")
    out = cache / FISHER_FILE
    out.parent.mkdir(exist_ok=True)
    info = {"model": str(meta["model"]), "layer": str(meta["layer"]), "positions": str(count),
            "rows": str(rows.shape[0]), "positions_per_row": str(positions_per_row), "seed": str(seed)}
    atomic_save_tensors({"fisher": G.contiguous()}, out, metadata=info)
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsae_fast.data.fisher",
                                     description="estimate the output Fisher of an activation cache's model at its layer")
    parser.add_argument("cache", help="an activation cache folder written by `python -m hsae_fast.data.lm`")
    parser.add_argument("--tokens", type=int, default=24_576, help="training-split text tokens to estimate on")
    parser.add_argument("--positions-per-row", type=int, default=64, help="output positions sampled per row (0: all)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.positions_per_row < 0:
        parser.error("--tokens must be >= 1 and --positions-per-row >= 0")
    out = fisher_for_cache(args.cache, args.tokens, args.positions_per_row, args.seed, args.device)
    G, info = load_fisher(out)
    values = torch.linalg.eigvalsh(G)
    print(json.dumps(dict(info, file=str(out), trace=float(values.sum()),
                          top10_share=float(values[-10:].sum() / values.sum()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
