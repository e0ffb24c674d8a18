"""The trainer's step with the installed C++ module (A) against the checkout's csrc/ built by JIT (B),
alternating in one process: how a change to csrc/ is measured on a machine whose speed drifts.

    pip install -e . at the commit to compare against, edit csrc/, then
    python -m bench.ab_builds                       # the wide tree, 40 rounds
    python -m bench.ab_builds --model flat --rounds 20

This machine's speed drifts by a fifth or more within minutes (memory bandwidth above all), so two
runs of a script, minutes apart, do not compare; A and B here take turns within each round (the one
that goes first alternates) and the ratio is the median of the rounds' A/B ratios. Both builds run
the same step: forward, backward of the MSE and `MaskedAdamW.update` as the trainer calls it, on one
layer and optimizer (the step's state moves on either way), over a pool of batches (a routed step's
work depends on which features the batch touches; one fixed batch would touch the same rows every
step). Both builds must take the same arguments (`_ABI_VERSION`): B is refused otherwise.
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
from hsae_fast.backends import cpp  # noqa: E402
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
    installed = cpp._ext()  # the pip build (or whatever HSAE_CPP_JIT selected at import)
    checkout = cpp._load_jit()
    if checkout.abi_version() != installed.abi_version():
        raise SystemExit(f"the builds take different arguments (ABI {installed.abi_version()} installed, "
                         f"{checkout.abi_version()} in csrc/): reinstall the baseline at this ABI")
    spec = {"wide": wide_tree(args.f, K_TREE), "default": default_tree(args.f, K_TREE),
            "flat": flat(args.f, 32, "batch")}[args.model]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.n, args.d, generator=gen) for _ in range(args.batches)]
    torch.manual_seed(2)
    layer = HSAELayer(spec.config(args.d), backend="cpp").train()
    optimizer = MaskedAdamW(layer, lr=1e-4)
    layer.row_grads = optimizer.takes_row_grads()
    calls = [0]

    def step(_):
        x = batches[calls[0] % len(batches)]
        calls[0] += 1
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        (out.x_hat - x).float().pow(2).sum(-1).mean().backward()
        optimizer.update(1.0, True, backward_norms=True)

    def use(module):
        def setup():
            cpp._module = module
        return setup

    print(f"{spec.label} N={args.n} d={args.d} F={args.f}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (+{args.warmup} warmup), {args.batches} batches, load average "
          f"{os.getloadavg()[0]:.1f}; A: {why}; B: csrc/ built by JIT")
    try:
        samples = round_robin_samples([Timed("A", step, use(installed)), Timed("B", step, use(checkout))],
                                      torch.device("cpu"), args.warmup, args.rounds)
    finally:
        cpp._module = installed
    r = paired_ratio(samples["A"], samples["B"])
    print(f"A {summarize(samples['A'])['median_ms']:.1f} ms, B {summarize(samples['B'])['median_ms']:.1f} ms; "
          f"A / B {r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})")


if __name__ == "__main__":
    main()
