"""Runs one case: builds and checks its implementations, times them round-robin under pytest-benchmark,
measures peak memory, and puts every candidate's figures in `benchmark.extra_info`."""
from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from .candidates import LEARNING_RATE, base_layer, build_implementation, check_rows, implementation_plan
from .cases import Case, ModelSpec, training_state_bytes, work
from .timing import (LoadWindow, RoundRobin, Timed, ceiling_candidates, ceilings_from, free_memory_bytes,
                     memory_method, paired_ratio, summarize)

FLOOR = "encoder GEMM"  # x @ W_enc.T alone: a flat SAE's unavoidable work, and the target of issue 5
DENSE_ENCODE = "matmul+topk"  # a flat TopK encode done densely: the encode baseline
ADAMW_FLOOR = "AdamW alone"  # fused AdamW over a flat model's parameters: every step's memory-bound floor
MIN_ROUNDS = 3
MEMORY_HEADROOM = 0.7  # share of free memory one implementation's held state may take (activations need the rest)


def case_seed(case: Case) -> int:
    return zlib.crc32(case.name.encode()) % (2**31)


@dataclass
class BenchState:
    """Session-wide: the device, round counts, and the implementations of the current shape (built and
    checked once, reused by the next case with the same shape, dropped when the shape changes)."""

    device: torch.device
    rounds: int  # at most this many timed rounds per case
    warmup: int
    budget_s: Optional[float] = None  # fewer rounds (never under MIN_ROUNDS) when a round is slow
    implementations: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)

    def keep_only(self, shapes: set) -> None:
        """Drop what no (spec, d, dtype) in `shapes` uses: the memory goes to the next shape."""
        for cache in (self.implementations, self.bases):
            for key in [k for k in cache if k[-3:] not in shapes]:
                del cache[key]

    def base(self, spec: ModelSpec, d: int, dtype: torch.dtype, seed: int):
        key = (spec, d, dtype)
        if key not in self.bases:
            self.bases[key] = base_layer(spec, d, dtype, self.device, seed)
        return self.bases[key]

    def implementation(self, name: str, spec: ModelSpec, d: int, dtype: torch.dtype, x: torch.Tensor, seed: int):
        """Built and checked against the float64 reference the first time it is asked for."""
        key = (name, spec, d, dtype)
        if key not in self.implementations:
            base = self.base(spec, d, dtype, seed)
            impl = build_implementation(name, base, spec)
            impl.check(check_rows(x, spec.dict_size), base, seed)
            self.implementations[key] = impl
        return self.implementations[key]

    def memory_shortfall(self, name: str, spec: ModelSpec, d: int, dtype: torch.dtype, element_size: int):
        """Why an implementation not built yet would not fit in memory (None: it fits, or is built).
        Big sweeps on a full device skip a candidate with the reason instead of dying out of memory."""
        if (name, spec, d, dtype) in self.implementations:
            return None
        need, free = training_state_bytes(spec, d, element_size), free_memory_bytes(self.device)
        if need <= MEMORY_HEADROOM * free:
            return None
        return f"would hold about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def _timed(label: str, impl, op: str, x: torch.Tensor) -> Timed:
    if op == "encode":
        def call(_):
            with torch.no_grad():
                return impl.encode(x)
        return Timed(label, call)
    if op == "decode":
        with torch.no_grad():
            codes = impl.encode(x)

        def call(_):
            with torch.no_grad():
                return impl.decode(codes)
        return Timed(label, call)
    if op == "backward":
        def setup():
            impl.zero_grad()
            return impl.loss(x)
        return Timed(label, lambda loss: loss.backward(), setup)
    return Timed(label, lambda _: impl.step(x))


def _adamw_floor(F: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[Timed, dict]:
    """torch's fused AdamW step (as every candidate's step uses) on W_enc, W_dec, b_enc, b_dec of a
    flat model of F features, gradients already in place: what a step costs before any SAE work.
    Returns the timed call and its work: it reads parameters, gradients and both moments and
    writes parameters and both moments."""
    params = [torch.zeros(shape, dtype=dtype, device=device, requires_grad=True) for shape in ((F, d), (F, d), (F,), (d,))]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True)
    optimizer.step()  # the moments exist before the timed rounds
    moved = sum(p.numel() for p in params) * 7 * params[0].element_size()
    return Timed(ADAMW_FLOOR, lambda _: optimizer.step()), {"flops": 0, "bytes": moved}


def _baselines(case: Case, labels: dict) -> dict:
    """label -> the label its speedup is measured against (absent: no ratio)."""
    if case.reference:
        target = DENSE_ENCODE if case.op == "encode" else "reference"
        return {label: target for label in labels}
    # No reference: each implementation's tree models against its own flat model (issue 10's comparison).
    flat_of = {meta["impl"]: label for label, meta in labels.items() if meta["flat"]}
    models_of = {}
    for meta in labels.values():
        models_of[meta["impl"]] = models_of.get(meta["impl"], 0) + 1
    return {label: flat_of[meta["impl"]] for label, meta in labels.items()
            if meta["impl"] in flat_of and models_of[meta["impl"]] > 1}


def _candidates(case: Case, state: BenchState, x: torch.Tensor, seed: int) -> tuple[list, dict, dict]:
    """The case's timed calls, each one's description (label -> meta) and what was skipped and why."""
    element_size = x.element_size()
    top = case.models[0]
    top_base = state.base(top, case.d, case.dtype, seed)
    W_enc, b_enc, b_dec = top_base.W_enc.detach().clone(), top_base.b_enc.detach(), top_base.b_dec.detach()
    floor_work = work("encode", _flat_like(top), case.N, case.d, element_size)
    timed = [Timed(FLOOR, lambda _: x @ W_enc.T)]
    labels = {FLOOR: {"impl": "torch.matmul", "model": "flat", "flat": True, "work": floor_work}}
    if case.op == "encode":
        def dense_encode(_):
            return torch.relu(((x - b_dec) @ W_enc.T + b_enc).topk(top.k_total, dim=1).values)
        timed.append(Timed(DENSE_ENCODE, dense_encode))
        labels[DENSE_ENCODE] = {"impl": "torch.matmul+topk", "model": "flat", "flat": True, "work": floor_work}
    if case.op == "step" and case.optimizer_floor:
        adamw, adamw_work = _adamw_floor(top.dict_size, case.d, case.dtype, state.device)
        timed.append(adamw)
        labels[ADAMW_FLOOR] = {"impl": "torch.optim.AdamW", "model": "flat", "flat": True, "work": adamw_work}
    skipped = {}
    for spec in case.models:
        for name, reason in implementation_plan(spec, state.device, case.reference, case.peers):
            label = name if len(case.models) == 1 else f"{name} [{spec.label}]"
            if reason:
                skipped[label] = reason
                continue
            too_big = state.memory_shortfall(name, spec, case.d, case.dtype, x.element_size())
            if too_big:
                skipped[label] = too_big
                continue
            impl = state.implementation(name, spec, case.d, case.dtype, x, seed)
            if case.op == "encode" and impl.encode_unavailable:
                skipped[label] = impl.encode_unavailable
                continue
            timed.append(_timed(label, impl, case.op, x))
            labels[label] = {"impl": name, "model": spec.label, "flat": spec.flat, "level_sizes": list(spec.level_sizes),
                             "k": list(spec.k), "selection": spec.selection,
                             "work": work(case.op, spec, case.N, case.d, element_size)}
    return timed, labels, skipped


def _time(case: Case, state: BenchState, timed: list, benchmark) -> tuple[RoundRobin, int, dict]:
    """Warm up (the last warmup round measures memory), size the rounds to the budget, then let
    pytest-benchmark drive them. Returns the timer, the rounds run and the ceilings of those rounds."""
    ceiling_timed, ceiling_work = ceiling_candidates(state.device, case.dtype)
    timer = RoundRobin(timed + ceiling_timed, state.device, warmup=state.warmup)
    started = time.perf_counter()
    for _ in range(state.warmup):
        timer()
    rounds = case.rounds or state.rounds
    if state.budget_s and state.warmup:
        seconds_per_round = (time.perf_counter() - started) / state.warmup
        rounds = max(MIN_ROUNDS, min(rounds, int(state.budget_s / seconds_per_round)))
    benchmark.pedantic(timer, rounds=rounds, warmup_rounds=0, iterations=1)
    return timer, rounds, ceilings_from(timer.samples, ceiling_work)


def run_case(case: Case, benchmark, state: BenchState) -> dict:
    device, dtype = state.device, case.dtype
    seed = case_seed(case)
    x = torch.randn(case.N, case.d, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    state.keep_only({(spec, case.d, dtype) for spec in case.models})
    load = LoadWindow()
    timed, labels, skipped = _candidates(case, state, x, seed)
    timer, rounds, ceilings = _time(case, state, timed, benchmark)
    # The encoder GEMM is a large matmul timed in the same rounds too; where it runs faster than the
    # square one (small square shapes on CPU), it is the better ceiling.
    floor_tflops = labels[FLOOR]["work"]["flops"] / statistics.median(timer.samples[FLOOR]) / 1e12
    if floor_tflops > ceilings["matmul_tflops"]:
        ceilings.update(matmul_tflops=floor_tflops,
                        matmul_shape=f"the encoder GEMM {case.N}x{case.d}x{case.models[0].dict_size}")
    baselines = _baselines(case, labels)
    results = {}
    for label, meta in labels.items():
        samples = timer.samples[label]
        entry = dict(meta, **summarize(samples))
        seconds = entry["median_ms"] / 1e3
        peak = timer.peak_bytes[label]
        entry.update(
            tokens_per_s=case.N / seconds,
            peak_mem_mb=None if peak is None else peak / 2**20,
            tflops=meta["work"]["flops"] / seconds / 1e12,
            gbps=meta["work"]["bytes"] / seconds / 1e9,
            time_vs_floor=paired_ratio(samples, timer.samples[FLOOR]),
        )
        entry["tflops_of_ceiling"] = entry["tflops"] / ceilings["matmul_tflops"]
        entry["gbps_of_ceiling"] = entry["gbps"] / ceilings["copy_gbps"]
        if label in baselines and baselines[label] in timer.samples:
            entry["baseline"] = baselines[label]
            entry["speedup_vs_baseline"] = paired_ratio(timer.samples[baselines[label]], samples)
        results[label] = entry
    info = {
        "case": case.name, "group": case.group, "op": case.op, "N": case.N, "d": case.d,
        "F": max(spec.dict_size for spec in case.models), "sweep_axis": case.sweep_axis,
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rounds": rounds,
        "warmup": state.warmup, "budget_s": state.budget_s, "order": "round-robin, start rotated each round",
        "memory_method": memory_method(device), "ceilings": ceilings, "candidates": results, "skipped": skipped,
        **load.close(),
    }
    benchmark.extra_info.update(info)
    return info


def _flat_like(spec: ModelSpec) -> ModelSpec:
    """The flat model of the same total size: the GEMM floor's work."""
    return ModelSpec("flat", (spec.dict_size,), (spec.k_total,), "token")
