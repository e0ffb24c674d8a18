"""Figures of a run: `make_all(run_dir)` writes training_progression.png, feature_paths.png,
level_activations.png and density_histograms.png into RUN_DIR (the trainer calls it at the end)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .figures import density_histograms, feature_paths, level_activations, training_progression

HEATMAP_TOKENS = 64


def make_all(run_dir, others: Sequence = (), tokens: Optional[int] = None, device: str = "cpu", progress: bool = False) -> list[Path]:
    """Write every figure; returns their paths. `others`: more run directories whose training logs
    share the progression figure (RUN_DIR/flat, the matched flat baseline, joins by itself). The path graph reads RUN_DIR/analysis.json, running `hsae
    analyze` first (on `tokens` held-out tokens) when it is absent or older than the checkpoint."""
    from ..analysis import analyze_run
    from ..eval.runs import EvalData, load_run

    run = load_run(run_dir, device=device)
    directory = run.directory
    written = []
    logs = {directory.name: run.metrics_log()}
    baseline = directory / "flat"  # the matched flat SAE `hsae train --baseline flat` writes
    for other in [*others, *([baseline] if (baseline / "final").is_dir() else [])]:
        logs[Path(other).name] = load_run(other).metrics_log()
    if any(logs.values()):
        written.append(training_progression(logs, directory / "training_progression.png"))
    analysis_path = directory / "analysis.json"
    weights = directory / "final" / "model.safetensors"
    if not analysis_path.is_file() or analysis_path.stat().st_mtime < weights.stat().st_mtime:
        analyze_run(directory, tokens=tokens, device=device, progress=progress)
    analysis = json.loads(analysis_path.read_text())
    written.append(feature_paths(analysis, directory / "feature_paths.png"))
    features = analysis["features"]
    written.append(density_histograms(features["density"], features["path_mask"], analysis["level_sizes"],
                                      directory / "density_histograms.png"))
    sample = EvalData(run, HEATMAP_TOKENS, batch_rows=1, device=device)
    batch = next(iter(sample.batches()))
    with torch.no_grad():
        codes = run.layer(batch.x[:HEATMAP_TOKENS].to(device=device, dtype=run.layer.W_enc.dtype)).levels
    written.append(level_activations(codes, run.layer.cfg.level_sizes, directory / "level_activations.png"))
    return written


__all__ = ["make_all", "training_progression", "feature_paths", "level_activations", "density_histograms"]
