"""The trainer's step with the installed C++ module (A) against the checkout's csrc/ built by JIT (B),
alternating in one process: how a change to csrc/ is measured on a machine whose speed drifts.

    python -m bench.ab_builds --baseline HEAD       # csrc/ as committed against csrc/ as edited
    python -m bench.ab_builds --baseline b44482e --model flat --rounds 20
    python -m bench.ab_builds                       # the installed module (pip install -e .) as A

This machine's speed drifts by a fifth or more within minutes (memory bandwidth above all), so two
runs of a script, minutes apart, do not compare; A and B here take turns within each round (the one
that goes first alternates) and the ratio is the median of the rounds' A/B ratios. Both builds run
the same step: forward, backward of the MSE and `MaskedAdamW.update` as the trainer calls it, on one
layer and optimizer (the step's state moves on either way), over a pool of batches (a routed step's
work depends on which features the batch touches; one fixed batch would touch the same rows every
step). Both builds must take the same arguments (`_ABI_VERSION`): the run is refused otherwise.
`--baseline REF` builds REF's csrc/ (from git, into a directory of its own under the system's
temporary one: the checkout's JIT build directory is left alone) as A.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cases import add_step_case_args, step_case  # noqa: E402
from bench.timing import (Timed, paired_ratio, parse_cpp_script_args, round_robin_samples, summarize,  # noqa: E402
                          trainer_step_over)
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.backends import cpp  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_baseline(ref: str):
    """The C++ module built from `ref`'s csrc/ (git), in a directory of the system's temporary one
    named after the commit (a second run reuses the build)."""
    from torch.utils.cpp_extension import load

    def git(*args) -> bytes:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout

    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()
    src = Path(tempfile.gettempdir()) / f"hsae_baseline_{sha}"
    (src / "build").mkdir(parents=True, exist_ok=True)
    for name in git("ls-tree", "--name-only", f"{sha}:csrc").decode().split():
        (src / name).write_bytes(git("show", f"{sha}:csrc/{name}"))
    config = runpy.run_path(str(src / "build_config.py"))
    module = load(name=f"hsae_fast_cpu_baseline_{sha[:10]}", sources=[str(src / n) for n in config["SOURCES"]],
                  extra_cflags=list(config["CXX_FLAGS"]), extra_ldflags=list(config["LINK_FLAGS"]),
                  build_directory=str(src / "build"))
    return module, f"csrc/ at {sha[:10]} built by JIT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_case_args(parser)
    parser.add_argument("--baseline", metavar="REF", help="A: this git ref's csrc/ (default: the installed module)")
    parser.add_argument("--no-fused-encoder", dest="fused_encoder", action="store_false",
                        help="W_enc's step in the update, not in the next forward (for builds without it)")
    args, why = parse_cpp_script_args(parser, rounds=40)
    installed = cpp._ext()  # the pip build (or whatever HSAE_CPP_JIT selected at import)
    baseline, why = build_baseline(args.baseline) if args.baseline else (installed, why)
    checkout = cpp._load_jit()
    if checkout.abi_version() != baseline.abi_version():
        raise SystemExit(f"the builds take different arguments (ABI {baseline.abi_version()} in A, "
                         f"{checkout.abi_version()} in csrc/): compare builds of one ABI")
    spec, batches = step_case(args)
    torch.manual_seed(2)
    layer = HSAELayer(spec.config(args.d), backend="cpp").train()
    optimizer = MaskedAdamW(layer, lr=1e-4)
    layer.row_grads = optimizer.takes_row_grads()
    step = trainer_step_over(layer, optimizer, batches)
    # As the trainer's loop runs; both builds must have it (a build without encoder steps in the
    # forward would read W_enc rows a step old: compare such builds with --no-fused-encoder).
    fused = optimizer.encoder_step_in_forward() if args.fused_encoder else contextlib.nullcontext()

    def use(module):
        def setup():
            cpp._module = module
        return setup

    print(f"{spec.label} N={args.n} d={args.d} F={args.f}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (+{args.warmup} warmup), {args.batches} batches, load average "
          f"{os.getloadavg()[0]:.1f}; A: {why}; B: csrc/ built by JIT")
    try:
        with fused:
            samples = round_robin_samples([Timed("A", step, use(baseline)), Timed("B", step, use(checkout))],
                                          torch.device("cpu"), args.warmup, args.rounds)
    finally:
        cpp._module = installed
    r = paired_ratio(samples["A"], samples["B"])
    print(f"A {summarize(samples['A'])['median_ms']:.1f} ms, B {summarize(samples['B'])['median_ms']:.1f} ms; "
          f"A / B {r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})")


if __name__ == "__main__":
    main()
