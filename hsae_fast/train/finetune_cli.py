"""`hsae finetune RUN_DIR [--out OUT_DIR] [--tokens N] [--lr LR] [--kl-weight W] ...`: a short KL + FVU
fine-tune of a language-model run with the model in the loop (see `hsae_fast.train.finetune`)."""
from __future__ import annotations

import sys
from dataclasses import fields

from .finetune import FinetuneConfig


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a finished LM run directory written by `hsae train`")
    parser.add_argument("--out", default=None, help="the fine-tuned run's directory (default: RUN_DIR_kl)")
    parser.add_argument("--device", default="cpu")
    defaults = FinetuneConfig()
    helps = {
        "tokens": "text tokens to fine-tune on (rows x context)",
        "batch_rows": "rows per step",
        "lr": "peak learning rate (warmup, then linear decay to 0)",
        "warmup_frac": "share of the steps spent warming up",
        "kl_weight": "the KL term's share of the loss, in [0, 1] (each term normalized by its first-batch value)",
        "kl_positions": "positions per row where the logits and the KL are computed (0: all)",
        "seed": "row order and KL positions",
        "corpus": "training text: 'shakespeare', a .txt file or a folder (default: the run's)",
        "log_every": "steps between lines of OUT_DIR/finetune.jsonl",
    }
    for f in fields(FinetuneConfig):
        default = getattr(defaults, f.name)
        kind = str if f.name == "corpus" else type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default,
                            help=f"{helps[f.name]} (default {default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .finetune import finetune_run

    if args.extra:
        print(f"hsae finetune: error: unknown arguments {args.extra}", file=sys.stderr)
        return 2
    try:
        fcfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
        record = finetune_run(args.run_dir, args.out, fcfg, device=args.device, progress=not args.quiet)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"hsae finetune: error: {exc}", file=sys.stderr)
        return 2
    print(f"last step: fvu {record['fvu']:.5g}, KL {record['kl']:.5g} over {record['tokens']} tokens, {record['seconds']} s")
    return 0
