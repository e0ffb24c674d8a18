"""The trainer's parameter update: torch ops against the one-pass row update, alone and in a full step.

    python -m bench.bench_update                         # F=65536, d=768, N=1024: flat and the wide tree
    python -m bench.bench_update --f 4770 --d 640 --rounds 15

What `Trainer.train_step` does after backward (`MaskedAdamW.update(grad_clip=1, unit_decoder=True)`):
the decoder gradient's part along each row removed, the gradients clipped to norm 1, fused AdamW,
unit-norm decoder rows. "torch" runs that as torch ops (five or six passes over F x d buffers);
"rows" takes W_enc and W_dec in one pass over their rows (csrc/adamw_rows.cpp); "row grads" is that
update fed by row gradients (`HSAELayer.row_grads`, what the trainer uses): backward writes only the
touched rows of W_enc's and W_dec's gradients, and the update reads only those. All are exact AdamW;
tests/test_train.py checks they agree.

Candidates, round-robin in one process (bench/timing.py), each ratio the median of per-round ratios:
- `floor`: one in-place pass over a parameter and both AdamW moments for W_enc and W_dec (six F x d
  float32 tensors read and written once): the least memory traffic of any exact AdamW step, since
  AdamW moves every row every step. flat step / floor bounds what any routed step can gain on the
  flat one with this optimizer;
- `update`: the update alone, from the same stored gradients every call (copied in untimed);
- `step`: a full training step as the trainer takes it, forward + backward of the MSE, then the
  update, for the flat SAE (k=32), issue 10's wide tree (bench/cases.py `wide_tree`) and the SPEC
  default tree (16, 4, 1) (`default_tree`), both k=(20, 8, 4), all with batch selection on the cpp
  backend, float32;
- `step, AuxK with p dead` (`--dead-fracs`): the row-gradient step with AuxK's loss added, a random
  fraction p of the features counted dead (AuxK scores all of them for every token, as SPEC 5 asks).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cases import default_tree, flat, wide_tree  # noqa: E402
from bench.timing import (Timed, layer_fwd_bwd, paired_ratio, parse_cpp_script_args, round_robin_samples,  # noqa: E402
                          summarize)
from hsae_fast import HSAELayer  # noqa: E402
from hsae_fast.losses import auxk_loss  # noqa: E402
from hsae_fast.train import host  # noqa: E402
from hsae_fast.train.optim import MaskedAdamW  # noqa: E402

K_TREE = (20, 8, 4)


def update_call(opt: MaskedAdamW, grads: list):
    """Timed: the update; setup: the stored gradients copied back (the torch path scales them in place)."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def setup():
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()

    return Timed(f"{'rows' if opt.row_update else 'torch'} update", lambda _: opt.update(1.0, True), setup)


def floor_call(F: int, d: int):
    """Timed: the traffic every exact AdamW step has (parameter and both moments of two F x d matrices,
    each read and written once)."""
    tensors = [host.huge_page_empty((F, d), torch.float32).fill_(1.0) for _ in range(6)]  # placed as MaskedAdamW's

    def call(_):
        for t in tensors:
            t.mul_(1.0)

    return Timed("floor", call)


def update_name(opt: MaskedAdamW, row_grads: bool) -> str:
    return "row grads" if row_grads else "rows" if opt.row_update else "torch"


def step_call(name: str, layer, opt: MaskedAdamW, x: torch.Tensor, row_grads: bool = False):
    """Timed: the trainer's step; `row_grads`: backward writes W_enc's and W_dec's gradients as their
    touched rows (`HSAELayer.row_grads`, as the trainer sets it), which the row update takes as they are,
    and W_enc's step is taken by the next forward's encode (`MaskedAdamW.encoder_step_in_forward`, as
    the trainer's loop runs)."""
    fwd_bwd = layer_fwd_bwd(layer, x)
    fused = opt.encoder_step_in_forward() if row_grads else None
    if fused is not None:
        fused.__enter__()  # for the life of the optimizer (kept referenced below: leaving it ends it)

    def call(_):
        layer.row_grads = row_grads
        fwd_bwd(None)
        opt.update(1.0, True, backward_norms=True)  # as the trainer calls it

    call.fused = fused
    return Timed(f"{name} step, {update_name(opt, row_grads)} update", call)


def auxk_step_call(name: str, layer, opt: MaskedAdamW, x: torch.Tensor, dead_frac: float, seed: int):
    """Timed: the trainer's step (row gradients) with AuxK on: a random `dead_frac` of the features
    counted dead, its loss (SPEC 5, aux_coef 1/32, k_aux d/2) added to the MSE as `total_loss` adds it."""
    dead = torch.rand(layer.cfg.dict_size, generator=torch.Generator().manual_seed(seed)) < dead_frac
    k_aux = layer.cfg.resolved_k_aux

    fused = opt.encoder_step_in_forward()
    fused.__enter__()  # as the trainer's loop runs (see step_call)

    def call(_):
        layer.row_grads = True
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        mse = (out.x_hat - x).float().pow(2).sum(-1).mean()
        (mse + auxk_loss(layer, x, out.x_hat, dead, k_aux) / 32).backward()
        opt.update(1.0, True, backward_norms=True)

    call.fused = fused
    return Timed(f"{name} step, AuxK with {dead_frac:.0%} dead", call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=65536)
    parser.add_argument("--dead-fracs", default="0.1,0.5",
                        help="also time the step with AuxK at these fractions of dead features ('' for none)")
    args, why = parse_cpp_script_args(parser)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=gen)
    models = {"flat": flat(args.f, 32, "batch"), "wide": wide_tree(args.f, K_TREE), "default": default_tree(args.f, K_TREE)}
    print(f"N={args.n} d={args.d} F={args.f}, float32, cpp, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"(+{args.warmup} warmup), load average {os.getloadavg()[0]:.1f}; cpp: {why}")

    # The update alone, on the flat layer's parameters (the update does not depend on the tree).
    torch.manual_seed(1)
    layer = HSAELayer(models["flat"].config(args.d), backend="cpp").train()
    layer_fwd_bwd(layer, x)(None)
    opts = [MaskedAdamW(layer, lr=1e-4, row_update=row) for row in (False, True)]
    grads = [None if p.grad is None else p.grad.clone() for g in opts[0].param_groups for p in g["params"]]
    samples = round_robin_samples([update_call(opt, grads) for opt in opts] + [floor_call(args.f, args.d)],
                                  torch.device("cpu"), args.warmup, args.rounds)
    ms = {name: summarize(s)["median_ms"] for name, s in samples.items()}
    r = paired_ratio(samples["torch update"], samples["rows update"])
    print(f"\nupdate alone (W_enc, W_dec: {layer.W_enc.numel() * 4 / 2**20:.0f} MiB each): torch {ms['torch update']:.1f} ms, "
          f"rows {ms['rows update']:.1f} ms, torch / rows {r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f}); "
          f"traffic floor (p, m, v of both read and written once) {ms['floor']:.1f} ms")
    del samples, opts, grads, layer

    candidates = []
    for name, spec in models.items():
        torch.manual_seed(2)
        shared = HSAELayer(spec.config(args.d), backend="cpp").train()
        torch.manual_seed(2)
        own = HSAELayer(spec.config(args.d), backend="cpp").train()
        for row, row_grads in ((False, False), (True, False), (True, True)):
            # The row-gradient step leaves W_enc's step to its next forward, as the trainer does: it has
            # a layer of its own, or another candidate's forward would take that step and be timed for it.
            layer = own if row_grads else shared
            candidates.append(step_call(name, layer, MaskedAdamW(layer, lr=1e-4, row_update=row), x, row_grads))
    candidates.append(floor_call(args.f, args.d))
    s = round_robin_samples(candidates, torch.device("cpu"), args.warmup, args.rounds)
    print("\n| model | step, torch update ms | step, rows update ms | step, row grads + rows update ms "
          "| torch / rows (q25-q75) | torch / row grads (q25-q75) |")
    print("|---|---|---|---|---|---|")
    for name in models:
        a, b, c = (s[f"{name} step, {u} update"] for u in ("torch", "rows", "row grads"))
        r, r2 = paired_ratio(a, b), paired_ratio(a, c)
        print(f"| {name} | {summarize(a)['median_ms']:.1f} | {summarize(b)['median_ms']:.1f} | "
              f"{summarize(c)['median_ms']:.1f} | {r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f}) | "
              f"{r2['median']:.2f} ({r2['q25']:.2f}-{r2['q75']:.2f}) |")
    for tree in ("wide", "default"):
        for update in ("torch", "rows", "row grads"):
            r = paired_ratio(s[f"flat step, {update} update"], s[f"{tree} step, {update} update"])
            print(f"flat / {tree} step with the {update} update: {r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f})")
    r = paired_ratio(s["flat step, row grads update"], s["floor"])
    print(f"traffic floor {summarize(s['floor'])['median_ms']:.1f} ms; flat step (row grads) / floor: {r['median']:.2f} "
          f"({r['q25']:.2f}-{r['q75']:.2f}), the most any routed step could gain on the flat one with exact AdamW")

    # AuxK (SPEC 5) scores every dead feature for every token, ungated: a GEMM over the dead rows that
    # the flat and the routed step pay alike, so it narrows the ratio as features die.
    fracs = [float(f) for f in args.dead_fracs.split(",") if f]
    if fracs:
        candidates = []
        for name in ("flat", "wide"):
            for f in fracs:  # a layer each (see above: the next forward takes W_enc's step)
                torch.manual_seed(2)
                layer = HSAELayer(models[name].config(args.d), backend="cpp").train()
                opt = MaskedAdamW(layer, lr=1e-4, row_update=True)
                candidates.append(auxk_step_call(name, layer, opt, x, f, seed=3))
        s = round_robin_samples(candidates, torch.device("cpu"), args.warmup, args.rounds)
        print("\n| dead features | flat step ms | wide step ms | flat / wide (q25-q75) |")
        print("|---|---|---|---|")
        for f in fracs:
            a, b = s[f"flat step, AuxK with {f:.0%} dead"], s[f"wide step, AuxK with {f:.0%} dead"]
            r = paired_ratio(a, b)
            print(f"| {f:.0%} | {summarize(a)['median_ms']:.1f} | {summarize(b)['median_ms']:.1f} | "
                  f"{r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f}) |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
