"""The harness itself, on tiny shapes (seconds, no timings asserted): wrong implementations must fail
the correctness gate, ratios must come from interleaved rounds, and a run must render to a report."""
import json

import dataclasses

import pytest
import torch

import hsae_fast.backends.torch_sparse as torch_sparse
from bench import harness, report
from bench.candidates import PEERS, Sparsify, base_layer, build_implementation, peer_missing
from bench.cases import Case, default_tree, flat
from bench.timing import PeakMemory, RoundRobin, Timed, cpu_memory_method, paired_ratio

CPU = torch.device("cpu")
D = 24


class StubBenchmark:
    """Just enough of pytest-benchmark's fixture: pedantic() drives the rounds, extra_info collects."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds + rounds * iterations):
            target()


def tiny_case(op, models=(flat(96, 4),), reference=True):
    return Case(f"tiny-{op}", "tiny", op, 40, D, models, torch.float32, reference=reference, rounds=2)


def test_round_robin_rotates_and_discards_warmup():
    order = []
    timer = RoundRobin([Timed(n, lambda _, n=n: order.append(n)) for n in "abc"], CPU, warmup=1)
    for _ in range(3):
        timer()
    assert order == list("abc") + list("bca") + list("cab")
    assert all(len(s) == 2 for s in timer.samples.values())


@pytest.mark.skipif(cpu_memory_method() is None, reason="no resettable RSS high-water mark here")
def test_peak_memory_sees_a_transient_buffer_and_not_what_was_held():
    held = torch.ones(16 * 2**20 // 4)  # 16 MiB held before: not counted
    with PeakMemory(CPU) as peak:
        transient = torch.ones(64 * 2**20 // 4)  # 64 MiB at the peak, freed before the end
        del transient
    assert 60 * 2**20 <= peak.bytes < 76 * 2**20, peak.bytes
    del held


def test_paired_ratio_is_per_round():
    # Load doubles in round 2: both candidates slow down together, the per-round ratio stays 2.
    assert paired_ratio([2.0, 4.0, 2.0], [1.0, 2.0, 1.0])["median"] == 2.0


@pytest.mark.parametrize("op", ["encode", "decode", "backward", "step"])
def test_run_case_reports_every_candidate(op):
    state = harness.BenchState(device=CPU, rounds=2, warmup=1)
    info = harness.run_case(tiny_case(op), StubBenchmark(), state)
    results = info["candidates"]
    assert harness.FLOOR in results and "torch" in results
    assert ("reference" in results) == (op != "encode") and ("matmul+topk" in results) == (op == "encode")
    for label, entry in results.items():
        assert len(entry["samples_ms"]) == 2, label
        assert entry["peak_mem_mb"] is not None or cpu_memory_method() is None, label
        assert entry["median_ms"] > 0 and entry["tokens_per_s"] > 0
    assert "speedup_vs_baseline" in results["torch"]


def test_routed_case_compares_each_backend_with_its_flat_model():
    models = (flat(96, 8, "batch"), default_tree(96, (4, 2, 2)))
    state = harness.BenchState(device=CPU, rounds=2, warmup=0)
    case = dataclasses.replace(tiny_case("step", models, reference=False), optimizer_floor=True)
    results = harness.run_case(case, StubBenchmark(), state)["candidates"]
    assert results["torch [3-level]"]["baseline"] == "torch [flat]"
    # the optimizer floor is timed beside them, with no ratio of its own
    assert results[harness.ADAMW_FLOOR]["median_ms"] > 0 and "baseline" not in results[harness.ADAMW_FLOOR]


def test_wrong_backend_fails_the_gate(monkeypatch):
    """A backend whose decode is 1% off must not be timed: the check against float64 raises."""
    real = torch_sparse.decode_forward

    def off_by_one_percent(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * 1.01

    monkeypatch.setattr(torch_sparse, "decode_forward", off_by_one_percent)
    state = harness.BenchState(device=CPU, rounds=1, warmup=0)
    with pytest.raises(AssertionError, match="x_hat"):
        harness.run_case(tiny_case("step"), StubBenchmark(), state)


@pytest.mark.skipif(peer_missing("sparsify") is not None, reason="sparsify not installed")
def test_wrong_peer_fails_the_gate():
    spec = flat(96, 4)
    base = base_layer(spec, D, torch.float32, CPU, seed=0)
    peer = Sparsify(base, spec)
    with torch.no_grad():
        peer.sae.W_dec.mul_(1.01)  # a decoder 1% off the model's
    x = torch.randn(40, D)
    with pytest.raises(AssertionError):
        peer.check(x, base, seed=0)


@pytest.mark.parametrize("peer", PEERS)
def test_peers_match_the_reference(peer):
    if peer_missing(peer):
        pytest.skip(peer_missing(peer))
    spec = flat(96, 4)
    base = base_layer(spec, D, torch.float32, CPU, seed=1)
    build_implementation(peer, base, spec).check(torch.randn(40, D), base, seed=1)


def test_report_renders_a_run(tmp_path):
    state = harness.BenchState(device=CPU, rounds=2, warmup=0)
    bench = StubBenchmark()
    harness.run_case(tiny_case("step"), bench, state)
    data = {"machine_info": {"hsae_bench": {"cpu_model": "test cpu", "torch": torch.__version__}},
            "benchmarks": [{"name": "test_case[tiny-step]", "extra_info": bench.extra_info}]}
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(data))
    written = report.render(path, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "test cpu" in table and "| torch |" in table and "reference" in table
    assert any(str(p).endswith(".png") for p in written)


def test_implementations_that_would_not_fit_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(harness, "free_memory_bytes", lambda device: 1024)
    state = harness.BenchState(device=CPU, rounds=1, warmup=1)
    info = harness.run_case(tiny_case("step"), StubBenchmark(), state)
    assert "torch" not in info["candidates"] and "GiB free" in info["skipped"]["torch"]
