"""`hsae analyze RUN_DIR`: path attribution and tree use (SPEC 6) -> RUN_DIR/analysis.json and
RUN_DIR/analysis.md.

On the run's held-out data (as `hsae eval` uses it) it reports:
- active paths (see `paths.PathStats`): paths per token, how many distinct paths are used out of
  those the unpruned tree allows (path utilization), path lengths, the most used paths with each
  feature's top tokens and contexts (LM runs);
- edge attribution `edge_weight[i] * a_parent / s_i` per active edge (all zero unless the run
  learned its edges), and per edge the co-firing share P(child | parent), which is what the tree
  carries when edges are not learned;
- tree use: children used per parent, how evenly a parent's firing splits among its children
  (normalized entropy), child-parent decoder cosine;
- path specialization: 1 - H(tokens on the path) / log(min(uses, V)) (LM runs), and per path its
  leaf's share of its parent's firings (branch share);
- pruning candidates: unpruned features that never fire (the top-most of a dead subtree, with its
  size) and paths used on fewer than `rare_density` of the tokens; merge candidates: sibling
  features (same parent; the top level counts as siblings) whose decoder rows have cosine above
  `merge_cosine`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..eval.evaluate import _finite_json, _md
from ..eval.runs import EvalData, load_run
from ..eval.stats import CodeStats, grouped_token_stats
from ..io import atomic_write_bytes
from ..metrics import child_parent_cosine, tree_use
from ..tree import subtree_mask
from .paths import PathStats


def analyze_run(
    run_dir,
    tokens: Optional[int] = None,
    batch_rows: int = 8,
    device: str = "cpu",
    top_paths: int = 20,
    merge_cosine: float = 0.9,
    rare_density: float = 1e-4,
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    run = load_run(run_dir, device=device)
    layer, cfg = run.layer, run.layer.cfg
    tokens = run.sample_tokens(tokens)
    data = EvalData(run, tokens, batch_rows=batch_rows, device=device, model=model, tokenizer=tokenizer)
    vocab = len(data.tokenizer) if data.tokenizer is not None else None
    codes, paths = CodeStats(layer, top_k=4, vocab_size=vocab), PathStats(layer, vocab_size=vocab)
    bar = tqdm(total=tokens, unit="tok", desc=f"hsae analyze {Path(run_dir).name}", disable=not progress)
    with torch.no_grad():
        for batch in data.batches():
            out = layer(batch.x.to(device=device, dtype=layer.W_enc.dtype))
            codes.update(batch.x, out.x_hat, out.levels, batch.first_index, batch.token_ids)
            paths.update(out.levels, batch.token_ids)
            bar.update(batch.x.shape[0])
    bar.close()

    parent, path_mask = layer.parent.cpu(), layer.path_mask.cpu()
    density = codes.density()
    n = codes.n
    result = {"n_tokens": n, "run": str(run.directory), "level_sizes": list(cfg.level_sizes), "gating": cfg.gating}
    result["paths"] = _path_summary(paths, path_mask, n, top_paths, data, codes, rare_density)
    result["edges"] = _edge_summary(layer, paths, codes)
    result["tree_use"] = _tree_summary(layer, codes)
    result["pruning_candidates"] = _pruning(layer, density, paths, n, rare_density)
    result["merge_candidates"] = _merges(layer, density, merge_cosine)
    result["features"] = {
        "density": density.tolist(),
        "mean_activation": (codes.act_sum / max(n, 1)).tolist(),
        "cofire_share": _cofire_share(paths, codes, parent).tolist(),
        "edge_attribution_mean": (paths.attribution_sum / paths.cofire.clamp_min(1)).tolist(),
        "parent": parent.tolist(),
        "path_mask": path_mask.tolist(),
        "top_token": _top_tokens(codes, data),
    }
    atomic_write_bytes(run.directory / "analysis.json", json.dumps(_finite_json(result)).encode())
    atomic_write_bytes(run.directory / "analysis.md", _markdown(result, cfg).encode())
    return result


def _cofire_share(paths: PathStats, codes: CodeStats, parent: torch.Tensor) -> torch.Tensor:
    """(F,) P(child active | parent active) per edge; nan at the top level or for a silent parent."""
    share = torch.full((parent.numel(),), float("nan"), dtype=torch.float64)
    has = parent >= 0
    parent_counts = codes.counts[parent[has]].double()
    share[has] = torch.where(parent_counts > 0, paths.cofire[has].double() / parent_counts.clamp_min(1), torch.nan)
    return share


def _top_tokens(codes: CodeStats, data: EvalData) -> Optional[list]:
    """(F,) each feature's most frequent activating token as text (None: never fired); None without text."""
    hist = codes.token_histograms()
    if hist is None:
        return None
    _, _, _, top = grouped_token_stats(*hist, codes.cfg.dict_size)
    return [data.token_text(t) if t >= 0 else None for t in top.tolist()]


def _level_of(cfg, feature: int) -> int:
    return next(l for l, o in enumerate(cfg.level_offsets) if o <= feature < o + cfg.level_sizes[l])


def _path_summary(paths: PathStats, path_mask, n, top_paths, data: EvalData, codes: CodeStats, rare_density) -> dict:
    cfg = paths.cfg
    used = paths.path_counts > 0
    full = torch.zeros_like(used)
    full[torch.arange(cfg.level_sizes[0]) * cfg.num_levels + cfg.num_levels - 1] = True  # bottom-to-top paths
    specialization = paths.path_specialization()
    order = torch.argsort(paths.path_counts, descending=True)[:top_paths]
    top = []
    for key in order.tolist():
        count = int(paths.path_counts[key])
        if count == 0:
            break
        chain = paths.path_features(key)
        entry = {"features": chain, "levels": [_level_of(cfg, f) for f in chain], "uses": count, "share_of_tokens": count / n}
        if key in specialization:
            spec, token, share = specialization[key]
            entry.update({"token_specialization": spec, "top_token": data.token_text(token), "top_token_share": share})
        if data.tokenizer is not None:
            entry["feature_top_tokens"] = {f: [(data.token_text(t), c) for t, c in codes.top_tokens(f, 4)] for f in chain}
            leaf_contexts = [i for i in codes.top_index[chain[0]].tolist() if i >= 0][:3]
            entry["leaf_contexts"] = ["{}«{}»{}".format(*data.context_of(i)) for i in leaf_contexts]
        top.append(entry)
    specs = [v[0] for v in specialization.values()]
    return {
        "paths_per_token": float(paths.paths_per_token) / max(n, 1),
        "distinct_paths_used": int(used.sum()),
        "full_paths_used": int((used & full).sum()),
        "full_paths_possible": paths.possible_paths(path_mask),
        "path_utilization": int((used & full).sum()) / max(1, paths.possible_paths(path_mask)),
        "rare_paths": int(((paths.path_counts > 0) & (paths.path_counts < rare_density * n)).sum()),
        "length_counts": paths.path_length_counts.tolist(),  # [i]: paths with i + 1 features
        "mean_token_specialization": sum(specs) / len(specs) if specs else None,
        "paths_scored_for_specialization": len(specs),
        "top": top,
    }


def _edge_summary(layer, paths: PathStats, codes: CodeStats) -> dict:
    cfg, parent = layer.cfg, layer.parent.cpu()
    share = _cofire_share(paths, codes, parent)
    pairs = []
    for l in range(cfg.num_levels - 1):
        o, s = cfg.level_offsets[l], cfg.level_sizes[l]
        cofire = paths.cofire[o : o + s]
        total = int(cofire.sum())
        level_share = share[o : o + s]
        pairs.append({
            "pair": [l, l + 1],
            "active_edges": total,
            "mean_attribution": float(paths.attribution_sum[o : o + s].sum() / total) if total else None,
            "mean_abs_attribution": float(paths.attribution_abs_sum[o : o + s].sum() / total) if total else None,
            "mean_cofire_share": float(level_share[~level_share.isnan()].mean()) if (~level_share.isnan()).any() else None,
            "edges_learned": bool(layer.edge_weight[o : o + s].abs().sum() > 0),
        })
    return {"pairs": pairs}


def _tree_summary(layer, codes: CodeStats) -> dict:
    cfg, parent = layer.cfg, layer.parent.cpu()
    use = tree_use(codes.counts, parent, cfg.level_sizes)
    cosine = child_parent_cosine(layer.W_dec.cpu(), parent)
    out = []
    for l, pair in enumerate(use):
        o, s = cfg.level_offsets[l], cfg.level_sizes[l]
        po, ps = cfg.level_offsets[l + 1], cfg.level_sizes[l + 1]
        firing_parents = codes.counts[po : po + ps] > 0
        share = pair["child_share"].double()
        p_local = parent[o : o + s] - po
        plogp = torch.where(share > 0, -share * share.log(), torch.zeros_like(share))
        entropy = torch.zeros(ps, dtype=torch.float64).index_add_(0, p_local, plogp.nan_to_num(0.0))
        siblings = torch.bincount(p_local, weights=layer.path_mask[o : o + s].cpu().double(), minlength=ps)
        even = entropy / siblings.clamp_min(2).log()
        alive_cos = cosine[o : o + s][layer.path_mask[o : o + s].cpu()]
        alive_parents = layer.path_mask[po : po + ps].cpu()
        out.append({
            "pair": [l, l + 1],
            "mean_children_used": float(pair["children_used"][firing_parents].double().mean()) if firing_parents.any() else None,
            # over the unpruned parents (a pruned parent's children are pruned too: counting it halved the mean)
            "children_per_parent": float(siblings[alive_parents].mean()) if alive_parents.any() else None,
            "mean_split_evenness": float(even[firing_parents].mean()) if firing_parents.any() else None,
            "mean_child_parent_cosine": float(alive_cos.mean()) if alive_cos.numel() else None,
        })
    return {"pairs": out}


def _pruning(layer, density, paths: PathStats, n, rare_density) -> dict:
    cfg, parent, mask = layer.cfg, layer.parent.cpu(), layer.path_mask.cpu()
    # A subtree to prune is one where nothing fires, the head and every feature below it. Under hard
    # gating a silent feature's subtree is silent anyway; under gating "none" its children may fire on
    # their own (a silent head alone was once reported with its live subtree).
    silent = (density == 0) | ~mask
    for l in range(1, cfg.num_levels):  # bottom-up: a level's silence needs its children's
        o, s = cfg.level_offsets[l - 1], cfg.level_sizes[l - 1]
        children, their_parents = torch.arange(o, o + s), parent[o : o + s]
        loud = children[~silent[o : o + s] & (their_parents >= 0)]
        silent[parent[loud]] = False
    silent &= mask
    has_parent = parent >= 0
    parent_silent = torch.zeros_like(silent)
    parent_silent[has_parent] = silent[parent[has_parent]]
    heads = (silent & ~parent_silent).nonzero().squeeze(1)
    dead_heads = [
        {"feature": int(f), "level": _level_of(cfg, int(f)), "subtree_size": int((subtree_mask(parent, torch.tensor([f])) & mask).sum())}
        for f in heads.tolist()
    ]
    rare = ((density > 0) & (density < rare_density) & mask).nonzero().squeeze(1)
    return {
        "dead_subtree_heads": dead_heads,
        "prune_ids": [d["feature"] for d in dead_heads],
        "rare_features": [{"feature": int(f), "level": _level_of(cfg, int(f)), "density": float(density[f])} for f in rare.tolist()[:200]],
        "rare_density": rare_density,
        "how": "HSAELayer.prune(prune_ids) removes each feature with its whole subtree (SPEC 2)",
    }


def _merges(layer, density, merge_cosine: float, limit: int = 100) -> list:
    """Sibling pairs with decoder cosine above `merge_cosine`, most similar first."""
    cfg, parent, mask = layer.cfg, layer.parent.cpu(), layer.path_mask.cpu()
    rows = torch.nn.functional.normalize(layer.W_dec.detach().cpu().double(), dim=1)
    group = parent.clone()
    group[parent < 0] = -2  # the top level: siblings under a virtual root
    ids = mask.nonzero().squeeze(1)
    ids = ids[torch.argsort(group[ids], stable=True)]
    found = []
    groups, starts = torch.unique_consecutive(group[ids], return_counts=True)
    offset = 0
    for count in starts.tolist():
        members = ids[offset : offset + count]
        offset += count
        if count < 2:
            continue
        cos = rows[members] @ rows[members].T
        i, j = torch.triu_indices(count, count, 1)
        close = cos[i, j] > merge_cosine
        for a, b, c in zip(members[i[close]].tolist(), members[j[close]].tolist(), cos[i, j][close].tolist()):
            found.append({"features": [a, b], "level": _level_of(cfg, a), "parent": int(parent[a]), "decoder_cosine": c,
                          "densities": [float(density[a]), float(density[b])]})
    found.sort(key=lambda m: -m["decoder_cosine"])
    return found[:limit]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _markdown(result: dict, cfg) -> str:
    p = result["paths"]
    lines = [f"# Path analysis: {Path(result['run']).name}", "",
             f"{result['n_tokens']} held-out tokens; levels (bottom first) {cfg.level_sizes}, gating `{cfg.gating}`.", "",
             "## Paths", "",
             f"- paths per token: {_fmt(p['paths_per_token'])}",
             f"- distinct paths used: {p['distinct_paths_used']}; bottom-to-top paths used {p['full_paths_used']} of "
             f"{p['full_paths_possible']} possible (utilization {_fmt(p['path_utilization'])})",
             f"- paths by number of features (1..L): {p['length_counts']}",
             f"- rare paths (used on fewer than {result['pruning_candidates']['rare_density']:g} of tokens): {p['rare_paths']}",
             f"- mean token specialization of paths: {_fmt(p['mean_token_specialization'])} "
             f"({p['paths_scored_for_specialization']} paths scored)", "",
             "## Most used paths", "",
             "| uses | share | path (leaf -> top) | top token | specialization |", "|---|---|---|---|---|"]
    for entry in p["top"]:
        chain = " -> ".join(f"{f} (L{l})" for f, l in zip(entry["features"], entry["levels"]))
        lines.append(f"| {entry['uses']} | {_fmt(entry['share_of_tokens'])} | {chain} | "
                     f"{_md(entry.get('top_token', 'n/a'))} | {_fmt(entry.get('token_specialization'))} |")
    if any("feature_top_tokens" in e for e in p["top"]):
        lines += ["", "### Their features' top tokens and the leaf's top contexts", ""]
        for entry in p["top"][:10]:
            lines.append(f"- path {' -> '.join(map(str, entry['features']))}")
            for f, toks in entry["feature_top_tokens"].items():
                lines.append(f"  - feature {f}: " + ", ".join(f"«{_md(t)}» x{c}" for t, c in toks))
            for ctx in entry.get("leaf_contexts", []):
                lines.append(f"  - context: {_md(ctx)}")
    lines += ["", "## Edges", "", "| pair | active edges | mean attribution | mean abs attribution | mean P(child given parent) | edges learned |",
              "|---|---|---|---|---|---|"]
    for e in result["edges"]["pairs"]:
        lines.append(f"| {e['pair'][0]}->{e['pair'][1]} | {e['active_edges']} | {_fmt(e['mean_attribution'])} | "
                     f"{_fmt(e['mean_abs_attribution'])} | {_fmt(e['mean_cofire_share'])} | {e['edges_learned']} |")
    lines += ["", "## Tree use", "", "| pair | children per parent | children used per firing parent | split evenness | child-parent decoder cosine |",
              "|---|---|---|---|---|"]
    for t in result["tree_use"]["pairs"]:
        lines.append(f"| {t['pair'][0]}->{t['pair'][1]} | {_fmt(t['children_per_parent'])} | {_fmt(t['mean_children_used'])} | "
                     f"{_fmt(t['mean_split_evenness'])} | {_fmt(t['mean_child_parent_cosine'])} |")
    prune = result["pruning_candidates"]
    lines += ["", "## Pruning candidates", "",
              f"{len(prune['dead_subtree_heads'])} dead subtrees (never fired on the evaluated tokens); {prune['how']}.", ""]
    for d in prune["dead_subtree_heads"][:30]:
        lines.append(f"- feature {d['feature']} (level {d['level']}), subtree of {d['subtree_size']}")
    lines += ["", f"{len(prune['rare_features'])} rare features (density below {prune['rare_density']:g}).", "",
              "## Merge candidates (sibling decoder cosine)", ""]
    if not result["merge_candidates"]:
        lines.append("none above the threshold")
    for m in result["merge_candidates"][:30]:
        lines.append(f"- {m['features'][0]} + {m['features'][1]} (level {m['level']}, parent {m['parent']}): "
                     f"cosine {m['decoder_cosine']:.3f}, densities {_fmt(m['densities'][0])} / {_fmt(m['densities'][1])}")
    return "\n".join(lines) + "\n"
