"""`hsae analyze RUN_DIR`: active paths, edge attribution, tree use, pruning and merge candidates."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `hsae train`")
    parser.add_argument("--tokens", type=int, default=None, help="analyzed tokens (default 8192 for LM runs, 32768 otherwise)")
    parser.add_argument("--batch-rows", type=int, default=8, help="LM rows per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top-paths", type=int, default=20, help="most used paths listed in the report")
    parser.add_argument("--merge-cosine", type=float, default=0.9, help="sibling decoder cosine above which a pair is a merge candidate")
    parser.add_argument("--rare-density", type=float, default=1e-4, help="density below which a used feature or path is rare")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .analyze import analyze_run

    if args.extra:
        raise SystemExit(f"hsae analyze: unknown arguments {args.extra}")
    if not 0 < args.merge_cosine <= 1:
        raise SystemExit(f"hsae analyze: --merge-cosine {args.merge_cosine}: expected a cosine in (0, 1]")
    result = analyze_run(args.run_dir, tokens=args.tokens, batch_rows=args.batch_rows, device=args.device,
                         top_paths=args.top_paths, merge_cosine=args.merge_cosine, rare_density=args.rare_density,
                         progress=not args.quiet)
    p = result["paths"]
    print(f"paths per token {p['paths_per_token']:.3f}; bottom-to-top paths used {p['full_paths_used']} of "
          f"{p['full_paths_possible']} (utilization {p['path_utilization']:.3f})")
    print(f"pruning candidates: {len(result['pruning_candidates']['dead_subtree_heads'])} dead subtrees; "
          f"merge candidates: {len(result['merge_candidates'])}")
    print(f"wrote {args.run_dir}/analysis.json and {args.run_dir}/analysis.md")
    return 0
