"""The C++ backend's training step against the encoder GEMM floor and the torch backend (issue 5).

    python -m bench.bench_cpp_step                      # N=1024, d=768, F=16384, float32, 7 rounds
    python -m bench.bench_cpp_step --rounds 11 --dtype bfloat16 --threads 2

A step is `HSAELayer` forward + backward of the MSE loss (gradients set to None first; no optimizer),
training mode, batch selection, for a flat SAE (k=32) and the default 3-level tree (ratios 16:4:1,
k=(20, 8, 4)) at the same F. The floor is the bare encoder GEMM `x @ W_enc.T` over all F features:
everything a step adds beyond it is O(N * K * d). Candidates run round-robin in one process
(bench/timing.py); each ratio is the median over rounds of the two times of the same round.
Targets (issue 5): cpp step within 1.3x of the GEMM, and at least 1.7x faster than the torch step.

On a shared machine whose load exceeds its cores, every OpenMP region (each of the step's small
torch ops included) waits for descheduled threads that spin at its barrier; run with
OMP_WAIT_POLICY=PASSIVE there (and compare with --threads 1): the header line prints both.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import (Timed, layer_fwd_bwd, paired_ratio, parse_cpp_script_args, round_robin_samples,  # noqa: E402
                          summarize)
from hsae_fast import HSAEConfig, HSAELayer  # noqa: E402

BACKENDS = ("cpp", "torch")


def case_candidates(cfg: HSAEConfig, x: torch.Tensor, dtype: torch.dtype, seed: int) -> list[Timed]:
    torch.manual_seed(seed)
    base = HSAELayer(cfg, backend="torch").to(dtype)
    with torch.no_grad():
        base.b_enc.normal_(0.0, 0.05)
        base.b_dec.normal_(0.0, 0.05)
    W_enc = base.W_enc.detach()
    candidates = [Timed("encoder GEMM", lambda _: x @ W_enc.T)]
    if dtype != torch.float32:  # the stretch target: a 16-bit step under the float32 GEMM floor
        x32, W32 = x.float(), W_enc.float()
        candidates.append(Timed("float32 encoder GEMM", lambda _: x32 @ W32.T))
    for backend in BACKENDS:
        layer = HSAELayer(cfg, backend=backend).to(dtype)
        layer.load_state_dict(base.state_dict())
        layer.train()
        candidates.append(Timed(f"{backend} step", layer_fwd_bwd(layer, x)))
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args, why = parse_cpp_script_args(parser)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0)).to(dtype)
    cases = {
        "flat k=32": HSAEConfig(d_model=args.d, level_sizes=(args.f,), k=(32,)),
        "3-level k=(20,8,4)": HSAEConfig(d_model=args.d, dict_size=args.f, level_ratios=(16, 4, 1), k=(20, 8, 4)),
    }
    print(f"N={args.n} d={args.d} F={args.f} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (+{args.warmup} warmup), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"cpp: {why}")
    print("| case | candidate | median ms | x GEMM (q25-q75) | torch / cpp (q25-q75) |")
    print("|---|---|---|---|---|")
    for name, cfg in cases.items():
        candidates = case_candidates(cfg, x, dtype, seed=1)
        samples = round_robin_samples(candidates, torch.device("cpu"), args.warmup, args.rounds)
        gemm = samples["encoder GEMM"]
        for candidate in candidates:
            own = samples[candidate.name]
            ratio = paired_ratio(own, gemm)
            speedup = ""
            if candidate.name == "cpp step":
                s = paired_ratio(samples["torch step"], own)
                speedup = f"{s['median']:.2f} ({s['q25']:.2f}-{s['q75']:.2f})"
                if "float32 encoder GEMM" in samples:
                    f = paired_ratio(own, samples["float32 encoder GEMM"])
                    speedup += f"; x float32 GEMM {f['median']:.3f} ({f['q25']:.3f}-{f['q75']:.3f})"
            print(f"| {name} | {candidate.name} | {summarize(own)['median_ms']:.1f} | "
                  f"{ratio['median']:.3f} ({ratio['q25']:.3f}-{ratio['q75']:.3f}) | {speedup} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
