"""Side-by-side table of evaluated runs (each RUN_DIR/metrics.json written by `hsae eval`), with
the training tokens and seconds from RUN_DIR/final_metrics.json.

`python -m hsae_fast.eval.compare runs/lm/main runs/lm/main/flat runs/lm/sparsify`
"""
from __future__ import annotations

import json
import math
from pathlib import Path

ROWS = (
    ("explained variance", "explained_variance", 3),
    ("CE increase (nats)", "ce_loss_increase", 3),
    ("CE without / with SAE", ("ce_loss_without_sae", "ce_loss_with_sae"), 3),
    ("CE with ablation", "ce_loss_with_ablation", 2),
    ("ce_loss_score", "ce_loss_score", 4),
    ("KL with SAE", "kl_div_with_sae", 3),
    ("kl_div_score", "kl_div_score", 4),
    ("cosine similarity", "cossim", 3),
    ("L0 total", "l0", 1),
    ("L0 per level (bottom first)", "l0_per_level", 1),
    ("dead fraction per level", "frac_dead_per_level", 3),
    ("HCS per pair", "hcs_per_pair", 3),
    ("HCS chance per pair", "hcs_chance_per_pair", 3),
    ("held-out tokens", "n_tokens", 0),
)


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v, digits) for v in value) if value else "-"
    if digits == 0:
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def run_summary(run_dir) -> dict:
    """metrics.json merged with the training tokens, steps and seconds of final_metrics.json."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `hsae eval {run_dir}` first")
    summary = json.loads(path.read_text())
    final = run_dir / "final_metrics.json"
    if final.is_file():
        train = json.loads(final.read_text())
        summary.update({f"train_{key}": train.get(key) for key in ("tokens", "steps")})
        summary["train_seconds"] = train.get("train_seconds")
    return summary


def comparison_table(run_dirs, names=None) -> str:
    """A Markdown table, one column per run (named by `names` or the run folder)."""
    summaries = [run_summary(r) for r in run_dirs]
    names = names or [Path(r).name if Path(r).name != "flat" else f"{Path(r).parent.name}/flat" for r in run_dirs]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = ROWS + (("training tokens", "train_tokens", 0), ("training seconds", "train_seconds", 1))
    for label, key, digits in rows:
        cells = []
        for s in summaries:
            value = [s.get(k) for k in key] if isinstance(key, tuple) else s.get(key)
            cells.append(_fmt(value, digits))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hsae_fast.eval.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="evaluated run directories")
    parser.add_argument("--names", default=None, help="comma-separated column names")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if names is not None and len(names) != len(args.run_dirs):
        raise SystemExit(f"--names has {len(names)} names for {len(args.run_dirs)} runs")
    print(comparison_table(args.run_dirs, names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
