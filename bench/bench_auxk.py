"""AuxK's cost in a training step: the sparse ops (hsae_fast/ops/auxk.py) against the plain-torch
formula a user would write (and this library used before, now its path for few dead features):
`xc @ W_enc[dead].T`, top-k, a dense decode `acts @ W_dec[dead]`. `auxk_loss` itself picks the
dense products up to `AUXK_SPARSE_ABOVE * k_aux` dead features and the sparse ops above; this
script forces each.

    python -m bench.bench_auxk                                  # F=16960 (the wide LM tree), d=576, N=1024
    python -m bench.bench_auxk --dead 700,2300,6000 --rounds 9

A step is `HSAELayer` forward + backward of fvu + AuxK / 32 (gradients set to None first; no
optimizer), with the given number of random bottom-level features marked dead and k_aux = d / 2,
on the cpp backend. The same layer, the same inputs and the same dead set run both AuxK versions
round-robin in one process (bench/timing.py); "no AuxK" is the step without it, so the AuxK cost
is the difference. Each ratio is the median over rounds of the two times of the same round.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import Timed, paired_ratio, round_robin_samples, parse_cpp_script_args, summarize  # noqa: E402
from hsae_fast import HSAEConfig, HSAELayer  # noqa: E402
from hsae_fast.losses import auxk_loss, fvu  # noqa: E402


def dense_auxk(layer, x, x_hat, dead, k_aux):
    """AuxK in plain torch (the library's dense path): an N x |dead| score matrix, a dense decode,
    gathers with dense gradients."""
    return auxk_loss(layer, x, x_hat, dead, k_aux, sparse=False)


def sparse_auxk(layer, x, x_hat, dead, k_aux):
    """The library's AuxK forced onto its sparse ops (by default it takes them above 4 * k_aux dead)."""
    return auxk_loss(layer, x, x_hat, dead, k_aux, sparse=True)


def step(layer, x, aux, dead, k_aux):
    def call(_):
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        loss = fvu(x, out.x_hat)
        if aux is not None:
            loss = loss + aux(layer, x, out.x_hat, dead, k_aux) / 32
        loss.backward()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--level-sizes", default="16384,512,64")
    parser.add_argument("--k", default="24,12,6")
    parser.add_argument("--dead", default="700,2300,6000", help="dead bottom-level features, comma-separated")
    args, why = parse_cpp_script_args(parser)
    sizes = tuple(int(v) for v in args.level_sizes.split(","))
    cfg = HSAEConfig(d_model=args.d, level_sizes=sizes, k=tuple(int(v) for v in args.k.split(",")))
    k_aux = cfg.resolved_k_aux
    torch.manual_seed(0)
    layer = HSAELayer(cfg, backend="cpp").train()
    x = torch.randn(args.n, args.d)
    print(f"N={args.n} d={args.d} level sizes {sizes} (F={cfg.dict_size}) k={cfg.k} k_aux={k_aux}, float32, cpp, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (+{args.warmup} warmup), "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| dead features | no AuxK ms | plain-torch AuxK step ms | sparse AuxK step ms | AuxK cost ms, torch -> sparse | step speedup (q25-q75) |")
    print("|---|---|---|---|---|---|")
    for n_dead in (int(v) for v in args.dead.split(",")):
        dead = torch.zeros(cfg.dict_size, dtype=torch.bool)
        dead[torch.randperm(sizes[0], generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        candidates = [Timed("none", step(layer, x, None, dead, k_aux)),
                      Timed("torch", step(layer, x, dense_auxk, dead, k_aux)),
                      Timed("sparse", step(layer, x, sparse_auxk, dead, k_aux))]
        samples = round_robin_samples(candidates, torch.device("cpu"), args.warmup, args.rounds)
        ms = {name: summarize(s)["median_ms"] for name, s in samples.items()}
        r = paired_ratio(samples["torch"], samples["sparse"])
        print(f"| {n_dead} | {ms['none']:.1f} | {ms['torch']:.1f} | {ms['sparse']:.1f} | "
              f"{ms['torch'] - ms['none']:.1f} -> {ms['sparse'] - ms['none']:.1f} | "
              f"{r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f}) |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
