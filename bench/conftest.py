"""pytest options and session state for `pytest bench/`.

    pytest bench/                          the device's default set (cpu here, gpu on CUDA)
    pytest bench/ --bench-set sweep        scaling sweeps (long); --bench-set all: everything
    pytest bench/ --bench-rounds 11        more rounds per case
Results: pytest-benchmark's JSON in --bench-out (default bench/results/<set>/), rendered there
into results.md and PNG plots at the end of the session (`python -m bench.report DIR` re-renders).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared machine whose
# load exceeds its cores, every parallel region (each small op of a step) otherwise waits at its
# barrier for a descheduled spinning thread; a 3-level step at F=4096 measured 11x slower that way
# (1.6 s, load 6-7) than with PASSIVE (138 ms). It applies to every candidate alike; set
# OMP_WAIT_POLICY yourself to override it. The value is recorded with the results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/helpers.py: the one comparison helper
sys.path.insert(0, str(HERE.parent))

from bench.candidates import sparsify_env_for  # noqa: E402

sparsify_env_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

from bench.cases import SETS, cases_for  # noqa: E402
from bench.harness import BenchState  # noqa: E402
from bench.timing import machine_description, memory_method  # noqa: E402

DEFAULT_ROUNDS = {"cpu": 7, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
DEFAULT_BUDGET_S = 20.0  # timed seconds per case: keeps the default CPU set near 5 minutes on a quiet machine


def pytest_addoption(parser):
    group = parser.getgroup("hsae bench")
    group.addoption("--bench-set", choices=SETS, default=None,
                    help="shape set: cpu (default on CPU), gpu (default on CUDA), sweep, all")
    group.addoption("--bench-device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.addoption("--bench-rounds", type=int, default=None, help="at most this many timed rounds per case (cpu 7, cuda 20)")
    group.addoption("--bench-budget", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds of timed rounds per case: fewer rounds (at least 3) when rounds are slow; 0: no limit")
    group.addoption("--bench-warmup", type=int, default=None, help="untimed rounds per case, the last measuring peak memory (cpu 1, cuda 3; at least 1)")
    group.addoption("--bench-out", default=None, help="results folder (default bench/results/<set>, or <set>-<device> for sweep and all)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _set_name(config) -> str:
    return config.getoption("--bench-set") or ("gpu" if _device(config).type == "cuda" else "cpu")


def _out_dir(config) -> Path:
    out = config.getoption("--bench-out")
    if out:
        return Path(out)
    set_name = _set_name(config)
    # cpu and gpu name their device already; sweeps and `all` run on either
    return HERE / "results" / (set_name if set_name in ("cpu", "gpu") else f"{set_name}-{_device(config).type}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Default the JSON into the results folder, before pytest-benchmark reads the option."""
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        out = _out_dir(config)
        out.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = _JsonPath(out / "benchmark.json")


class _JsonPath(type(Path())):
    """--benchmark-json as every pytest-benchmark takes it: the newer open a path, the older (the GPU
    image's) write inside `with option as fh`, which on a plain path crashed the first GPU run at its
    end and lost its tables. This path opens itself for that `with`."""

    def __enter__(self):
        self._file = open(self, "wb")
        return self._file

    def __exit__(self, *exc_info):
        self._file.close()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        config = metafunc.config
        cases = cases_for(_set_name(config), _device(config))
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])


@pytest.fixture(scope="session")
def bench_state(pytestconfig) -> BenchState:
    device = _device(pytestconfig)
    state = BenchState(
        device=device,
        rounds=pytestconfig.getoption("--bench-rounds") or DEFAULT_ROUNDS[device.type],
        # at least one warmup round: its last one measures peak memory
        warmup=max(1, pytestconfig.getoption("--bench-warmup") or DEFAULT_WARMUP[device.type]),
        budget_s=pytestconfig.getoption("--bench-budget") or None,
    )
    pytestconfig._hsae_bench_state = state
    return state


def pytest_benchmark_update_machine_info(config, machine_info):
    info = machine_description()
    info["bench_set"] = _set_name(config)
    info["bench_device"] = str(_device(config))
    info["memory_method"] = memory_method(_device(config))
    machine_info["hsae_bench"] = info


def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark has written the JSON by now (its hook wraps this one): render it."""
    path = getattr(session.config.option, "benchmark_json", None)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        path = path.name  # a user's --benchmark-json under an older pytest-benchmark: a file it opened
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if path is None or not benchmarks or not Path(path).exists():
        return
    from bench.report import render

    written = render(Path(path), Path(path).parent)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"hsae bench: wrote {', '.join(str(p) for p in written)}")
