"""EleutherAI sparsify's SparseCoder as a peer: trained on the same activation source as our runs,
for a token count or a wall-time budget, then written as a flat run directory so `hsae eval`
scores it with exactly the code that scores ours.

The training loop is sparsify 1.3's `Trainer` (`sparsify/trainer.py`, loss_fn="fvu") without the
model hooks, fed from our source instead of a tokenized dataset:
- b_dec is set to the mean of the first batch; the encoder starts as sparsify initializes it;
- each step: unit-norm decoder rows (normalize_decoder), fvu + auxk_alpha * AuxK, backward, the
  gradient parallel to each decoder row removed, then the optimizer step;
- optimizers as in its trainer: "signum" (its default: schedule-free SignSGD, momentum 0.95,
  lr 5e-3 / sqrt(F / 2^14)) or "adam" (lr 2e-4 / sqrt(F / 2^14), linear warmup over
  `lr_warmup_steps` then linear decay to 0 over the run; needs a token count);
- dead latents (for AuxK): not fired for `dead_feature_threshold` tokens.
On CPU its Triton decode fails ("0 active drivers"); its torch path is forced (ASSETS.md).

The trained coder becomes a one-level `HSAELayer` with `selection="token"` (classic TopK): its
encoder subtracts b_dec, applies ReLU and keeps the top k, which is our token selection's code
exactly (ASSETS.md), and its decode is ours with `level_gain` 1.

`python -m hsae_fast.eval.peers --data CACHE --out runs/x --dict-size 6048 --k 42 --seconds 300`
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import HSAEConfig
from ..io import atomic_write_bytes
from ..layer import HSAELayer

PEER_OPTIMIZERS = ("signum", "adam")


def import_sparsify():
    """sparsify's modules, with its Triton decode switched off unless a GPU is present."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify
        import sparsify.sparse_coder
        import sparsify.utils
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as exc:
        raise ModuleNotFoundError("the sparsify peer needs `pip install eai-sparsify` (bench/install_peers.sh)") from exc
    if not torch.cuda.is_available():
        # sparsify picks its decoder when first imported; imported before the variable was set (by
        # another caller), it would run the Triton kernel, which fails on CPU or, under
        # TRITON_INTERPRET=1, runs interpreted (minutes for a few steps).
        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    return sparsify, SparseCoder, SparseCoderConfig


def sparse_coder_to_layer(sae, backend: str = "auto") -> HSAELayer:
    """A flat TopK `HSAELayer` computing the same x_hat and codes as a sparsify SparseCoder
    (activation "topk", no skip connection, not a transcoder)."""
    if sae.cfg.activation != "topk" or sae.cfg.transcode or sae.W_skip is not None or sae.W_dec is None:
        raise ValueError(f"sparse_coder_to_layer: needs a plain TopK autoencoder; got activation={sae.cfg.activation!r}, "
                         f"transcode={sae.cfg.transcode}, skip={sae.W_skip is not None}")
    F, d = sae.encoder.weight.shape
    cfg = HSAEConfig(d_model=d, level_sizes=(F,), k=(int(sae.cfg.k),), selection="token")
    layer = HSAELayer(cfg, backend=backend, device=sae.encoder.weight.device)
    with torch.no_grad():
        layer.W_enc.copy_(sae.encoder.weight)
        layer.b_enc.copy_(sae.encoder.bias)
        layer.W_dec.copy_(sae.W_dec)
        layer.b_dec.copy_(sae.b_dec)
    return layer.eval()


def _write_json(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2).encode())


def write_peer_run(layer: HSAELayer, out_dir, trainer: dict, final_metrics: dict) -> Path:
    """A run directory `hsae eval` reads (SPEC 9): config.json, final/, final_metrics.json.
    `trainer` must carry `data` (an activation cache folder makes it an LM run) and says how the
    peer was trained."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer.save_pretrained(out_dir / "final")
    _write_json(out_dir / "config.json", {"hsae": layer.cfg.to_dict(), "trainer": trainer})
    _write_json(out_dir / "final_metrics.json", final_metrics)
    return out_dir


def default_lr(optimizer: str, dict_size: int) -> float:
    """sparsify's trainer default for `optimizer` at `dict_size` latents."""
    base = {"signum": 5e-3, "adam": 2e-4}[optimizer]
    return base / math.sqrt(dict_size / 2 ** 14)


def train_sparsify(
    data,
    out_dir,
    dict_size: int,
    k: int,
    tokens: Optional[int] = None,
    seconds: Optional[float] = None,
    batch_size: int = 1024,
    optimizer: str = "signum",
    lr: Optional[float] = None,
    lr_warmup_steps: int = 1000,
    auxk_alpha: float = 0.0,
    dead_feature_threshold: int = 10_000_000,
    normalize_decoder: bool = True,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
) -> dict:
    """Train sparsify's SparseCoder (flat TopK, `dict_size` latents, `k` active) on `data` (any
    source `hsae train --data` takes: a cache folder, a .npy file) until `tokens` are seen or
    `seconds` of training have passed, whichever comes first; write RUN_DIR (see `write_peer_run`)
    with metrics.jsonl, and return the final metrics. Timing counts what our trainer's counts:
    reading the batch, the step, and the optimizer; not the logging."""
    from ..data import open_source

    if tokens is None and seconds is None:
        raise ValueError("train_sparsify: give tokens=, seconds= or both (how long to train)")
    if optimizer not in PEER_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {PEER_OPTIMIZERS}")
    if optimizer == "adam" and tokens is None:
        raise ValueError("optimizer='adam' decays its lr over the run: it needs tokens=")
    _, SparseCoder, SparseCoderConfig = import_sparsify()
    source = open_source(str(data))
    torch.manual_seed(seed)
    sae = SparseCoder(source.d_model, SparseCoderConfig(activation="topk", num_latents=dict_size, k=k,
                                                        normalize_decoder=normalize_decoder), "cpu", dtype=torch.float32)
    lr = lr if lr is not None else default_lr(optimizer, dict_size)
    total_steps = None if tokens is None else max(1, tokens // batch_size)
    scheduler = None
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        scheduler = get_linear_schedule_with_warmup(opt, min(lr_warmup_steps, total_steps // 10), total_steps)
    since_fired = torch.zeros(dict_size, dtype=torch.long)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="sparsify", dynamic_ncols=True)
    step, elapsed, window_fvu, window_l0, window_n = 0, 0.0, 0.0, 0.0, 0
    batches = source.batches(batch_size, seed)
    with open(out_dir / "metrics.jsonl", "w") as log:
        while (total_steps is None or step < total_steps) and (seconds is None or elapsed < seconds):
            t0 = time.perf_counter()
            x = next(batches)
            if step == 0:
                sae.b_dec.data = x.mean(0)
            if normalize_decoder:
                sae.set_decoder_norm_to_unit_norm()
            dead_mask = since_fired > dead_feature_threshold if auxk_alpha > 0 else None
            out = sae(x, dead_mask=dead_mask)
            loss = out.fvu + auxk_alpha * out.auxk_loss
            loss.backward()
            if normalize_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[out.latent_indices.flatten()] = 0
            elapsed += time.perf_counter() - t0
            step += 1
            window_fvu += float(out.fvu.detach())
            window_l0 += float((out.latent_acts.detach() > 0).sum()) / x.shape[0]
            window_n += 1
            if bar is not None:
                bar.update(batch_size)
            if step % log_every == 0:
                record = {"step": step, "tokens": step * batch_size, "fvu": window_fvu / window_n,
                          "l0": [window_l0 / window_n], "elapsed_s": round(elapsed, 3),
                          "dead_frac": [float((since_fired >= min(dead_feature_threshold, step * batch_size)).double().mean())]}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix_str(f"fvu {record['fvu']:.4f}", refresh=False)
                window_fvu, window_l0, window_n = 0.0, 0.0, 0
    if bar is not None:
        bar.close()
    if optimizer == "signum":
        opt.eval()  # schedule-free: the weights to use are the averaged ones (sparsify saves these)
    layer = sparse_coder_to_layer(sae)
    trainer = {"peer": "sparsify", "data": str(Path(data).resolve()), "tokens": step * batch_size,
               "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "auxk_alpha": auxk_alpha,
               "dead_feature_threshold": dead_feature_threshold, "normalize_decoder": normalize_decoder,
               "seed": seed, "seconds_budget": seconds}
    final = {"steps": step, "tokens": step * batch_size, "train_seconds": round(elapsed, 1),
             "never_fired_frac": float((since_fired >= step * batch_size).double().mean())}
    write_peer_run(layer, out_dir, trainer, final)
    return final


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hsae_fast.eval.peers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an activation cache folder (or any --data of `hsae train`)")
    parser.add_argument("--out", required=True, help="run directory to write (then `hsae eval OUT`)")
    parser.add_argument("--dict-size", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=None, help="stop after this many tokens")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this much training time")
    parser.add_argument("--match-run", default=None,
                        help="a run directory of ours: take --seconds from its final_metrics.json train_seconds")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--optimizer", choices=PEER_OPTIMIZERS, default="signum")
    parser.add_argument("--lr", type=float, default=None, help="default: sparsify's for the optimizer and size")
    parser.add_argument("--auxk-alpha", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    seconds = args.seconds
    if args.match_run is not None:
        seconds = json.loads((Path(args.match_run) / "final_metrics.json").read_text())["train_seconds"]
    final = train_sparsify(args.data, args.out, args.dict_size, args.k, tokens=args.tokens, seconds=seconds,
                           batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                           auxk_alpha=args.auxk_alpha, seed=args.seed, progress=not args.quiet)
    print(json.dumps(final))
    print(f"wrote {args.out}; score it with `hsae eval {args.out}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
