"""`hsae train --data SOURCE --out RUN_DIR [--config FILE] [--resume] [--baseline flat] [--FIELD VALUE ...]`

Every HSAEConfig and TrainConfig field is a flag (dashes or underscores, lists comma-separated);
an unknown field, a bad value or an impossible configuration is an error before any work.
"""
from __future__ import annotations

import sys

from .config import load_config_file, parse_field_flags, split_fields
from .trainer import TrainingDiverged


def add_arguments(parser) -> None:
    parser.add_argument("--data", help="synthetic (default), a .npy file (N, d), or a folder of .safetensors shards")
    parser.add_argument("--out", required=True, help="run directory (config.json, metrics.jsonl, checkpoints/, final/)")
    parser.add_argument("--config", help="a .json or .yaml file of model and trainer fields (flags override it)")
    parser.add_argument("--model", help="a language model (hub id, local path or an embedded name) for LM activations")
    parser.add_argument("--layer", type=int, help="the hooked layer of --model")
    parser.add_argument("--baseline", choices=("none", "flat"), help="also train the matched flat SAE into RUN_DIR/flat")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints")
    parser.epilog = "Any model or trainer field can be given as --field value (e.g. --level-sizes 128,32,8 --lr 1e-3)."


def resolve_fields(args) -> tuple[dict, dict]:
    """Config file, then --field flags, then the named options; returns (model fields, trainer fields)."""
    fields = load_config_file(args.config) if args.config else {}
    fields.update(parse_field_flags(getattr(args, "extra", []) or []))
    for name in ("data", "model", "layer", "baseline"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if fields.get("model") is not None and "data" not in fields:
        fields["data"] = "lm"  # the activations come from --model; config.json should not say "synthetic"
    model_fields, train_fields = split_fields(fields)
    # Validate everything now: a bad value fails before any data is opened (d_model comes from
    # the data, so the model fields are checked with the user's d_model or a stand-in).
    from .config import TrainConfig, resolve_model_config

    tcfg = TrainConfig(**train_fields)
    resolve_model_config(model_fields, int(model_fields.get("d_model", 64)), tcfg)
    return model_fields, train_fields


def run(args) -> int:
    try:
        model_fields, train_fields = resolve_fields(args)
        from .run import run as run_training

        run_training(model_fields, train_fields, args.out, resume=args.resume)
    except (ValueError, TypeError, OSError) as exc:
        print(f"hsae train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"hsae train: stopped: {exc}", file=sys.stderr)
        return 3
    return 0
