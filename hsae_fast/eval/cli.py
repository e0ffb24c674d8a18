"""`hsae eval RUN_DIR`: SPEC 7 metrics on held-out data -> RUN_DIR/metrics.json."""
from __future__ import annotations

import json
import math


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `hsae train`")
    parser.add_argument("--tokens", type=int, default=None,
                        help="evaluated tokens (default 8192 for LM runs, 32768 otherwise)")
    parser.add_argument("--batch-rows", type=int, default=4, help="LM rows per forward (memory: rows x context x vocab logits)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus", default=None, help="held-out text: 'shakespeare', a .txt file or a folder (default: the run's)")
    parser.add_argument("--context", type=int, default=None, help="tokens per row (default: the run's)")
    parser.add_argument("--top-k", type=int, default=8, help="top-activating contexts kept per feature")
    parser.add_argument("--features-per-level", type=int, default=24, help="features per level in top_contexts.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


SUMMARY = ("n_tokens", "explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0",
           "l0_per_level", "frac_dead_per_level", "hcs_per_pair", "hcs_chance_per_pair", "ce_loss_without_sae",
           "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_increase", "ce_loss_score", "kl_div_with_sae",
           "kl_div_with_ablation", "kl_div_score")


def run(args) -> int:
    from .evaluate import evaluate_run

    if args.extra:
        raise SystemExit(f"hsae eval: unknown arguments {args.extra}")
    metrics = evaluate_run(args.run_dir, tokens=args.tokens, batch_rows=args.batch_rows, device=args.device,
                           corpus=args.corpus, context=args.context, top_k=args.top_k,
                           features_per_level=args.features_per_level, progress=not args.quiet)
    for key in SUMMARY:
        if key in metrics:
            print(f"{key:30s} {_fmt(metrics[key])}")
    print(f"{'healthy':30s} {metrics['healthy']}")
    for reason in metrics["health_reasons"]:
        print(f"  UNHEALTHY: {reason}")
    print(f"wrote {args.run_dir}/metrics.json")
    return 0 if metrics["healthy"] else 2


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return json.dumps(value) if not isinstance(value, (int, str)) else str(value)
