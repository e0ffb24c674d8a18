"""`hsae` command line (SPEC 9): each subcommand lives in its own package and is imported lazily,
so `hsae train` never pays for the evaluation stack and vice versa.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "train": ("hsae_fast.train.cli", "train an HSAE or a flat SAE"),
    "finetune": ("hsae_fast.train.finetune_cli", "short KL + FVU fine-tune of an LM run with the model in the loop"),
    "eval": ("hsae_fast.eval.cli", "SAEBench-style evaluation of a run (writes RUN_DIR/metrics.json)"),
    "analyze": ("hsae_fast.analysis.cli", "path attribution and tree-use report of a run"),
    "plot": ("hsae_fast.plots.cli", "figures of a run"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hsae", description="hierarchical sparse autoencoders, fast")
    sub = parser.add_subparsers(dest="command", required=True)
    if argv and argv[0] in SUBCOMMANDS:
        # Build only the requested subcommand's parser: the others' imports can be heavy.
        names = [argv[0]]
    else:
        names = list(SUBCOMMANDS)
    modules = {}
    for name in names:
        module_name, help_text = SUBCOMMANDS[name]
        sub_parser = sub.add_parser(name, help=help_text)
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module_name):
                continue  # not built yet in this version
            raise
        modules[name].add_arguments(sub_parser)
    args, extra = parser.parse_known_args(argv)
    if args.command not in modules:
        parser.error(f"'{args.command}' is not available in this version")
    args.extra = extra
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        # what the subcommands raise for a bad argument, value or path: one line, not a traceback
        # (HSAE_TRACEBACK=1 shows it)
        if os.environ.get("HSAE_TRACEBACK") == "1":
            raise
        print(f"hsae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
