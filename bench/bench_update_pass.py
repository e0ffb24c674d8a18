"""Is the row update's pass bound by memory or by its arithmetic? adamw_rows against the traffic floor,
with the matrices in L2, in L3 and in memory, on one thread and on all.

    python -m bench.bench_update_pass                  # d=768; 256, 4096 and 65536 rows
    python -m bench.bench_update_pass --rows 2048 131072 --rounds 11

Candidates per size and thread count, round-robin in one process (bench/timing.py):
- `adamw_rows`: W_dec's update as the trainer runs it (csrc/adamw_rows.cpp: parallel part removed,
  AdamW, unit-norm rows) with a row gradient of no rows, so every row takes the step with gradient
  zero, as most rows of a routed step do;
- `floor`: one in-place pass over the parameter and both moments (torch._foreach_mul_ by 1), the
  least traffic of any exact AdamW step.
Times are per element (ns), and per 65536 rows (ms) to compare with the wide tree's step. Where the
matrices fit in a cache, adamw_rows's time is its arithmetic; where they don't and adamw_rows takes
the floor's time, the pass is bound by memory, and moving its arithmetic next to other work (into
the backward, into the encode) cannot hide it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import Timed, paired_ratio, parse_cpp_script_args, round_robin_samples, summarize  # noqa: E402
from hsae_fast.backends import cpp  # noqa: E402
from hsae_fast.train import host  # noqa: E402


def candidates(rows: int, d: int, repeats: int) -> list[Timed]:
    """adamw_rows and the floor over (rows, d) float32 matrices, each call `repeats` passes (small
    matrices: enough work per timed call to time)."""
    ext = cpp.row_update_module()
    gen = torch.Generator().manual_seed(0)
    p, m, v = (host.huge_page_empty((rows, d), torch.float32).normal_(generator=gen) for _ in range(3))
    v.abs_()
    no_rows, no_values = torch.zeros(0, dtype=torch.int64), torch.zeros(0, d)
    keep = torch.ones(rows, dtype=torch.bool)

    def adamw(_):
        for _ in range(repeats):
            ext.adamw_rows(p, no_values, m, v, keep, no_rows, 1e-4, 0.9, 0.999, 1e-8, 0.0, 0.5, 0.01, 1.0, True, True)

    def floor(_):
        for _ in range(repeats):
            torch._foreach_mul_([p, m, v], 1.0)

    return [Timed("adamw_rows", adamw), Timed("floor", floor)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 4096, 65536])
    args, why = parse_cpp_script_args(parser, rounds=9)
    threads = sorted({1, torch.get_num_threads()})
    print(f"d={args.d}, float32, {args.rounds} rounds (+{args.warmup} warmup), threads {threads}; {why}")
    print("| rows | MiB (p, m, v) | threads | adamw_rows ns/elem | floor ns/elem | per 65536 rows: adamw_rows, floor (ms) | adamw / floor |")
    print("|---|---|---|---|---|---|---|")
    all_threads = torch.get_num_threads()
    for rows in args.rows:
        repeats = max(1, 65536 // rows)
        timed = candidates(rows, args.d, repeats)
        for t in threads:
            torch.set_num_threads(t)
            samples = round_robin_samples(timed, torch.device("cpu"), args.warmup, args.rounds)
            per = {c.name: summarize(samples[c.name])["median_ms"] / repeats for c in timed}
            ns = {name: ms * 1e6 / (rows * args.d) for name, ms in per.items()}
            r = paired_ratio(samples["adamw_rows"], samples["floor"])
            print(f"| {rows} | {3 * rows * args.d * 4 / 2**20:.1f} | {t} | {ns['adamw_rows']:.3f} | {ns['floor']:.3f} | "
                  f"{per['adamw_rows'] * 65536 / rows:.1f}, {per['floor'] * 65536 / rows:.1f} | {r['median']:.2f} |")
        torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
