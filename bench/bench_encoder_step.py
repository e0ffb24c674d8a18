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

from bench.cases import default_tree, flat, wide_tree  # noqa: E402
from bench.timing import Timed, paired_ratio, parse_cpp_script_args, round_robin_samples, summarize  # noqa: E402
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402

K_TREE = (20, 8, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("wide", "default", "flat"), default="wide")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=65536)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, taken in turn")
    args, why = parse_cpp_script_args(parser, rounds=40)
    spec = {"wide": wide_tree(args.f, K_TREE), "default": default_tree(args.f, K_TREE),
            "flat": flat(args.f, 32, "batch")}[args.model]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.n, args.d, generator=gen) for _ in range(args.batches)]
    runs = {}
    for name in ("in update", "in forward"):
        torch.manual_seed(2)
        layer = HSAELayer(spec.config(args.d), backend="cpp").train()
        optimizer = MaskedAdamW(layer, lr=1e-4)
        layer.row_grads = optimizer.takes_row_grads()
        runs[name] = (layer, optimizer, [0])

    def step_of(name):
        layer, optimizer, calls = runs[name]

        def step(_):
            x = batches[calls[0] % len(batches)]
            calls[0] += 1
            for p in layer.parameters():
                p.grad = None
            out = layer(x)
            (out.x_hat - x).float().pow(2).sum(-1).mean().backward()
            optimizer.update(1.0, True, backward_norms=True)
        return Timed(name, step)

    print(f"{spec.label} N={args.n} d={args.d} F={args.f}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (+{args.warmup} warmup), {args.batches} batches, load average "
          f"{os.getloadavg()[0]:.1f}; {why}")
    with runs["in forward"][1].encoder_step_in_forward():
        samples = round_robin_samples([step_of("in update"), step_of("in forward")], torch.device("cpu"),
                                      args.warmup, args.rounds)
    r = paired_ratio(samples["in update"], samples["in forward"])
    print(f"W_enc's step in update {summarize(samples['in update'])['median_ms']:.1f} ms, in the next forward "
          f"{summarize(samples['in forward'])['median_ms']:.1f} ms; ratio {r['median']:.3f} "
          f"({r['q25']:.3f}-{r['q75']:.3f})")
    (a, oa, _), (b, ob, _) = runs["in update"], runs["in forward"]
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and all(
        torch.equal(oa.state[p][key], ob.state[q][key])
        for p, q in zip(a.parameters(), b.parameters()) for key in ("exp_avg", "exp_avg_sq") if oa.state.get(p))
    print(f"parameters and moments bit for bit the same after {runs['in update'][2][0]} steps each: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
