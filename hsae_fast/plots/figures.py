"""The figures of a run (BACKGROUND.md): training progression, the feature-path graph, per-level
activation heatmaps, and per-level density histograms. Each function writes one PNG and returns
its path; all of them read only the run directory's files and the codes of a small sample."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

LEVEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def level_name(level: int, num_levels: int) -> str:
    if num_levels == 1:
        return "flat SAE"
    tag = " (top)" if level == num_levels - 1 else " (bottom)" if level == 0 and num_levels > 1 else ""
    return f"level {level}{tag}"


def training_progression(logs: dict, out: Path) -> Path:
    """logs: {run name: [metrics.jsonl records]}. Loss and FVU, L0 per level, dead fraction per level
    against training tokens; several runs share the axes (one line style per run)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = ("-", "--", ":", "-.")
    for r, (name, records) in enumerate(logs.items()):
        if not records:
            continue
        style = styles[r % len(styles)]
        tokens = np.array([rec.get("tokens", rec.get("step", i)) for i, rec in enumerate(records)], dtype=float)
        label = f"{name}: " if len(logs) > 1 else ""
        for key, color in (("loss", "black"), ("fvu", "tab:purple")):
            values = np.array([rec.get(key, np.nan) for rec in records], dtype=float)
            if np.isfinite(values).any():
                axes[0].plot(tokens, values, style, color=color, label=f"{label}{key}")
        num_levels = max(len(rec.get("l0", [])) for rec in records)
        for key, ax in (("l0", axes[1]), ("dead_frac", axes[2])):
            for l in range(num_levels):
                values = np.array([rec[key][l] if len(rec.get(key, [])) > l else np.nan for rec in records], dtype=float)
                ax.plot(tokens, values, style, color=LEVEL_COLORS[l % len(LEVEL_COLORS)], label=f"{label}{level_name(l, num_levels)}")
    axes[0].set_yscale("log")
    axes[0].set_title("reconstruction")
    axes[0].set_ylabel("loss / FVU (log scale)")
    axes[1].set_title("sparsity per level")
    axes[1].set_ylabel("L0: active features per token")
    axes[2].set_title("dead features per level")
    axes[2].set_ylabel("fraction of unpruned features dead")
    axes[2].set_ylim(-0.02, 1.02)
    from matplotlib.ticker import EngFormatter

    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("training progression: " + ", ".join(logs))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def select_subtrees(features: dict, level_sizes: Sequence[int], branching: Sequence[int]) -> list[list[int]]:
    """Per level (bottom first), the features drawn: the `branching[-1]` most active unpruned top
    features, then under each drawn parent its `branching[l]` most active firing children."""
    L = len(level_sizes)
    offsets = np.concatenate([[0], np.cumsum(level_sizes)]).astype(int)
    strength = np.array(features["mean_activation"], dtype=float)
    alive = np.array(features["path_mask"], dtype=bool) & (strength > 0)
    parent = np.array(features["parent"], dtype=int)
    drawn = [[] for _ in range(L)]
    top_ids = np.arange(offsets[L - 1], offsets[L])
    top_ids = top_ids[alive[top_ids]]
    drawn[L - 1] = top_ids[np.argsort(-strength[top_ids], kind="stable")][: branching[L - 1]].tolist()
    for l in reversed(range(L - 1)):
        ids = np.arange(offsets[l], offsets[l + 1])
        for p in drawn[l + 1]:
            children = ids[(parent[ids] == p) & alive[ids]]
            drawn[l].extend(children[np.argsort(-strength[children], kind="stable")][: branching[l]].tolist())
    return drawn


def feature_paths(analysis: dict, out: Path, branching: Optional[Sequence[int]] = None) -> Path:
    """The hierarchy as a layered graph: nodes are features (rows = levels, top level on top) sized
    by mean activation per token; edges are parent links drawn with width and opacity by strength:
    the mean edge attribution where edges are learned, else P(child | parent). Pruned features and
    features that never fired are absent."""
    plt = _pyplot()
    features, sizes = analysis["features"], analysis["level_sizes"]
    L = len(sizes)
    branching = list(branching or ([3] * (L - 1) + [6] if L > 1 else [40]))
    drawn = select_subtrees(features, sizes, branching)
    strength = np.array(features["mean_activation"], dtype=float)
    parent = np.array(features["parent"], dtype=int)
    learned = any(e.get("edges_learned") for e in analysis.get("edges", {}).get("pairs", []))
    edge_values = np.array(features["edge_attribution_mean" if learned else "cofire_share"], dtype=float)
    top_tokens = features.get("top_token")

    # x positions: the bottom drawn features in order, each parent centred over its drawn children.
    x = {f: float(i) for i, f in enumerate(drawn[0])}
    for l in range(1, L):
        for f in drawn[l]:
            kids = [x[c] for c in drawn[l - 1] if parent[c] == f]
            x[f] = float(np.mean(kids)) if kids else max(x.values(), default=-1.0) + 1
    width = max(len(drawn[0]), max(len(d) for d in drawn), 1)
    fig, ax = plt.subplots(figsize=(max(10, 0.45 * width + 3), 2.3 * L + 1.5))
    peak = max((strength[f] for level in drawn for f in level), default=1.0) or 1.0
    edge_peak = max((abs(edge_values[c]) for level in drawn[:-1] for c in level if np.isfinite(edge_values[c])), default=1.0) or 1.0
    for l in range(L - 1):
        for c in drawn[l]:
            value = edge_values[c]
            if not np.isfinite(value) or parent[c] not in x:
                continue
            w = abs(value) / edge_peak
            ax.plot([x[c], x[parent[c]]], [l, l + 1], color="tab:gray", linewidth=0.5 + 4 * w, alpha=0.25 + 0.7 * w, zorder=1)
    for l in range(L):
        xs = [x[f] for f in drawn[l]]
        ss = [40 + 900 * strength[f] / peak for f in drawn[l]]
        ax.scatter(xs, [l] * len(xs), s=ss, color=LEVEL_COLORS[l % len(LEVEL_COLORS)], edgecolor="black", linewidth=0.5, zorder=2)
        for f in drawn[l]:
            label = str(f)
            if top_tokens is not None and top_tokens[f] is not None:
                label += "\n" + repr(top_tokens[f].strip() or top_tokens[f])[1:-1][:10]
            ax.annotate(label, (x[f], l), textcoords="offset points", xytext=(0, -22 if l == 0 else 14),
                        ha="center", fontsize=7, rotation=0)
    ax.set_yticks(range(L))
    ax.set_yticklabels([level_name(l, L) for l in range(L)])
    ax.set_ylim(-0.8, L - 0.4)
    ax.set_xlim(-1, width)
    ax.set_xlabel("features of the most active subtrees (node area: mean activation per token)")
    ax.set_ylabel("level")
    edge_meaning = "mean edge attribution" if learned else "P(child fires | parent fires)"
    ax.set_title(f"feature paths: top {branching[-1]} top-level features and their most active descendants; "
                 f"edge width = {edge_meaning}", fontsize=10)
    ax.grid(axis="y", alpha=0.2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def level_activations(codes: list, level_sizes: Sequence[int], out: Path, max_features: int = 64) -> Path:
    """One heatmap per level (top level first), samples x features: the codes of a few tokens,
    restricted to the features that fire in the sample (the most frequent first)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    L = len(level_sizes)
    offsets = np.concatenate([[0], np.cumsum(level_sizes)]).astype(int)
    fig, axes = plt.subplots(L, 1, figsize=(12, 2.6 * L + 0.8), squeeze=False)
    for row, l in enumerate(reversed(range(L))):
        idx, vals = codes[l].idx.cpu(), codes[l].vals.detach().float().cpu()
        n = idx.shape[0]
        on = vals != 0
        firing, counts = torch.unique(idx[on], return_counts=True)
        chosen = firing[torch.argsort(counts, descending=True, stable=True)][:max_features]
        column = {int(f): j for j, f in enumerate(chosen.tolist())}
        grid = np.zeros((n, max(len(column), 1)))
        for t, s in zip(*on.nonzero(as_tuple=True)):
            j = column.get(int(idx[t, s]))
            if j is not None:
                grid[int(t), j] = float(vals[t, s])
        ax = axes[row, 0]
        # A few very large activations would leave everything else black: clip the scale at the 99th percentile.
        vmax = float(np.percentile(grid[grid > 0], 99)) if (grid > 0).any() else 1.0
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax)
        l0 = float(on.sum()) / max(n, 1)
        ax.set_title(f"{level_name(l, L)}: {level_sizes[l]} features, {len(firing)} fire in this sample, "
                     f"mean L0 {l0:.2f} per token", fontsize=10)
        ax.set_ylabel("sample (token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"feature (the {len(column)} most frequent in the sample; ids {offsets[l]}..{offsets[l + 1] - 1})")
        fig.colorbar(image, ax=ax, label="activation (clipped at 99th pct)", extend="max")
    fig.suptitle("level activations: fewer features fire per token toward the top")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def density_histograms(density: Sequence[float], path_mask: Sequence[bool], level_sizes: Sequence[int], out: Path) -> Path:
    """Per level, the histogram of log10 feature density (fraction of tokens a feature fires on);
    the dead features (density 0) are counted in the legend."""
    plt = _pyplot()
    density, mask = np.asarray(density, dtype=float), np.asarray(path_mask, dtype=bool)
    L = len(level_sizes)
    offsets = np.concatenate([[0], np.cumsum(level_sizes)]).astype(int)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bins = np.linspace(-7, 0, 36)
    for l in reversed(range(L)):
        d = density[offsets[l] : offsets[l + 1]][mask[offsets[l] : offsets[l + 1]]]
        dead = int((d == 0).sum())
        values = np.log10(np.clip(d[d > 0], 1e-7, 1))
        weights = np.full(values.shape, 1.0 / max(len(d), 1))
        ax.hist(values, bins=bins, weights=weights, histtype="step", linewidth=2, color=LEVEL_COLORS[l % len(LEVEL_COLORS)],
                label=f"{level_name(l, L)}: {len(d)} features, {dead} dead")
    ax.set_xlabel("log10 feature density (fraction of tokens the feature fires on)")
    ax.set_ylabel("fraction of the level's unpruned features")
    ax.set_title("feature density per level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
