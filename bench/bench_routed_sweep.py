"""How a training step grows with F: the flat SAE against issue 10's wide routed tree, F = 16384 .. 1048576.

    python -m bench.bench_routed_sweep                      # N=1024, d=768, k total 32, cpp, float32, 3 rounds
    python -m bench.bench_routed_sweep --f 16384,65536 --rounds 5 --out /tmp/sweep

Models: flat TopK (k=32) and the wide tree of bench/cases.py (`wide_tree`: F/512 top features, branching
16 then about 31, k=(20, 8, 4)), both with batch selection, on the C++ backend, float32. Per F and
model, three candidates run round-robin in one process (bench/timing.py):
- `encoder GEMM`: the bare `x @ W_enc.T` over all F features (what every flat trainer pays, forward only);
- `fwd+bwd`: `HSAELayer` forward + backward of the MSE, gradients set to None first (training mode:
  batch selection);
- `step`: the trainer's step: the same forward + backward with row gradients (`HSAELayer.row_grads`,
  as the trainer sets it), then `MaskedAdamW.update(grad_clip=1, unit_decoder=True)` (the one-pass row
  update: projection, clip, AdamW, renorm), where AdamW's two moments fit in the memory available.
  fwd+bwd runs with row gradients too.

Each model is timed alone: at F = 1M one layer with its gradients holds 12.9 GB, and AdamW's moments
would add 12.9 GB more, past this machine's 24 GiB, so there the step is not measured and fwd+bwd is.
The flat-to-wide ratio of a candidate is the ratio of their medians of (candidate / encoder GEMM of
the same round), which takes out most of the drift in load between the two models' rounds.
Writes results.md, results.json and routed-step-with-f.png to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cases import flat, wide_tree  # noqa: E402
from bench.timing import (Timed, free_memory_bytes, layer_fwd_bwd, machine_description, paired_ratio,  # noqa: E402
                          parse_cpp_script_args, round_robin_samples, summarize)
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.backends.cpp import release_gradient_pool  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402

K_TREE = (20, 8, 4)
F_DEFAULT = ",".join(str(16384 * 2**i) for i in range(7))  # 16384 .. 1048576


def full_step(layer: HSAELayer, x: torch.Tensor, optimizer: MaskedAdamW):
    backward = layer_fwd_bwd(layer, x)

    def call(_):
        backward(None)
        optimizer.update(1.0, True)

    return call


def time_model(spec, F: int, x: torch.Tensor, args) -> dict:
    torch.manual_seed(F)
    layer = HSAELayer(spec.config(x.shape[1]), backend="cpp").train()
    layer.row_grads = True  # as the trainer runs it
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    W_enc = layer.W_enc.detach()
    candidates = [Timed("encoder GEMM", lambda _: x @ W_enc.T), Timed("fwd+bwd", layer_fwd_bwd(layer, x))]
    # After the layer, the step needs its gradients and two moments: 3 x the parameters, plus slack.
    free = free_memory_bytes(x.device)
    fits = 3.3 * param_bytes < free
    optimizer = MaskedAdamW(layer, lr=1e-4) if fits else None
    if optimizer is not None:
        candidates.append(Timed("step", full_step(layer, x, optimizer)))
    started = time.perf_counter()
    samples = round_robin_samples(candidates, x.device, args.warmup, args.rounds)
    result = {
        "model": spec.label, "F": F, "level_sizes": list(spec.level_sizes), "k": list(spec.k),
        "param_gb": param_bytes / 1e9, "seconds": time.perf_counter() - started,
        "step_skipped": None if fits else f"AdamW's moments ({2 * param_bytes / 1e9:.1f} GB) do not fit beside "
                                          f"the layer and its gradients in {free / 1e9:.1f} GB",
        "candidates": {name: summarize(s) for name, s in samples.items()},
        "x_gemm": {name: paired_ratio(s, samples["encoder GEMM"]) for name, s in samples.items()},
    }
    return result


def report(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| F | model | encoder GEMM ms | fwd+bwd ms | step ms | fwd+bwd x GEMM | step x GEMM | flat / wide fwd+bwd | flat / wide step |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_f: dict[int, dict] = {}
    for r in results:
        by_f.setdefault(r["F"], {})[r["model"]] = r
    for F, models in by_f.items():
        for label, r in models.items():
            c, g = r["candidates"], r["x_gemm"]
            ratios = ["", ""]
            if label != "flat" and "flat" in models:
                for i, name in enumerate(("fwd+bwd", "step")):
                    if name in g and name in models["flat"]["x_gemm"]:
                        ratios[i] = f"{models['flat']['x_gemm'][name]['median'] / g[name]['median']:.2f}x"
            step = f"{c['step']['median_ms']:,.0f}" if "step" in c else "n/a (memory)"
            step_x = f"{g['step']['median']:.3f}" if "step" in g else ""
            lines.append(f"| {F:,} | {label} {tuple(r['level_sizes'])} | {c['encoder GEMM']['median_ms']:,.0f} | "
                         f"{c['fwd+bwd']['median_ms']:,.0f} | {step} | {g['fwd+bwd']['median']:.3f} | {step_x} | "
                         f"{ratios[0]} | {ratios[1]} |")
    skipped = sorted({r["step_skipped"] for r in results if r["step_skipped"]})
    lines += [""] + [f"- step not measured: {why}" for why in skipped]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {("flat", "step"): ("tab:red", "-", "o"), ("flat", "fwd+bwd"): ("tab:red", "--", "s"),
              ("wide 3-level", "step"): ("tab:blue", "-", "o"), ("wide 3-level", "fwd+bwd"): ("tab:blue", "--", "s")}
    for (label, name), (color, line, marker) in styles.items():
        pts = [(r["F"], r["candidates"][name]["median_ms"]) for r in results if r["model"] == label and name in r["candidates"]]
        if pts:
            ax.plot(*zip(*pts), color=color, linestyle=line, marker=marker, label=f"{label}: {name}")
    gemm = [(r["F"], r["candidates"]["encoder GEMM"]["median_ms"]) for r in results if r["model"] == "flat"]
    ax.plot(*zip(*gemm), color="gray", linestyle=":", marker="^", label="encoder GEMM x @ W_enc.T (forward only)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dictionary size F (features)")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title("Training step against F: flat SAE vs wide routed tree\nN=1024, d=768, k total 32, cpp, float32, 2-core CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", default=F_DEFAULT, help="comma-separated dictionary sizes")
    parser.add_argument("--out", default="bench/results/routed-sweep-cpu")
    args, why = parse_cpp_script_args(parser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0))
    machine = machine_description()
    header = (f"N={args.n}, d={args.d}, k total 32 (wide tree k={K_TREE}), batch selection, cpp, float32; "
              f"{torch.get_num_threads()} threads, {args.rounds} rounds (+{args.warmup} warmup) per model; "
              f"load average {os.getloadavg()[0]:.1f} at the start; cpp: {why}")
    results = []
    for F in (int(v) for v in args.f.split(",")):
        for spec in (flat(F, 32, "batch"), wide_tree(F, K_TREE)):
            r = time_model(spec, F, x, args)
            results.append(r)
            # The layer, its gradients and moments go with time_model's frame; the pool's cached
            # gradient buffers of this size would otherwise stay held through the next, larger F.
            gc.collect()
            release_gradient_pool()
            c = r["candidates"]
            print(f"F={F} {spec.label}: " + ", ".join(f"{name} {s['median_ms']:.0f} ms" for name, s in c.items()),
                  flush=True)
    header += f"; load average {os.getloadavg()[0]:.1f} at the end"
    (out / "results.json").write_text(json.dumps({"machine": machine, "header": header, "results": results}, indent=1))
    table = report(results, header)
    (out / "results.md").write_text(f"# Step time against F (issue 10)\n\nMade by `python -m bench.bench_routed_sweep`; "
                                    f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
                                    f"commit {machine['hsae_fast_commit']}\n\n" + table)
    plot(results, out / "routed-step-with-f.png")
    print(table)


if __name__ == "__main__":
    main()
