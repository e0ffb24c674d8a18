"""`hsae finetune RUN_DIR`: a short fine-tune of a trained LM run with the language model in the loop,
on KL(P_clean || P_spliced) beside the reconstruction loss (after Karvonen 2025, "Revisiting
end-to-end SAE training: a short finetune is all you need", arXiv 2503.17272).

Why: a run trained on cached activations minimizes the FVU, which weighs every direction of the
residual stream alike; the next-token loss does not. The fine-tune splices the SAE's reconstruction
into the frozen model at the hooked layer (as `hsae eval` does) on training-split text, and steps
the SAE's parameters on

    loss = (1 - kl_weight) * fvu(x, x_hat) / fvu_0  +  kl_weight * KL / kl_0

with fvu_0 and kl_0 the two terms on the first batch, so `kl_weight` is the terms' share whatever
their scales (KL in nats, FVU a ratio). The model function is the SPEC's, unchanged: the same
parameters and forward (batch selection while training, its thresholds kept up to date for eval), the
same update (`MaskedAdamW.update`: pruned features never move, unit-norm decoder rows). Only the
objective differs from SPEC 5's, so this is a separate command, never part of `hsae train`.

Cost: each batch runs the model twice (clean, then spliced with gradients into the SAE) and
backward through the blocks above the hooked layer. The logits, the largest cost of a small model
with a big vocabulary (Gemma-3: 262k), are computed only at `kl_positions` random positions per
row (`logits_to_keep`), an unbiased sample of the per-position KL.

Writes OUT_DIR (default RUN_DIR + "_kl") as a run directory: the run's config.json with a
"finetune" section, its metrics.jsonl (for `hsae plot`), finetune.jsonl (one line per logged step)
and final/, so `hsae eval OUT_DIR` judges it like any run. RUN_DIR is never modified.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..io import atomic_write_bytes
from ..losses import fvu


@dataclass
class FinetuneConfig:
    tokens: int = 262_144         # text tokens (rows x context) the fine-tune runs the model on
    batch_rows: int = 4           # rows per step (x context tokens)
    lr: float = 5e-4              # peak; linear warmup over warmup_frac, then linear decay to 0
    warmup_frac: float = 0.05
    kl_weight: float = 0.5        # the KL term's share of the normalized loss (1: KL only)
    kl_positions: int = 64        # positions per row where the logits (and so the KL) are computed; 0: all
    seed: int = 1                 # row order and KL positions (the activation cache used seed 0's order)
    corpus: Optional[str] = None  # training text; default: the run's corpus
    log_every: int = 8

    def __post_init__(self):
        for name in ("tokens", "batch_rows", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"finetune {name}={getattr(self, name)}: must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"finetune lr={self.lr}: must be a positive finite number")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError(f"finetune kl_weight={self.kl_weight}: must be in [0, 1]")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"finetune warmup_frac={self.warmup_frac}: must be in [0, 1)")
        if self.kl_positions < 0:
            raise ValueError(f"finetune kl_positions={self.kl_positions}: must be >= 0 (0: every position)")


def _supports_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def kl_clean_to_spliced(clean_logits: torch.Tensor, spliced_logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean over the scored positions of KL(P_clean || P_spliced), from log_softmax in float32 (SPEC 7).
    clean_logits, spliced_logits: (B, P, V); scored: (B, P) bool. No scored position: 0."""
    if not bool(scored.any()):
        return spliced_logits.sum() * 0.0
    clean = clean_logits[scored].float().log_softmax(-1)
    spliced = spliced_logits[scored].float().log_softmax(-1)
    return (clean.exp() * (clean - spliced)).sum(-1).mean()


def finetune_run(run_dir, out_dir=None, fcfg: Optional[FinetuneConfig] = None, device: str = "cpu",
                 model=None, tokenizer=None, backend: str = "auto", progress: bool = True) -> dict:
    """Fine-tune RUN_DIR's layer into OUT_DIR (see the module docstring); returns the last logged record."""
    from tqdm.auto import tqdm

    from ..data import lm
    from ..eval.runs import load_run
    from .host import training_loop
    from .optim import MaskedAdamW
    from .schedules import lr_factor

    fcfg = fcfg or FinetuneConfig()
    run = load_run(run_dir, device=device, backend=backend)
    out_dir = Path(out_dir) if out_dir is not None else run.directory.with_name(run.directory.name + "_kl")
    if out_dir.resolve() == run.directory.resolve():
        raise ValueError(f"--out {out_dir} is the run itself: the fine-tune writes a new run directory")
    if not run.is_lm:
        raise ValueError(f"{run_dir}: not a language-model run (no model named in its config or its cache's meta.json); "
                         "the fine-tune needs the model its activations came from")
    if (out_dir / "final").exists():
        raise FileExistsError(f"{out_dir}/final exists: choose another --out or remove it")
    tcfg = run.train_config()

    if model is None:
        model, tokenizer = lm.load_model(run.lm["model"], device)
    for p in model.parameters():
        p.requires_grad_(False)
    layer_index = run.hooked_layer
    corpus = fcfg.corpus or run.lm.get("corpus") or "shakespeare"
    context = int(run.lm.get("context") or lm.DEFAULT_CONTEXT)
    rows = lm.sample_rows(lm.token_rows(tokenizer, lm.corpus_documents(corpus, "train"), context), fcfg.tokens, fcfg.seed)
    special = lm.special_mask(rows, lm.special_token_ids(tokenizer))
    steps = -(-rows.shape[0] // fcfg.batch_rows)

    layer = run.layer.train()
    layer.row_grads = False  # gradients arrive through the LM's backward: dense, as autograd writes them
    optimizer = MaskedAdamW(layer, fcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, fcfg.warmup_frac, fcfg.warmup_frac))
    use_keep = fcfg.kl_positions > 0 and fcfg.kl_positions < context - 1 and _supports_logits_to_keep(model)
    generator = torch.Generator().manual_seed(fcfg.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((run.directory / "config.json").read_text())
    config["finetune"] = dict(asdict(fcfg), source_run=str(run.directory), kl_positions_used=fcfg.kl_positions if use_keep else 0)
    atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=2).encode())
    if (run.directory / "metrics.jsonl").is_file():
        shutil.copyfile(run.directory / "metrics.jsonl", out_dir / "metrics.jsonl")
    log_path = out_dir / "finetune.jsonl"
    log_path.write_text("")

    scale = None  # (fvu_0, kl_0)
    record: dict = {}
    started = time.perf_counter()
    bar = tqdm(total=rows.shape[0] * context, unit="tok", desc=f"hsae finetune {run.directory.name}", disable=not progress)
    with training_loop(device.startswith("cpu") if isinstance(device, str) else device.type == "cpu"):
        for step in range(steps):
            batch = rows[step * fcfg.batch_rows : (step + 1) * fcfg.batch_rows].to(device)
            keep = ~special[step * fcfg.batch_rows : (step + 1) * fcfg.batch_rows].to(device)
            # Positions whose next-token distribution is scored: an input token in T (not special)
            # and not the row's last (as `hsae eval` scores them).
            if use_keep:
                positions = torch.randperm(context - 1, generator=generator)[: fcfg.kl_positions].sort().values.to(device)
                kwargs = {"logits_to_keep": positions}
            else:
                positions = torch.arange(context - 1, device=device)
                kwargs = {}
            scored = keep[:, positions]
            captured, block_out = [], []
            with torch.no_grad(), lm.patched_layer(model, layer_index, lambda hidden: captured.append(hidden)):
                handle = lm.capture_block_output(model, layer_index, block_out) if layer_index > 0 else None
                try:
                    clean_logits = model(input_ids=batch, use_cache=False, **kwargs).logits
                finally:
                    if handle is not None:
                        handle.remove()
            if not use_keep:
                clean_logits = clean_logits[:, :-1]
            hidden = captured[0].detach()
            x = hidden[keep].to(layer.W_dec.dtype)
            out = layer(x)

            def splice(_incoming):
                # built from the clean capture, so the replayed lower blocks' output is never read
                spliced = hidden.clone()
                spliced[keep] = out.x_hat.to(hidden.dtype)
                return spliced

            replay = lm.lower_blocks_replayed(model, layer_index, block_out[0]) if layer_index > 0 else contextlib.nullcontext()
            with replay, lm.patched_layer(model, layer_index, splice):
                spliced_logits = model(input_ids=batch, use_cache=False, **kwargs).logits
            if not use_keep:
                spliced_logits = spliced_logits[:, :-1]
            kl = kl_clean_to_spliced(clean_logits, spliced_logits, scored)
            recon = fvu(x, out.x_hat)
            if scale is None:
                scale = (max(float(recon.detach()), 1e-12), max(float(kl.detach()), 1e-12))
            loss = (1.0 - fcfg.kl_weight) * recon / scale[0] + fcfg.kl_weight * kl / scale[1]
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"finetune step {step}: loss is {float(loss.detach())} (fvu {float(recon.detach())}, "
                                         f"kl {float(kl.detach())}); "
                                         "nothing was saved")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.update(tcfg.grad_clip, tcfg.renorm_decoder)
            scheduler.step()
            bar.update(batch.numel())
            if step % fcfg.log_every == 0 or step == steps - 1:
                record = {"step": step, "tokens": (step + 1) * batch.numel(), "loss": float(loss.detach()),
                          "fvu": float(recon.detach()), "kl": float(kl.detach()), "lr": float(optimizer.param_groups[0]["lr"]),
                          "seconds": round(time.perf_counter() - started, 2)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix_str(f"fvu {record['fvu']:.4f} kl {record['kl']:.4f}", refresh=False)
    bar.close()
    layer.save_pretrained(out_dir / "final")
    return record
