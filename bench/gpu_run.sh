#!/usr/bin/env bash
# One call on a lent H100/H200: the GPU correctness tests, then the benchmarks; everything under $OUT.
#
#   bench/gpu_run.sh --fetch-wheels   here, before the call: peers' wheels into .whl/ (the device has no network)
#   bench/gpu_run.sh                  on the device: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=500)
#                                     (GPU_STEPS="routed ops" bash bench/gpu_run.sh: only those steps)
#                                     The timing step (profiles, sync sites, CUDA-graph steps) runs last;
#                                     to have it first when a lease may be cut short, one call can run
#                                     GPU_STEPS="tests timing" bash bench/gpu_run.sh; GPU_STEPS="routed ops trainer" bash bench/gpu_run.sh
#   bench/gpu_run.sh --dry-run        anywhere, no GPU: syntax, imports, test collection, and the
#                                     standalone timing at tiny shapes under the Triton interpreter
#   bench/gpu_run.sh --compile-check  anywhere, no GPU: compile the kernels for sm_90 with Triton's
#                                     bundled ptxas and print registers and spills per config
#
# First run: bench/results/gpu-h100/ (one H100, torch 2.11, triton 3.6, pytest-benchmark 5.x); second:
# bench/results/gpu-h200/ (one H200, three calls; the last ran every step in 365 s).
# Steps are time-boxed so the whole run ends inside one 10-minute call (device time is 15 min a
# session, start included); a failing step is logged and the next one still runs.
# Files back in $OUT (at most 8): env.txt, tests.log, timing.md, timing.log, bench.log,
# bench_results.md, bench_results.tgz, trainer.log.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-run}
case "$MODE" in
  run|--dry-run|--fetch-wheels|--compile-check) ;;
  *) echo "usage: bench/gpu_run.sh [--dry-run|--fetch-wheels|--compile-check]" >&2; exit 2 ;;
esac

if [[ "$MODE" == "--compile-check" ]]; then
  # Register pressure is the first thing to get right on Hopper (255 registers a thread, then
  # spills to local memory); this needs no GPU, so configs can be pruned before a lease.
  TRITON_INTERPRET=0 exec "${PYTHON:-.venv/bin/python}" - <<'PY'
import os
import subprocess
import tempfile
import warnings

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.decode as decode
import kernels.encode_dense as dense
import kernels.encode_routed as routed

warnings.filterwarnings("ignore")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = {"xc_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "edge_ptr": "*bf16", "gain_ptr": "*bf16",
            "bias_ptr": "*bf16", "live_ptr": "*i8", "parent_ptr": "*i64", "pidx_ptr": "*i64", "idx_ptr": "*i64",
            "order_ptr": "*i64", "pair_order_ptr": "*i64", "pair_ptr_ptr": "*i64", "block_ptr_ptr": "*i64",
            "block_parent_ptr": "*i64", "child_ptr_ptr": "*i64", "child_ids_ptr": "*i64", "feat_ptr_ptr": "*i64",
            "out_id_ptr": "*i32", "out_slot_ptr": "*i32", "cand_id_ptr": "*i32", "slot_level_ptr": "*i32",
            "level_stop_ptr": "*i32"}


def check(kernel, constants, warps, stages):
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "*fp32") if name.endswith("_ptr")
                 else "i32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    regs = next((line.split()[0:2] for line in usage.splitlines() if "REG:" in line), ["?"])
    shown = {k: v for k, v in constants.items() if k.startswith("BLOCK") or k in ("KMAX",)}
    print(f"{kernel.fn.__name__:32s} {shown} warps={warps} stages={stages}: {' '.join(regs)}")


bf16 = dict(ACC=tl.float32, DOT=tl.bfloat16, PRECISION="tf32")
for config in dense._gpu_configs():
    for kmax in (64, 256):
        check(dense._dense_topk_kernel, dict(KMAX=kmax, KPAD=kmax, SLOT_BITS=0, HAS_PARENT=False, **bf16, **config.kwargs),
              config.num_warps, config.num_stages)
blocks = dict(routed._GPU_BLOCKS)
warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
check(routed._routed_scores_kernel, dict(**bf16, **blocks, BLOCK_C=64), warps, stages)
for config in decode._gather_sum_configs():
    for prefixes in (False, True):
        check(decode._gather_sum_kernel, dict(HAS_BIAS=True, PREFIXES=prefixes, ACC=tl.float32, **config.kwargs),
              config.num_warps, config.num_stages)
check(decode._gather_dot_kernel, dict(ACTIVE_ONLY=True, ACC=tl.float32, BLOCK_K=decode._BLOCK_K,
                                      BLOCK_D=decode._BLOCK_D), 4, 2)
check(decode._scatter_rows_atomic_kernel, dict(NUM_SUMS=2, ACC=tl.float32, BLOCK_K=decode._BLOCK_K,
                                               BLOCK_D=decode._BLOCK_D), 4, 2)
check(decode._scatter_rows_sorted_kernel, dict(NUM_SUMS=2, SUMS_PAD=2, ACC=tl.float32, BLOCK_E=decode._BLOCK_E,
                                               BLOCK_D=decode._BLOCK_D), 4, 2)
PY
fi

if [[ "$MODE" == "--fetch-wheels" ]]; then
  # The device's python3 is CPython 3.12 with torch, triton, transformers, accelerate, einops,
  # pandas and pyarrow already (KINDS.md); only sparsify and what `import sparsify` needs beyond
  # that list travel (its trainer imports datasets and schedulefree). SAELens does not: it pulls
  # transformer-lens, wandb, plotly and nltk, so the GPU tables skip it with the reason.
  mkdir -p .git/info
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for spec in eai-sparsify natsort simple-parsing docstring-parser schedulefree datasets dill multiprocess; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$spec" || echo "could not fetch $spec (the bench skips that peer)"
  done
  ls -la .whl
  exit 0
fi

if [[ "$MODE" == "--dry-run" ]]; then
  OUT=${OUT:-$(mktemp -d)}
  PY=${PYTHON:-.venv/bin/python}
  export TRITON_INTERPRET=1
else
  OUT=${OUT:?run this through the device tool, which sets OUT, or pass --dry-run}
  PY=${PYTHON:-python3}
  export TRITON_INTERPRET=0   # tests/conftest.py only sets it when unset: real kernels on CUDA tensors
  # The C++ backend is CPU-only: building it (a minute of -O3, tests/conftest.py's default) would
  # spend device time on something no GPU step uses.
  export HSAE_CPP_JIT=0
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "results in $OUT"

if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# GPU_STEPS picks the device steps (a rerun of what failed): any of tests routed ops trainer timing.
GPU_STEPS=" ${GPU_STEPS:-tests routed ops trainer timing} "
wants() { [[ "$GPU_STEPS" == *" $1 "* ]]; }

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log, never abort the script
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  echo "== $name (limit ${limit}s)" >> "$log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  tail -n 3 "$log"
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
}

{
  date -u
  git log --oneline -1 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "$MODE" == "--dry-run" ]]; then
  bash -n "$0" && echo "syntax ok"
  step "import backend" 120 "$OUT/tests.log" "$PY" -c "from hsae_fast.backends import get_backend; get_backend('triton', 'cpu'); print('triton backend imports')"
  step "collect tests" 120 "$OUT/tests.log" "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_triton_kernels.py tests/test_backends.py
  step "collect bench" 120 "$OUT/bench.log" "$PY" -m pytest -q --collect-only -p no:cacheprovider bench/
  step "trainer" 120 "$OUT/trainer.log" "$PY" -m hsae_fast.cli train --data synthetic --out "$OUT/demo_run" \
    --baseline flat --tokens 16384 --batch-size 1024 --eval-tokens 4096 --progress false
  TIMING_SHAPE="64 32 256 8"   # N d F K: seconds under the interpreter
else
  # Correctness on CUDA tensors: the kernel tests and the full backend product (DeviceMirror).
  # tests/test_backends.py is not run here: its triton cases need the interpreter (CI runs them).
  # Compiling a few hundred kernel variants dominates, so spread it over processes (xdist).
  parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  wants tests && step "gpu tests: kernels and the CUDA backend product" 150 "$OUT/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} --durations=10 -rf tests/test_triton_kernels.py
  # The benchmarks, in two parts so that one running long cannot starve the other: issue 10's
  # routed table first (N=8192, bf16, with sparsify), then the GPT-2-small and Gemma-2-2B sets.
  results=/tmp/hsae_bench_results
  wants routed && step "pytest bench/ -k routed" 90 "$OUT/bench.log" \
    "$PY" -m pytest bench/ -q -rf --durations=15 -p no:cacheprovider -k "test_case and routed" --bench-out "$results/routed"
  wants ops && step "pytest bench/ -k 'gpt2 or gemma'" 140 "$OUT/bench.log" \
    "$PY" -m pytest bench/ -q -rf --durations=15 -p no:cacheprovider -k "test_case and (gpt2 or gemma) or test_peer_installed" --bench-out "$results/ops"
  # The trainer end to end on CUDA (the README's demo task, larger batches): it has never run there.
  # 1M tokens, not the default 3M: session 14's H200 had not finished 3M twice (HSAE and the flat
  # baseline) within 75 s, and there is no progress output to say how far it got.
  wants trainer && step "trainer on CUDA: hsae train --data synthetic --baseline flat" 120 "$OUT/trainer.log" \
    "$PY" -m hsae_fast.cli train --data synthetic --tokens 1000000 \
    --out /tmp/hsae_gpu_demo --baseline flat --batch-size 4096 --progress false
  for part in routed ops; do
    [[ -f "$results/$part/results.md" ]] && cat "$results/$part/results.md" >> "$OUT/bench_results.md"
  done
  [[ -d "$results" ]] && tar -czf "$OUT/bench_results.tgz" -C "$(dirname "$results")" "$(basename "$results")"
  TIMING_SHAPE="8192 2304 65536 64"
fi

# Standalone timing of the encode against torch.matmul and matmul + topk (issue 4's targets), the
# routed encode of a wide level, and the decode's bandwidth; round-robin, medians, peak memory.
wants timing && step "standalone timing and step profiles" 200 "$OUT/timing.log" "$PY" - $TIMING_SHAPE "$OUT/timing.md" <<'PY'
import collections
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

import kernels
from kernels.decode import decode_backward, decode_forward
from kernels.encode_dense import encode_dense
from kernels.encode_routed import encode_routed

N, d, F, K = (int(v) for v in sys.argv[1:5])
report = sys.argv[5]
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
rounds = 15 if cuda else 2
gen = torch.Generator(device=device).manual_seed(0)
xc = torch.randn(N, d, device=device, generator=gen).to(dtype)
W = (torch.randn(F, d, device=device, generator=gen) / d**0.5).to(dtype)
b = torch.zeros(F, device=device, dtype=dtype)
mask = torch.ones(F, dtype=torch.bool, device=device)


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peak_bytes(fn):
    if not cuda:
        return float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


# Routed: a wide level under a parent level of F/64 features (64 children each), 16 active parents.
# Ids are level-local (the kernels' contract): parents 0..P-1, children 0..F-1.
P, kp = max(1, F // 64), 16
child_ptr = torch.arange(0, F + 1, 64, device=device)
child_ids = torch.arange(F, device=device)
p_idx = torch.stack([torch.randperm(P, device=device)[:min(kp, P)] for _ in range(N)])
p_vals = torch.rand(p_idx.shape, device=device)
edge = torch.zeros(F, device=device, dtype=dtype)

# Decode: K slots per token over all F features (one level), random ids.
idx = torch.randint(0, F, (N, K), device=device)
vals = torch.rand(N, K, device=device)
gain = torch.ones(1, device=device, dtype=dtype)
g_out = torch.randn(N, d, device=device, dtype=dtype)

def sorted_backward():
    kernels.DETERMINISTIC = True
    try:
        return decode_backward(g_out, idx, vals, W, gain, [K], False, True, True, True)
    finally:
        kernels.DETERMINISTIC = None


# A batch-selected tree level's code: 4k slots of which k are kept, and (routed levels) slots with no
# candidate, all naming feature 0. The kernels skip zero coefficients; 1e-30 in their place makes
# them do the work they did before that (every slot added, the empty ones onto one row).
code_idx = torch.randint(0, F, (N, 4 * K), device=device)
code_vals = torch.rand(N, 4 * K, device=device) * (torch.rand(N, 4 * K, device=device) < 0.25)
code_idx.masked_fill_((code_vals == 0) & (torch.rand(N, 4 * K, device=device) < 0.6), 0)
code_vals_unskipped = code_vals.masked_fill(code_vals == 0, 1e-30)


def dense_as(impl):
    os.environ["HSAE_DENSE_ENCODE"] = impl
    try:
        return encode_dense(xc, W, b, mask, K)
    finally:
        del os.environ["HSAE_DENSE_ENCODE"]


def chunked_matmul_topk(chunk=max(1, 2**26 // N)):
    """cuBLAS GEMM + torch.topk over feature chunks of at most 2^26 scores, then a top-k of the
    chunks' winners: the dense encode's alternative with bounded memory."""
    vals_, ids_ = [], []
    for f0 in range(0, F, chunk):
        top = torch.topk(torch.addmm(b[f0:f0 + chunk], xc, W[f0:f0 + chunk].T), min(K, chunk, F - f0), dim=1)
        vals_.append(top.values)
        ids_.append(top.indices + f0)
    best = torch.topk(torch.cat(vals_, 1), K, dim=1)
    return best.values, torch.cat(ids_, 1).gather(1, best.indices)


cases = {
    "torch.matmul (N x F scores)": lambda: xc @ W.T,
    "matmul + bias + torch.topk": lambda: torch.topk(torch.addmm(b, xc, W.T), K, dim=1),
    "triton encode_dense (fused top-k)": lambda: dense_as("fused"),
    "encode_dense, gemm path (cuBLAS + topk, 2^26 scores a block)": lambda: dense_as("gemm"),
    "chunked matmul + topk (2^26 scores a chunk)": chunked_matmul_topk,
    f"triton encode_routed ({min(kp, P)} parents x 64 children)": lambda: encode_routed(
        xc, W, b, edge, p_idx, p_vals, child_ptr, child_ids, 64, K),
    "triton decode forward": lambda: decode_forward(idx, vals, W, gain, b[:d], [K], False),
    "triton decode backward (atomic)": lambda: decode_backward(g_out, idx, vals, W, gain, [K], False, True, True, True),
    "triton decode backward (sorted)": lambda: sorted_backward(),
    "decode backward, 4K slots, 25% kept": lambda: decode_backward(
        g_out, code_idx, code_vals, W, gain, [4 * K], False, True, True, True),
    "the same, every slot added (as before 2026-11-27)": lambda: decode_backward(
        g_out, code_idx, code_vals_unskipped, W, gain, [4 * K], False, True, True, True),
    "copy of W (bandwidth probe)": lambda: W.clone(),
}
times = {name: [] for name in cases}
for name, fn in cases.items():  # warm-up: compiles and autotunes
    fn()
for _ in range(rounds):  # round-robin, so drifting clocks hit every case alike
    for name, fn in cases.items():
        times[name].append(timed(fn))
median = {name: statistics.median(ts) for name, ts in times.items()}
peaks = {name: peak_bytes(fn) for name, fn in cases.items()}

itemsize = xc.element_size()
copy_bw = 2 * F * d * itemsize / median["copy of W (bandwidth probe)"]
# Bytes the decode must move: forward reads N*K rows of d and writes N x d; backward reads g (N x d)
# and N*K rows twice (g_vals dot, g_W scatter) and read-modify-writes N*K fp32 rows of g_W.
decode_fwd_bytes = N * K * d * itemsize + N * d * itemsize
decode_bwd_bytes = N * d * itemsize + N * K * d * (itemsize + 2 * 4)
bw = {"triton decode forward": decode_fwd_bytes, "triton decode backward (atomic)": decode_bwd_bytes,
      "triton decode backward (sorted)": decode_bwd_bytes}

mm = median["torch.matmul (N x F scores)"]
mm_topk = median["matmul + bias + torch.topk"]
lines = [
    f"# Standalone timing: N={N} d={d} F={F} K={K} {dtype} on {torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}",
    f"median of {rounds} round-robin rounds; peak = extra memory allocated during one call",
    "",
    "| case | median ms | vs matmul | vs matmul+topk | peak MiB | GB/s (share of copy) |",
    "|---|---|---|---|---|---|",
]
for name in cases:
    t = median[name]
    share = f"{bw[name] / t / 1e9:.0f} ({bw[name] / t / copy_bw:.0%})" if name in bw else ""
    lines.append(f"| {name} | {t * 1e3:.3f} | {t / mm:.2f}x | {mm_topk / t:.2f}x faster | {peaks[name] / 2**20:.1f} | {share} |")
lines += ["", f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s",
          f"targets (issue 4): encode_dense <= 1.25x matmul, >= 1.5x faster than matmul+topk; decode >= 60% of copy"]
open(report, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# Where a training step's GPU time goes (into timing.log): per model, the wall time of a step against
# the summed kernel time (a gap is host work: launches, syncs, Python), the host syncs, and the kernels
# by device time. GPT-2-small's flat and 3-level models, and issue 10's flat and wide trees (bf16).
if cuda:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.cases import default_tree, flat, wide_tree
    from hsae_fast import HSAELayer

    models = ((24576, flat(24576, 32)), (24576, default_tree(24576, (20, 8, 4))),
              (65536, flat(65536, 32, "batch")), (65536, wide_tree(65536, (20, 8, 4))))
    xs = torch.randn(8192, 768, device=device, dtype=dtype)
    graphed = ["", "## A training step eager and as one captured CUDA graph (N=8192, d=768, bf16, AdamW fused)", "",
               "| model | eager ms | kernels ms | CUDA graph ms |", "|---|---|---|---|"]

    def graphed_step_ms(layer, selection):
        """The step captured once and replayed: no host work per step (shapes are static, no syncs)."""
        opt_g = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=True, capturable=True)

        def step_g():
            (layer(xs, selection=selection).x_hat - xs).float().pow(2).sum(-1).mean().backward()
            opt_g.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt_g.zero_grad(set_to_none=True)
                step_g()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt_g.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step_g()
        graph.replay()
        return statistics.median(timed(graph.replay) for _ in range(7))

    for F_model, spec in models:
        layer = HSAELayer(spec.config(768), backend="triton", device=device, dtype=dtype).train()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=True)

        def forward():
            with torch.no_grad():
                layer(xs, selection=spec.selection)

        def train_step():
            opt.zero_grad(set_to_none=True)
            (layer(xs, selection=spec.selection).x_hat - xs).float().pow(2).sum(-1).mean().backward()
            opt.step()

        for fn in (forward, train_step):
            for _ in range(3):
                fn()
            wall = statistics.median(timed(fn) for _ in range(7))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                sync()
            events = prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 3
            syncs = {e.key: e.count // 3 for e in events
                     if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                                  "cudaMemcpyAsync", "aten::nonzero")}
            print(f"\n## {spec.label} {spec.level_sizes} k={spec.k} {spec.selection}, {fn.__name__}: "
                  f"wall {wall * 1e3:.2f} ms, kernels {kernel_us / 1e3:.2f} ms a call; per call {syncs}")
            print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
        # Which lines synchronise with the GPU (each one stalls the host until the queue drains).
        places = []

        def record_sync(message, *_args, **_kwargs):
            if "synchroniz" in str(message):
                ours = [f for f in traceback.extract_stack() if "/hsae_fast/" in f.filename or "/kernels/" in f.filename]
                places.append(" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in ours[::-1][:3]))

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record_sync
            train_step()
            sync()
        torch.cuda.set_sync_debug_mode(0)
        print(f"host syncs in one training step: {len(places)}")
        for place, count in collections.Counter(places).most_common():
            print(f"  {count} x {place or '(outside hsae_fast)'}")
        try:
            graph_ms = f"{graphed_step_ms(layer, spec.selection) * 1e3:.2f}"
        except Exception as error:  # report it, keep timing the other models
            graph_ms = f"capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        graphed.append(f"| {spec.label} {spec.level_sizes} k={spec.k} {spec.selection} | {wall * 1e3:.2f} | "
                       f"{kernel_us / 1e3:.2f} | {graph_ms} |")
        print(graphed[-1])
    open(report, "a").write("\n".join(graphed) + "\n")
PY

ls -la "$OUT"
