"""`hsae plot RUN_DIR [--compare OTHER_RUN ...]`: the figures of a run, written into RUN_DIR."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `hsae train`")
    parser.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR",
                        help="more runs whose training curves share training_progression.png")
    parser.add_argument("--tokens", type=int, default=None, help="held-out tokens for the analysis behind feature_paths.png")
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    from . import make_all

    if args.extra:
        raise SystemExit(f"hsae plot: unknown arguments {args.extra}")
    for path in make_all(args.run_dir, others=args.compare, tokens=args.tokens, device=args.device):
        print(f"wrote {path}")
    return 0
