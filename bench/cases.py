"""What `pytest bench/` measures: the shape sets, and a model of each op's work (FLOPs, bytes).

A case is one op at one shape; its candidates (every available backend, the dense reference, the
peers, the encoder-GEMM floor) are timed round-robin against each other. Sets:
  cpu    the default on a CPU: sized for 2 cores, finishes well inside 10 minutes
  gpu    the default on CUDA: GPT-2-small and Gemma-2-2B shapes and the routed trees at N=8192, bf16
  sweep  scaling: step time against F and against N, and routed trees against F (long; opt-in)
  all    every case of the device's sets
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hsae_fast.config import HSAEConfig, sizes_from_ratios

OPS = ("encode", "decode", "backward", "step")
SWEEP_PEERS = ("sparsify",)  # SAELens scores and scatters a dense N x F matrix: too slow to sweep
SETS = ("cpu", "gpu", "sweep", "all")


@dataclass(frozen=True)
class ModelSpec:
    """One SAE to time: `label` names it in tables; the rest are HSAEConfig fields."""

    label: str
    level_sizes: tuple
    k: tuple
    selection: str

    @property
    def flat(self) -> bool:
        return len(self.level_sizes) == 1

    @property
    def dict_size(self) -> int:
        return sum(self.level_sizes)

    @property
    def k_total(self) -> int:
        return sum(self.k)

    def config(self, d_model: int) -> HSAEConfig:
        return HSAEConfig(d_model=d_model, level_sizes=self.level_sizes, k=self.k, selection=self.selection)


def flat(F: int, k: int, selection: str = "token") -> ModelSpec:
    """A plain TopK SAE; token selection by default, the rule the peers implement."""
    return ModelSpec("flat", (F,), (k,), selection)


def default_tree(F: int, k: tuple, selection: str = "batch") -> ModelSpec:
    """SPEC default level ratios (16, 4, 1), training selection."""
    sizes = sizes_from_ratios(F, (16, 4, 1))
    return ModelSpec("3-level", sizes, k, selection)


def wide_tree(F: int, k: tuple, selection: str = "batch") -> ModelSpec:
    """Issue 10's wide tree: a small top (F/512), branching 16 then about 31 (at F=65536: 63360/2048/128)."""
    top, middle = F // 512, F // 32
    return ModelSpec("wide 3-level", (F - top - middle, middle, top), k, selection)


@dataclass(frozen=True)
class Case:
    """One op at one shape. `models` are timed with every implementation that can run them;
    `reference` says whether the dense reference joins (too slow for the big sweeps)."""

    name: str
    group: str  # the table a case belongs to (report groups cases by it)
    op: str
    N: int
    d: int
    models: tuple
    dtype: torch.dtype
    reference: bool = True
    rounds: Optional[int] = None  # None: the session default
    peers: tuple = ("sparsify", "saelens")  # which peers join the flat models
    sweep_axis: Optional[str] = None  # "F" or "N" for scaling cases: the report plots against it
    optimizer_floor: bool = False  # step cases: also time fused AdamW alone on a flat model's parameters


def _ops_cases(group: str, N: int, d: int, F: int, k_flat: int, k_tree: tuple, dtype, prefix: str):
    cases = []
    for spec in (flat(F, k_flat), default_tree(F, k_tree)):
        for op in OPS:
            cases.append(Case(f"{prefix}-{spec.label.replace(' ', '')}-{op}", group, op, N, d, (spec,), dtype))
    return cases


def _routed_cases(group: str, N: int, d: int, dtype, prefix: str):
    F, k_tree = 65536, (20, 8, 4)
    models = (flat(F, 32, "batch"), default_tree(F, k_tree), wide_tree(F, k_tree))
    # A routed step is memory-bound: fused AdamW's pass over every parameter and moment is timed
    # alone beside it, the floor no routing removes.
    return [Case(f"{prefix}-routed-F{F}-{op}", group, op, N, d, models, dtype, reference=False, rounds=5,
                 peers=("sparsify",), optimizer_floor=op == "step")
            for op in ("encode", "step")]


def cpu_cases() -> list[Case]:
    cases = _ops_cases("CPU set: N=1024, d=768, F=16384, K=32 (3-level k=20/8/4), float32",
                       1024, 768, 16384, 32, (20, 8, 4), torch.float32, "cpu")
    cases += _routed_cases("Routed trees (issue 10): N=1024, d=768, F=65536, k total 32, float32",
                           1024, 768, torch.float32, "cpu")
    return cases


def gpu_cases() -> list[Case]:
    cases = _ops_cases("GPT-2-small: N=8192, d=768, F=24576, K=32 (3-level k=20/8/4), bf16",
                       8192, 768, 24576, 32, (20, 8, 4), torch.bfloat16, "gpt2")
    cases += _ops_cases("Gemma-2-2B: N=4096, d=2304, F=65536, K=64 (3-level k=40/16/8), bf16",
                        4096, 2304, 65536, 64, (40, 16, 8), torch.bfloat16, "gemma")
    cases += _routed_cases("Routed trees (issue 10): N=8192, d=768, F=65536, k total 32, bf16",
                           8192, 768, torch.bfloat16, "gpu")
    return cases


def sweep_cases(device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    d, N, k_tree = 768, 1024, (20, 8, 4)
    F_values = [4096 * 2**i for i in range(9 if gpu else 6)]  # 4096 .. 1M on GPU, .. 131072 on CPU
    cases = []
    for F in F_values:
        cases.append(Case(f"sweepF-F{F}", f"Scaling with F: step, N={N}, d={d}, K=32", "step", N, d,
                          (flat(F, 32), default_tree(F, k_tree)), dtype, reference=F <= 16384, rounds=3,
                          sweep_axis="F", peers=SWEEP_PEERS))
    for n in (1, 16, 256, 1024, 4096, 8192):
        cases.append(Case(f"sweepN-N{n}", f"Scaling with N: step, d={d}, F=16384, K=32", "step", n, d,
                          (flat(16384, 32), default_tree(16384, k_tree)), dtype, reference=n <= 1024, rounds=3,
                          sweep_axis="N", peers=SWEEP_PEERS))
    for F in (16384, 65536, 262144) + ((1048576,) if gpu else ()):
        cases.append(Case(f"sweepRouted-F{F}", f"Routed trees with F: step, N={N}, d={d}, k total 32", "step", N, d,
                          (flat(F, 32, "batch"), wide_tree(F, k_tree)), dtype, reference=False, rounds=3,
                          sweep_axis="F", peers=SWEEP_PEERS))
    # Encoding one token reads all of W_enc for N x d x F / (F x d) = 1 multiply-add per weight: memory-bound,
    # so its GB/s against the copy ceiling is the figure of merit.
    cases.append(Case("sweepEncodeN-N1", f"Encoding one token: encode, N=1, d={d}, F=16384", "encode", 1, d,
                      (flat(16384, 32), default_tree(16384, k_tree)), dtype, reference=False, rounds=7,
                      sweep_axis=None, peers=SWEEP_PEERS))
    # A routed step has a floor that does not grow with N (writing the F x d gradients, AdamW over
    # every row) while the flat step's GEMM does: the routed advantage grows with the batch.
    for n in (256, 1024, 4096):
        cases.append(Case(f"sweepRoutedN-N{n}", f"Routed trees with N: step, F=65536, d={d}, k total 32", "step", n, d,
                          (flat(65536, 32, "batch"), wide_tree(65536, k_tree)), dtype, reference=False, rounds=3,
                          sweep_axis="N", peers=()))
    return cases


def cases_for(set_name: str, device: torch.device) -> list[Case]:
    if set_name not in SETS:
        raise ValueError(f"--bench-set={set_name!r}: expected one of {SETS}")
    default = gpu_cases() if device.type == "cuda" else cpu_cases()
    if set_name in ("cpu", "gpu"):
        return cpu_cases() if set_name == "cpu" else gpu_cases()
    if set_name == "sweep":
        return sweep_cases(device)
    return default + sweep_cases(device)


# ------------------------------------------------------------------------------ the work model
def candidates_per_token(spec: ModelSpec) -> float:
    """Scores an encode must compute per token: every top-level feature, and at each gated level the
    children of the k_{l+1} active parents, about k_{l+1} * F_l / F_{l+1} (SPEC 4)."""
    sizes, k = spec.level_sizes, spec.k
    scored = float(sizes[-1])
    for level in range(len(sizes) - 1):
        scored += k[level + 1] * sizes[level] / sizes[level + 1]
    return scored


def work(op: str, spec: ModelSpec, N: int, d: int, element_size: int) -> dict:
    """The FLOPs and bytes an op needs at the least (a sparse algorithm's work, not the dense one's):
    achieved TFLOP/s and GB/s are reported against these and the device's measured ceilings.

    encode: 2*N*d per scored candidate; reads the rows it scores (the whole top level, gated rows
    at most once each). decode: 2*N*K*d; reads the active decoder rows (at most F of them).
    backward: grad of W_dec rows, activations, W_enc rows and x: 4 products of 2*N*K*d.
    step: all three, plus AdamW reading parameters, gradients and two moments and writing three."""
    K = spec.k_total
    F = spec.dict_size
    scored = candidates_per_token(spec)
    rows_read = min(F, spec.level_sizes[-1] + N * (scored - spec.level_sizes[-1]))
    io = N * d * element_size * 2  # x in, x_hat or grad out
    encode = (2 * N * d * scored, rows_read * d * element_size + io)
    decode = (2 * N * K * d, min(F, N * K) * d * element_size + io)
    backward = (8 * N * K * d, 2 * min(F, N * K) * d * element_size * 2 + 2 * io)
    if op == "encode":
        flops, bytes_ = encode
    elif op == "decode":
        flops, bytes_ = decode
    elif op == "backward":
        flops, bytes_ = backward
    else:
        params = 2 * F * d + 2 * F + d
        flops = encode[0] + decode[0] + backward[0]
        bytes_ = encode[1] + decode[1] + backward[1] + params * (4 * element_size + 3 * element_size)
    return {"flops": flops, "bytes": bytes_}


def training_state_bytes(spec: ModelSpec, d: int, element_size: int) -> int:
    """Memory one implementation holds to be timed: parameters, gradients and two AdamW moments, plus
    the float64 weights and gradients of its one-off correctness check."""
    F = spec.dict_size
    params = 2 * F * d + 2 * F + d
    return params * element_size * 4 + 2 * F * d * 8 * 2


STEP_K = (20, 8, 4)  # the trees' k in the step scripts (issue 10: total 32, as the flat SAE's)


def add_step_case_args(parser) -> None:
    """The step scripts' shared options: which model (`step_case`), its shape, and the batch pool."""
    parser.add_argument("--model", choices=("wide", "default", "flat"), default="wide")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--f", type=int, default=65536)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, taken in turn")


def step_case(args) -> tuple:
    """(ModelSpec, batches) for `add_step_case_args`' options: the wide or SPEC-default tree (k STEP_K),
    or the flat SAE (k 32), all with batch selection; `args.batches` fixed random (n, d) batches."""
    spec = {"wide": wide_tree(args.f, STEP_K), "default": default_tree(args.f, STEP_K),
            "flat": flat(args.f, sum(STEP_K), "batch")}[args.model]
    gen = torch.Generator().manual_seed(0)
    return spec, [torch.randn(args.n, args.d, generator=gen) for _ in range(args.batches)]

