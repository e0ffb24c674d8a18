"""`hsae eval RUN_DIR`: SPEC 7 metrics of a run on held-out data, written to RUN_DIR/metrics.json.

What is computed (all token-weighted over the whole evaluated set, sums in float64):
- reconstruction: explained_variance (= 1 - FVU, variance about the mean mu of all evaluated
  tokens), fvu, mse (summed over d, per token), mse_per_dim, cossim, l2_ratio,
  relative_reconstruction_bias;
- sparsity: l0 and l1 per level and total, frac_dead per level (unpruned features with density 0
  over N evaluated tokens), density histograms per level;
- hierarchy: HCS per level pair, its count-weighted mean and chance level (SPEC 6);
- LM runs only: ce_loss_* and kl_div_* with the reconstruction spliced in / the activation zeroed
  (see `lm_scores`), ce_loss_increase, and level-wise interpretability: per-level token
  specificity and each feature's top-activating contexts (RUN_DIR/eval/top_contexts.md).
- `healthy` with `health_reasons`: a broken model (negative explained variance, a level that never
  fires, CE with the SAE no better than zero ablation where ablation hurts, KL with the SAE no
  smaller than with ablation, non-finite numbers) is flagged, never passed.

Differences from SAEBench 0.6.0's core eval (`sae_bench/evals/core/main.py`), read from its code:
- explained_variance: SAEBench averages per-token ratios 1 - ||x-x̂||^2/||x-mean_batch||^2 over
  tokens; we divide the total residual by the total variance about the mean of the whole set.
- mse: SAEBench divides each token's squared error by the batch's token count and then averages
  over tokens (so its value shrinks with the batch size); ours is the per-token mean over the set.
- cossim: SAEBench divides by the raw norms (NaN for a zero x̂); we clamp both norms at 1e-8.
- l2_ratio: SAEBench replaces an input norm below 1e-4 by 1; we clamp it at 1e-8.
- relative_reconstruction_bias: SAEBench takes a ratio of batch means and averages the ratios over
  batches; ours is one ratio of sums over the whole set (equal for a single batch).
- l1: SAEBench sums the signed activations; we sum |f| (identical for non-negative codes).
- CE/KL: SAEBench zero-ablates every position (BOS included) and splices the reconstruction only
  at non-special positions when asked; we splice and ablate exactly the positions in T. Its KL
  uses log(softmax) and can be NaN; we use log_softmax in float32. Both average over positions.
- special tokens: SAEBench drops the configured `ignore_tokens` ids; we drop every special id of
  the tokenizer, wherever it sits in a row.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..io import atomic_write_bytes
from .runs import EvalData, Run, load_run
from .stats import CodeStats


def health_verdict(metrics: dict) -> tuple[bool, list[str]]:
    """(healthy, reasons): every reason names the failed check and the value seen."""
    reasons = []
    for key in ("explained_variance", "mse", "l0", "ce_loss_with_sae", "kl_div_with_sae"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            reasons.append(f"{key} is {value}: not a finite number")
    ev = metrics.get("explained_variance")
    if ev is not None and math.isfinite(ev) and ev < 0:
        reasons.append(f"explained_variance={ev:.4g} < 0: the reconstruction is worse than predicting the mean")
    for l, l0 in enumerate(metrics.get("l0_per_level", [])):
        if l0 == 0:
            reasons.append(f"level {l} has l0=0: no feature of it ever fires")
    if metrics.get("l0") == 0:
        reasons.append("l0=0: no feature ever fires")
    ce_clean, ce_sae, ce_abl = (metrics.get(f"ce_loss_{k}") for k in ("without_sae", "with_sae", "with_ablation"))
    # Only where ablation hurts is "no better than ablation" a failure (a random LM can gain from it).
    if ce_sae is not None and ce_abl > ce_clean and ce_sae >= ce_abl:
        reasons.append(f"ce_loss_with_sae={ce_sae:.4g} >= ce_loss_with_ablation={ce_abl:.4g}: "
                       "splicing the SAE in is no better than zeroing the activation")
    kl_sae, kl_abl = metrics.get("kl_div_with_sae"), metrics.get("kl_div_with_ablation")
    if kl_sae is not None and kl_sae >= kl_abl:
        reasons.append(f"kl_div_with_sae={kl_sae:.4g} >= kl_div_with_ablation={kl_abl:.4g}: "
                       "the SAE changes the model's predictions as much as zeroing the activation")
    return not reasons, reasons


def evaluate_run(
    run_dir,
    tokens: Optional[int] = None,
    batch_rows: int = 4,
    device: str = "cpu",
    corpus: Optional[str] = None,
    context: Optional[int] = None,
    top_k: int = 8,
    features_per_level: int = 24,
    model=None,
    tokenizer=None,
    progress: bool = True,
    backend: str = "auto",
) -> dict:
    """Evaluate the run, write RUN_DIR/metrics.json (and, for LM runs, RUN_DIR/eval/top_contexts.md)
    and return the metrics. `model`/`tokenizer` may be passed in to reuse a loaded LM; `backend`
    is the HSAELayer backend the run's layer computes with."""
    from tqdm.auto import tqdm

    run = load_run(run_dir, device=device, backend=backend)
    tokens = run.sample_tokens(tokens)
    data = EvalData(run, tokens, batch_rows=batch_rows, device=device, with_logits=run.is_lm,
                    corpus=corpus, context=context, model=model, tokenizer=tokenizer)
    vocab = len(data.tokenizer) if data.tokenizer is not None else None
    stats = CodeStats(run.layer, top_k=top_k, vocab_size=vocab)
    preservation = None
    if run.is_lm:
        from .lm_scores import ModelPreservation

        preservation = ModelPreservation()
    total = int((~data.special).sum()) if run.is_lm else tokens
    bar = tqdm(total=total, unit="tok", desc=f"hsae eval {Path(run_dir).name}", disable=not progress)
    with torch.no_grad():
        for batch in data.batches():
            out = run.layer(batch.x.to(device=device, dtype=run.layer.W_enc.dtype))
            stats.update(batch.x, out.x_hat, out.levels, batch.first_index, batch.token_ids)
            if preservation is not None:
                preservation.update(data.model, data.hooked_layer, batch.rows, batch.special, batch.logits, out.x_hat)
            bar.update(batch.x.shape[0])
    bar.close()

    metrics = {"n_tokens": stats.n, "kind": "lm" if run.is_lm else "activations"}
    metrics.update(stats.reconstruction())
    metrics.update(stats.sparsity())
    metrics.update(stats.hierarchy())
    if preservation is not None:
        metrics.update(preservation.results())
        metrics.update({"model": run.lm["model"], "layer": data.hooked_layer})
        metrics["specificity"] = stats.specificity()
        metrics["top_contexts_file"] = str(write_top_contexts(run, data, stats, features_per_level))
    metrics["healthy"], metrics["health_reasons"] = health_verdict(metrics)
    atomic_write_bytes(run.directory / "metrics.json", json.dumps(_finite_json(metrics), indent=2).encode())
    return metrics


def _finite_json(value):
    """JSON has no NaN: write non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def write_top_contexts(run: Run, data: EvalData, stats: CodeStats, features_per_level: int) -> Path:
    """RUN_DIR/eval/top_contexts.md: per level, its most frequent features with their top tokens and
    top-activating contexts (the activating token in bold)."""
    cfg = run.layer.cfg
    density = stats.density()
    lines = [f"# Top-activating contexts: {run.directory.name}", "",
             f"model `{run.lm['model']}`, layer {data.hooked_layer}, {stats.n} held-out tokens. "
             "Per level, the most frequent features; **bold** is the token the feature fires on.", ""]
    spec = stats.specificity()
    for l in reversed(range(cfg.num_levels)):
        off, size = cfg.level_offsets[l], cfg.level_sizes[l]
        lines.append(f"## Level {l} ({'top' if l == cfg.num_levels - 1 else 'bottom' if l == 0 else 'middle'}, {size} features)")
        if spec is not None:
            lines.append(f"specificity {spec['specificity'][l]:.3f}, token entropy {spec['token_entropy'][l]:.2f} nats, "
                         f"top-token share {spec['top_token_share'][l]:.3f} ({spec['features_scored'][l]} features scored)")
        lines.append("")
        level_density = density[off : off + size]
        order = torch.argsort(level_density, descending=True)[:features_per_level]
        for local in order.tolist():
            feature = off + local
            if stats.counts[feature] == 0:
                break
            parent = int(run.layer.parent[feature])
            tops = ", ".join(f"«{_md(data.token_text(t))}» x{c}" for t, c in stats.top_tokens(feature))
            lines.append(f"### feature {feature} (density {float(level_density[local]):.4f}"
                         + (f", parent {parent}" if parent >= 0 else "") + ")")
            lines.append(f"top tokens: {tops}")
            lines.append("")
            for value, index in zip(stats.top_vals[feature].tolist(), stats.top_index[feature].tolist()):
                if index < 0:
                    break
                left, token, right = data.context_of(index)
                token = _md(token)
                core = token.lstrip() or token  # Markdown bold cannot open on a space
                lines.append(f"- {value:.2f}: {_md(left)}{token[: len(token) - len(core)]}**{core}**{_md(right)}")
            lines.append("")
    out = run.directory / "eval" / "top_contexts.md"
    out.parent.mkdir(exist_ok=True)
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


def _md(text: str) -> str:
    """One-line, Markdown-inert text."""
    text = html.escape(text.replace("\n", "⏎").replace("\r", ""), quote=False)
    for ch in "*_`[]|#":
        text = text.replace(ch, "\\" + ch)
    return text
