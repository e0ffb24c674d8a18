"""Round-robin timing of one case's candidates in one process, peak memory, device ceilings and the
machine's description.

Why round-robin: these machines are shared, and the same GEMM was seen here at 100 ms in one minute
and 223 ms in another. Timing each candidate in turn, round after round, exposes every candidate to
the same load; a ratio is then taken within each round (both numbers saw the same minute) and the
median of those per-round ratios is reported. A ratio of two separate sequential runs is noise.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from hsae_fast.train import host


@dataclass
class Timed:
    """One candidate as the timer sees it: `setup()` runs untimed before every call (e.g. the forward
    whose backward is timed) and returns what `call` takes; `call(arg)` is the timed work."""

    name: str
    call: Callable[[Any], Any]
    setup: Optional[Callable[[], Any]] = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RoundRobin:
    """Callable that runs one round (each candidate once) per call; pytest-benchmark drives the rounds.

    The first `warmup` rounds are not timed; the last of them measures each call's peak memory
    instead (so measuring costs no extra round, and one-time work such as lazy caches is done by then).
    The starting candidate rotates every round so that no candidate always runs right after the same
    neighbour (caches, allocator state, turbo budget)."""

    def __init__(self, candidates: list[Timed], device: torch.device, warmup: int):
        self.candidates = candidates
        self.device = device
        self.warmup = warmup
        self.rounds_run = 0
        self.samples: dict[str, list[float]] = {c.name: [] for c in candidates}
        self.peak_bytes: dict[str, Optional[int]] = {c.name: None for c in candidates}

    def __call__(self) -> None:
        n = len(self.candidates)
        measure_memory = self.rounds_run == self.warmup - 1
        for j in range(n):
            candidate = self.candidates[(self.rounds_run + j) % n]
            arg = candidate.setup() if candidate.setup else None
            if measure_memory:
                with PeakMemory(self.device) as peak:
                    candidate.call(arg)
                self.peak_bytes[candidate.name] = peak.bytes
                del arg
                continue
            synchronize(self.device)
            start = time.perf_counter()
            candidate.call(arg)
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            if self.rounds_run >= self.warmup:
                self.samples[candidate.name].append(elapsed)
            del arg
        self.rounds_run += 1


def parse_cpp_script_args(parser, rounds: int = 7) -> tuple:
    """The round-robin scripts' shared options (--rounds, --warmup, --threads) parsed, the thread count
    applied and the C++ backend required: returns (args, the backend's availability message)."""
    from hsae_fast import available_backends

    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--untuned-host", action="store_true",
                        help="leave glibc's allocator and Python's collector as they are (the trainer tunes both: "
                             "hsae_fast/train/host.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.untuned_host:
        os.environ["HSAE_HOST_TUNING"] = "0"
    host.tune_allocator()  # what Trainer.fit does; round_robin_samples freezes the collector as it does
    ok, why = available_backends()["cpp"]
    if not ok:
        raise SystemExit(f"the cpp backend is not available: {why}")
    from hsae_fast.backends import cpp

    # Dense levels' times depend on it (cpp.screen_mode): the results must say which it was.
    return args, f"{why}; bfloat16 screen mode {cpp.screen_mode()} (HSAE_CPU_BF16_SCREEN)"


def layer_fwd_bwd(layer, x: torch.Tensor) -> Callable[[Any], None]:
    """A timed call: gradients set to None, `layer(x)` (its own default selection), backward of the MSE."""
    def call(_):
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        (out.x_hat - x).float().pow(2).sum(-1).mean().backward()

    return call


def trainer_step_over(layer, optimizer, batches: list) -> Callable[[Any], None]:
    """A timed call: the trainer's step (gradients set to None, forward, backward of the MSE,
    `optimizer.update` as the trainer calls it) on the next of `batches`, taken in turn; `call.steps`
    counts the steps taken."""
    def call(_):
        x = batches[call.steps % len(batches)]
        call.steps += 1
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        (out.x_hat - x).float().pow(2).sum(-1).mean().backward()
        optimizer.update(1.0, True, backward_norms=True)

    call.steps = 0
    return call


def steady_fused_adamw(params: list, lr: float) -> torch.optim.Optimizer:
    """torch's fused AdamW (CPU and CUDA) with its moments allocated by a step at lr 0, which moves
    nothing: the first timed step is then a steady-state one, not one that also creates the state.
    Leaves every gradient None."""
    optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = lr
    for p in params:
        p.grad = None
    return optimizer


def summarize(samples: list[float]) -> dict:
    """Median and spread of one candidate's per-round times, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "q25_ms": quartiles[0],
        "q75_ms": quartiles[2],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "samples_ms": [s * 1e3 for s in samples],
    }


def round_robin_samples(candidates: list[Timed], device: torch.device, warmup: int, rounds: int) -> dict[str, list[float]]:
    """What the bench scripts run without pytest-benchmark: `warmup` untimed rounds, then `rounds`
    timed ones; each candidate's times in seconds, one per timed round."""
    timer = RoundRobin(candidates, device, warmup=warmup)
    with host.frozen_gc():  # as in Trainer.fit (HSAE_HOST_TUNING=0: not)
        for _ in range(warmup + rounds):
            timer()
    return timer.samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median (and quartiles) over rounds of numerator[r] / denominator[r]: both times of a round saw
    the same machine load, so the ratio cancels it where a ratio of two medians would not."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q25": quartiles[0], "q75": quartiles[2]}


# --------------------------------------------------------------------------------- peak memory
_libc = None


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so the next RSS baseline is not inflated by them."""
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def cpu_memory_method() -> Optional[str]:
    """The CPU peak-memory method, or None where the kernel offers no resettable high-water mark."""
    global _CPU_METHOD
    if _CPU_METHOD is None:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            _proc_status_kb("VmHWM")
            _CPU_METHOD = "RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) above the RSS before the call"
        except (OSError, RuntimeError):
            _CPU_METHOD = ""
    return _CPU_METHOD or None


_CPU_METHOD: Optional[str] = None


class PeakMemory:
    """Extra memory the enclosed code needs at its peak, above what was held when it began
    (parameters, optimizer state and a setup's outputs are held before, so they are not counted).

    CUDA: the caching allocator's max_memory_allocated. CPU: see `cpu_memory_method`; `bytes` stays
    None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif cpu_memory_method() is not None:
            _malloc_trim()
            self._base = _proc_status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif cpu_memory_method() is not None:
            self.bytes = max(0, _proc_status_kb("VmHWM") * 1024 - self._base)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA caching allocator: max_memory_allocated above memory_allocated before the call"
    return cpu_memory_method() or "unavailable (no /proc/self/clear_refs)"


def free_memory_bytes(device: torch.device) -> int:
    """What can still be allocated: free GPU memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# ----------------------------------------------------------------------------- device ceilings
CEILING_MATMUL = "ceiling: matmul"
CEILING_COPY = "ceiling: copy"


def ceiling_candidates(device: torch.device, dtype: torch.dtype) -> tuple[list[Timed], dict]:
    """A large matmul and a large copy, timed in the same rounds as a case's candidates so that the
    ceilings see the same load; returns them and the work each does (flops, bytes)."""
    n, copy_elements = (8192, 1 << 29) if device.type == "cuda" else (1024, 1 << 24)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.ones(copy_elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    timed = [Timed(CEILING_MATMUL, lambda _: a @ b), Timed(CEILING_COPY, lambda _: dst.copy_(src))]
    work = {"matmul_flops": 2 * n**3, "matmul_shape": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
            "copy_bytes": 2 * src.numel() * src.element_size()}  # read + write
    return timed, work


def ceilings_from(samples: dict, work: dict) -> dict:
    return {
        "matmul_tflops": work["matmul_flops"] / statistics.median(samples[CEILING_MATMUL]) / 1e12,
        "matmul_shape": work["matmul_shape"],
        "copy_gbps": work["copy_bytes"] / statistics.median(samples[CEILING_COPY]) / 1e9,
        "copy_bytes_moved": work["copy_bytes"],
    }


# ------------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags_of_note() -> list[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    return []


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The commit (with "-dirty" for uncommitted changes to tracked files) the timed code came from."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read when the session imports the harness, not when pytest-benchmark asks at the end: a long run
# on a shared checkout can outlive the commit it started from.
_COMMIT_AT_START = _git_commit()


def machine_description() -> dict:
    """What ran the benchmarks: enough to tell two results files apart."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": _cpu_flags_of_note(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "eai_sparsify": _version("eai-sparsify"),
        "sae_lens": _version("sae-lens"),
        "python": platform.python_version(),
        "hsae_fast_commit": _COMMIT_AT_START,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # pytest-benchmark asks for this when it writes the JSON, at the end of the session
        "load_average_when_written": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu_model"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class LoadWindow:
    """The 1-minute load average before and after a case: how busy the shared machine was."""

    before: float = field(default_factory=lambda: os.getloadavg()[0])
    after: Optional[float] = None

    def close(self) -> dict:
        self.after = os.getloadavg()[0]
        return {"load_1min_before": self.before, "load_1min_after": self.after}
