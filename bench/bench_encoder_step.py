"""W_enc's AdamW step taken in `update` against taken by the next forward's encode
(`MaskedAdamW.encoder_step_in_forward`, what the trainer's loop does): the trainer's step both ways.

    python -m bench.bench_encoder_step                  # the wide tree, 40 rounds
    python -m bench.bench_encoder_step --model flat --rounds 16

Two layers from one seed, each with its own optimizer (a pending step is taken by the next forward of
its own layer), stepping in turn within each round over a pool of batches; the ratio is the median of
the rounds' ratios. At the end both layers must hold the same parameters and moments, bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cases import add_step_case_args, step_case  # noqa: E402
from bench.timing import (Timed, paired_ratio, parse_cpp_script_args, round_robin_samples, summarize,  # noqa: E402
                          trainer_step_over)
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_case_args(parser)
    args, why = parse_cpp_script_args(parser, rounds=40)
    spec, batches = step_case(args)
    runs = {}
    for name in ("in update", "in forward"):
        torch.manual_seed(2)
        layer = HSAELayer(spec.config(args.d), backend="cpp").train()
        optimizer = MaskedAdamW(layer, lr=1e-4)
        layer.row_grads = optimizer.takes_row_grads()
        runs[name] = (layer, optimizer, trainer_step_over(layer, optimizer, batches))

    print(f"{spec.label} N={args.n} d={args.d} F={args.f}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (+{args.warmup} warmup), {args.batches} batches, load average "
          f"{os.getloadavg()[0]:.1f}; {why}")
    with runs["in forward"][1].encoder_step_in_forward():
        samples = round_robin_samples([Timed(name, runs[name][2]) for name in runs], torch.device("cpu"),
                                      args.warmup, args.rounds)
    r = paired_ratio(samples["in update"], samples["in forward"])
    print(f"W_enc's step in update {summarize(samples['in update'])['median_ms']:.1f} ms, in the next forward "
          f"{summarize(samples['in forward'])['median_ms']:.1f} ms; ratio {r['median']:.3f} "
          f"({r['q25']:.3f}-{r['q75']:.3f})")
    (a, oa, _), (b, ob, _) = runs["in update"], runs["in forward"]
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and all(
        torch.equal(oa.state[p][key], ob.state[q][key])
        for p, q in zip(a.parameters(), b.parameters()) for key in ("exp_avg", "exp_avg_sq") if oa.state.get(p))
    print(f"parameters and moments bit for bit the same after {runs['in update'][2].steps} steps each: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
