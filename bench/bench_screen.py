"""The cpp backend's bfloat16 screen of float32 dense levels against the float32 GEMM, round-robin.

    python -m bench.bench_screen                       # F=65536, d=768, N=1024
    python -m bench.bench_screen --f 16384 --rounds 11

The screen (csrc/hsae_cpu.cpp, "The bfloat16 screen"; `hsae_fast.backends.cpp.screen_mode`) gives
the float32 GEMM's selection and scores, proven per token, at the speed of a bfloat16 GEMM. Each
candidate runs with HSAE_CPU_BF16_SCREEN set to 1 ("screen") or 0 ("float32 GEMM") for its calls:
- `encode`: one dense level's encode alone (the flat SAE's forward minus its decode), token selection
  k=32 and batch selection (k=32, cap 4: 128 candidates per token), float32; and token k=32 with
  bfloat16 tokens and weights (without the screen: MKL's bfloat16 GEMM, float32 sums);
- `step`: the trainer's step (forward, backward of the MSE, `MaskedAdamW.update` with row gradients)
  of the flat SAE (k=32, batch selection), issue 10's wide tree and the SPEC default tree (k 20/8/4);
- `step, AuxK p dead`: that step with AuxK's loss on a random fraction p of dead features, which
  AuxK scores densely for every token (SPEC 5).
Each ratio is the median of per-round ratios (quartiles beside it). The screen's counters, summed over
a candidate's calls (warmup included): token rows screened (once per level and per part a level is
split into across threads) and rows its candidates could not settle (scored again in a second pass).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_update import K_TREE, auxk_step_call, step_call  # noqa: E402
from bench.cases import default_tree, flat, wide_tree  # noqa: E402
from bench.timing import Timed, paired_ratio, parse_cpp_script_args, round_robin_samples, summarize  # noqa: E402
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.backends import cpp  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402

MODES = {"screen": "1", "float32 GEMM": "0"}
# Per screened candidate: [token rows screened, rows that needed the second pass] over all its calls.
SCREEN_COUNTS: dict[str, list[int]] = {}


def with_mode(timed: Timed, mode: str) -> Timed:
    """`timed` run with the screen switched as `mode` says (the switch is read at every encode)."""
    name = f"{timed.name} [{mode}]"

    def call(arg):
        os.environ[cpp.SCREEN_ENV] = MODES[mode]
        cpp.screen_stats(reset=True)
        timed.call(arg)
        counts = SCREEN_COUNTS.setdefault(timed.name, [0, 0])
        for i, c in enumerate(cpp.screen_stats(reset=True)):
            counts[i] += c

    return Timed(name, call, timed.setup)


def encode_call(name: str, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, kmax: int) -> Timed:
    F = W.shape[0]
    args = (x, W, b, torch.zeros(F), torch.ones(F, dtype=torch.bool), torch.full((F,), -1), None, None, None, None, 0,
            kmax, False)
    return Timed(name, lambda _: cpp.encode_forward(*args))


def paired_samples(candidates: list[Timed], args) -> dict[str, list[float]]:
    """Each candidate with the screen and without, round-robin as a pair (a pair's two calls follow
    each other, so neither inherits the cache and allocator state of a different workload)."""
    samples = {}
    for timed in candidates:
        samples.update(round_robin_samples([with_mode(timed, m) for m in MODES], torch.device("cpu"), args.warmup,
                                           args.rounds))
    return samples


def table(samples: dict, names: list[str]) -> list[str]:
    lines = ["| candidate | screen ms | float32 GEMM ms | float32 / screen (q25-q75) | rows screened | second pass |",
             "|---|---|---|---|---|---|"]
    for name in names:
        a, b = samples[f"{name} [float32 GEMM]"], samples[f"{name} [screen]"]
        r = paired_ratio(a, b)
        screened, second = SCREEN_COUNTS.get(name, (0, 0))
        lines.append(f"| {name} | {summarize(b)['median_ms']:.1f} | {summarize(a)['median_ms']:.1f} | "
                     f"{r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f}) | {screened} | {second} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=65536)
    parser.add_argument("--dead-fracs", default="0.1,0.5", help="AuxK steps at these dead fractions ('' for none)")
    args, why = parse_cpp_script_args(parser)
    print(f"N={args.n} d={args.d} F={args.f}, float32, cpp, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"(+{args.warmup} warmup), load average {os.getloadavg()[0]:.1f}; native bfloat16: {cpp.native_bf16()}; "
          f"cpp: {why}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=gen)

    W = torch.randn(args.f, args.d, generator=gen) / args.d**0.5
    b = torch.randn(args.f, generator=gen) * 0.1
    enc = [encode_call("encode, token k=32", x, W, b, 32), encode_call("encode, batch k=32 (128 candidates)", x, W, b, 128),
           encode_call("encode, token k=32, bfloat16 tokens and weights", x.bfloat16(), W.bfloat16(), b, 32)]
    print("\n" + "\n".join(table(paired_samples(enc, args), [t.name for t in enc])))
    del W, b, enc

    models = {"flat": flat(args.f, 32, "batch"), "wide": wide_tree(args.f, K_TREE), "default": default_tree(args.f, K_TREE)}
    steps, fracs = [], [float(f) for f in args.dead_fracs.split(",") if f]
    for name, spec in models.items():
        torch.manual_seed(2)
        layer = HSAELayer(spec.config(args.d), backend="cpp").train()
        opt = MaskedAdamW(layer, lr=1e-4, row_update=True)
        steps.append(step_call(name, layer, opt, x, row_grads=True))
        if name != "default":
            steps += [auxk_step_call(name, layer, opt, x, f, seed=3) for f in fracs]
    s = paired_samples(steps, args)
    print("\n" + "\n".join(table(s, [t.name for t in steps])))
    for mode in MODES:
        for tree in ("wide", "default"):
            r = paired_ratio(s[f"flat step, row grads update [{mode}]"], s[f"{tree} step, row grads update [{mode}]"])
            print(f"flat / {tree} step, both with the {mode}: {r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
