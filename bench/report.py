"""Turn `pytest bench/`'s JSON into a Markdown table and PNG plots, next to the JSON.

    python -m bench.report                     every benchmark.json under bench/results/
    python -m bench.report PATH [PATH ...]     a results folder or a benchmark.json each

Every figure comes from the JSON (pytest-benchmark's format; each case's extra_info holds all its
candidates' round-robin results), so every number in the README traces back to a file here.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
OP_ORDER = ("encode", "decode", "backward", "step")
OP_TITLE = {"encode": "encode (forward, no grad)", "decode": "decode (forward, no grad)",
            "backward": "backward (after an untimed forward)", "step": "training step (forward + backward + AdamW)"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def cases_of(data: dict) -> list[dict]:
    return [b["extra_info"] for b in data["benchmarks"] if "candidates" in b.get("extra_info", {})]


def groups_of(cases: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for case in cases:
        groups.setdefault(case["group"], []).append(case)
    return groups


def _fmt(value: float, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ratio(r: dict | None) -> str:
    if not r:
        return ""
    return f"{r['median']:.2f} ({r['q25']:.2f}-{r['q75']:.2f})"


def machine_lines(data: dict) -> list[str]:
    info = data.get("machine_info", {}).get("hsae_bench", {})
    lines = [f"- Machine: {info.get('cpu_model', '?')}, {info.get('cpu_count', '?')} CPUs "
             f"({', '.join(info.get('cpu_flags', [])) or 'no flags recorded'}), torch threads {info.get('torch_threads', '?')}"]
    if info.get("gpu_model"):
        lines.append(f"- GPU: {info['gpu_model']} (CUDA {info.get('cuda')})")
    versions = ", ".join(f"{name} {info[key]}" for name, key in (
        ("torch", "torch"), ("triton", "triton"), ("eai-sparsify", "eai_sparsify"), ("sae-lens", "sae_lens"),
        ("python", "python")) if info.get(key))
    lines.append(f"- Versions: {versions}; hsae_fast commit {info.get('hsae_fast_commit', '?')}")
    if "omp_wait_policy" in info:
        lines.append(f"- OMP_WAIT_POLICY={info['omp_wait_policy'] or 'unset'} (bench/conftest.py sets PASSIVE unless you set it)")
    load = info.get("load_average_when_written") or info.get("load_average_at_start")  # older files: misnamed
    if load:
        lines.append(f"- Load average as the results were written (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / "
                     f"{load[2]:.2f} on {info.get('cpu_count', '?')} CPUs (each case records its own): the machine "
                     "is shared; ratios come from interleaved rounds, absolute times carry the load")
    if info.get("memory_method"):
        lines.append(f"- Peak memory: {info['memory_method']}")
    if info.get("bench_set"):
        lines.append(f"- Made by: `pytest bench/ --bench-set {info['bench_set']}` then `python -m bench.report`")
    return lines


def _skipped_lines(skipped: dict) -> list[str]:
    """One line per (implementation, reason), not per model: the reason is the same for each."""
    by_reason: OrderedDict[tuple, list[str]] = OrderedDict()
    for label, reason in skipped.items():
        impl, _, model = label.partition(" [")
        by_reason.setdefault((impl, reason), []).append(model.rstrip("]") or "")
    lines = []
    for (impl, reason), models in by_reason.items():
        which = f" ({', '.join(m for m in models if m)})" if any(models) else ""
        lines.append(f"- {impl}{which} skipped: {reason}")
    return lines


def case_table(case: dict) -> list[str]:
    ceilings = case["ceilings"]
    lines = [
        f"**{case['case']}**: {OP_TITLE.get(case['op'], case['op'])}, N={case['N']}, d={case['d']}, {case['dtype']}, "
        f"{case['rounds']} rounds round-robin (median, quartiles); load {case['load_1min_before']:.1f} -> "
        f"{case['load_1min_after']:.1f}; ceilings in the same rounds: matmul {ceilings['matmul_tflops']:.3g} TFLOP/s "
        f"({ceilings['matmul_shape']}), copy {ceilings['copy_gbps']:.3g} GB/s",
        "",
        "| candidate | model | median ms (IQR) | tokens/s | speedup vs | x encoder GEMM | peak MB | TFLOP/s (% ceiling) | GB/s (% ceiling) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, c in sorted(case["candidates"].items(), key=lambda kv: kv[1]["median_ms"]):
        speedup = f"{_ratio(c.get('speedup_vs_baseline'))} x {c['baseline']}" if c.get("baseline") else ""
        lines.append(
            f"| {label} | {c['model']} | {_fmt(c['median_ms'])} ({_fmt(c['q25_ms'])}-{_fmt(c['q75_ms'])}) | "
            f"{_fmt(c['tokens_per_s'])} | {speedup} | {_ratio(c['time_vs_floor'])} | {_fmt(c['peak_mem_mb'])} | "
            f"{c['tflops']:.3g} ({100 * c['tflops_of_ceiling']:.0f}%) | {c['gbps']:.3g} ({100 * c['gbps_of_ceiling']:.0f}%) |"
        )
    return lines + [""] + _skipped_lines(case.get("skipped", {})) + [""]


def summary(cases: list[dict]) -> list[str]:
    """The training-step cases in one short table (the README copies it)."""
    steps = [case for case in cases if case["op"] == "step" and not case.get("sweep_axis")]
    if not steps:
        return []
    lines = ["## Summary: one training step (forward + backward + AdamW)", "",
             "| case | candidate | median ms | speedup | x encoder GEMM | peak MB |", "|---|---|---|---|---|---|"]
    for case in steps:
        for label, c in sorted(case["candidates"].items(), key=lambda kv: kv[1]["median_ms"]):
            speedup = f"{c['speedup_vs_baseline']['median']:.2f}x vs {c['baseline']}" if c.get("baseline") else ""
            lines.append(f"| {case['case']} | {label} | {_fmt(c['median_ms'])} | {speedup} | "
                         f"{c['time_vs_floor']['median']:.2f} | {_fmt(c['peak_mem_mb'])} |")
    return lines + [""]


def markdown(data: dict, source: Path) -> str:
    cases = cases_of(data)
    lines = ["# hsae_fast benchmark results", "", f"From `{source.name}` in this folder.", ""]
    lines += machine_lines(data) + [
        "",
        "Speedup: median over rounds of (baseline time / candidate time) in the same round, quartiles in "
        "brackets; x encoder GEMM: candidate time / the bare `x @ W_enc.T` of the same F in the same round. "
        "TFLOP/s and GB/s count the least work the op needs (bench/cases.py `work`), not what an "
        "implementation does, against the ceilings measured in the run.",
        "",
    ]
    lines += summary(cases)
    for group, members in groups_of(cases).items():
        lines += [f"## {group}", ""]
        for case in members:
            lines += case_table(case)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ plots
def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.split(":")[0].lower())
    return "-".join(part for part in keep.split("-") if part)


def plot_ops(group: str, members: list[dict], out: Path) -> Path:
    """One panel per op: each candidate's median time (quartile whiskers), fastest at the top."""
    ops = [case for op in OP_ORDER for case in members if case["op"] == op]
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 1.2 + 0.42 * sum(len(c["candidates"]) for c in ops) + 0.6 * len(ops)))
    axes = [axes] if len(ops) == 1 else list(axes)
    for ax, case in zip(axes, ops):
        items = sorted(case["candidates"].items(), key=lambda kv: -kv[1]["median_ms"])
        labels = [label for label, _ in items]
        medians = [c["median_ms"] for _, c in items]
        low = [c["median_ms"] - c["q25_ms"] for _, c in items]
        high = [c["q75_ms"] - c["median_ms"] for _, c in items]
        colors = ["#999999" if c["impl"].startswith("torch.matmul") else
                  "#d62728" if c["impl"] == "reference" else
                  "#1f77b4" if c["impl"] in ("sparsify", "saelens") else "#2ca02c" for _, c in items]
        ax.barh(labels, medians, xerr=[low, high], color=colors, capsize=3)
        for y, (_, c) in enumerate(items):
            note = f" {_fmt(c['median_ms'])} ms"
            if c.get("speedup_vs_baseline"):
                note += f"  ({c['speedup_vs_baseline']['median']:.2f}x vs {c['baseline']})"
            ax.text(c["q75_ms"], y, note, va="center", fontsize=8)
        ax.set_xlim(0, max(c["q75_ms"] for _, c in items) * 1.6)
        ax.set_title(f"{case['case']}: {OP_TITLE.get(case['op'], case['op'])}", fontsize=10)
        ax.set_xlabel("ms (median of round-robin rounds; whiskers: quartiles)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{group}\ngreen: hsae_fast backends, blue: peers, red: dense reference, grey: bare matmul baselines",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_size_inches()[1]))
    path = out / f"{_slug(group)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(group: str, members: list[dict], out: Path) -> Path:
    """Median time against the swept size, one line per candidate, log-log."""
    axis = members[0]["sweep_axis"]
    series: OrderedDict[str, list[tuple[float, float, float, float]]] = OrderedDict()
    for case in members:
        for label, c in case["candidates"].items():
            series.setdefault(label, []).append((case[axis], c["median_ms"], c["q25_ms"], c["q75_ms"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                    marker="o", capsize=3, label=label, linestyle="--" if label == "encoder GEMM" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{axis} ({'dictionary size' if axis == 'F' else 'tokens per batch'})")
    ax.set_ylabel("ms per call (median, quartile bars)")
    ax.set_title(group, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{_slug(group)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(json_path: Path, out: Path) -> list[Path]:
    """Write results.md and one PNG per group of cases into `out`; returns the paths written."""
    data = load(json_path)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.md"
    written = [table]
    text = markdown(data, json_path)
    plots = []
    for group, members in groups_of(cases_of(data)).items():
        if members[0].get("sweep_axis"):
            plots.append(plot_sweep(group, members, out))
        else:
            plots.append(plot_ops(group, members, out))
    text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    table.write_text(text)
    return written + plots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="results folders or benchmark.json files")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((HERE / "results").glob("**/benchmark.json"))
    if not paths:
        print("no results: run `pytest bench/` first", file=sys.stderr)
        return 1
    for path in paths:
        path = path / "benchmark.json" if path.is_dir() else path
        for written in render(path, path.parent):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
