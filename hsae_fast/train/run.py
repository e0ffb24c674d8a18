"""A whole run (SPEC 9): resolve the configuration, train, save `final/`, score, and optionally
train the matched flat SAE into RUN_DIR/flat and print the side-by-side table."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..config import HSAEConfig
from ..data import open_source
from .config import TrainConfig, flat_baseline_config, resolve_model_config
from .trainer import Trainer, write_json


def open_run_source(tcfg: TrainConfig, model_fields: dict):
    if tcfg.model is not None:  # cache only the positions training will read, not the whole split
        return open_source(tcfg.data, model=tcfg.model, layer=tcfg.layer, tokens=tcfg.tokens)
    if not tcfg.synthetic:
        return open_source(tcfg.data)
    from .config import SYNTHETIC_D_MODEL

    return open_source("synthetic", seed=tcfg.data_seed, d_model=model_fields.get("d_model", SYNTHETIC_D_MODEL),
                       level_sizes=tcfg.synthetic_sizes, mean_active=tcfg.synthetic_active,
                       child_parent_cos=tcfg.synthetic_child_cos, noise_std=tcfg.synthetic_noise)


def use_threads(tcfg: TrainConfig) -> None:
    """Set torch's CPU thread count for this job when the config asks for one (TrainConfig.threads)."""
    if tcfg.cpu_threads():
        torch.set_num_threads(tcfg.cpu_threads())


def check_device_and_backend(tcfg: TrainConfig) -> None:
    from ..backends import resolve_backend
    from .trainer import resolve_device

    device = resolve_device(tcfg.device)
    try:
        resolve_backend(tcfg.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"TrainConfig.backend={tcfg.backend!r} on {device}: {exc}") from None


def run_config(cfg: HSAEConfig, tcfg: TrainConfig) -> dict:
    return {"hsae": cfg.to_dict(), "trainer": tcfg.to_dict()}


# Trainer fields about the machine and the display, not the model or its schedule: a resume may change
# them (another thread count may change the last bits of some float sums, as moving the run would).
RESUME_FREE_FIELDS = ("progress", "threads")
PATH_FIELDS = ("data", "fisher_file")


def _same_value(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()  # one file named two ways (an older run kept it relative)
    return False


def _check_resume_config(path: Path, wanted: dict) -> None:
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(wanted))
    changed = sorted(
        f"{section}.{k}" for section in ("hsae", "trainer") for k in set(saved.get(section, {})) | set(wanted[section])
        if not (section == "trainer" and k in RESUME_FREE_FIELDS)
        and not _same_value(k, saved.get(section, {}).get(k), wanted[section].get(k))
    )
    if changed:
        raise ValueError(f"--resume: {path} differs from this command's configuration in {changed}; "
                         "resume with the same configuration")


def resolve_paths(tcfg: TrainConfig) -> TrainConfig:
    """The config with its local paths absolute (SPEC 9: config.json holds every value resolved), so a
    run's config names its data wherever it is read from (`hsae eval RUN` from another folder)."""
    changes = {key: str(Path(getattr(tcfg, key)).resolve()) for key in PATH_FIELDS
               if isinstance(getattr(tcfg, key), str) and getattr(tcfg, key) != "synthetic"
               and Path(getattr(tcfg, key)).exists()}
    return dataclasses.replace(tcfg, **changes) if changes else tcfg


@torch.no_grad()
def evaluate(layer, source, tcfg: TrainConfig, synthetic: bool, refined_W: Optional[torch.Tensor] = None) -> dict:
    """Final metrics on a held-out sample: the synthetic scores (with the refined decoder too, when
    given) or, for other sources, FVU / MSE / L0 / dead fraction / HCS."""
    if synthetic:
        from ..data.synthetic import score_model

        result = score_model(layer, source, n_tokens=tcfg.eval_tokens)
        if refined_W is not None:
            refined = score_model(layer, source, n_tokens=tcfg.eval_tokens, W_dec=refined_W)
            result["refined"] = {key: refined[key] for key in ("recovery", "recovery_any_level", "tree_recovery")}
        return result
    from ..losses import fvu, mse
    from ..metrics import ActivityCounter, hcs

    layer.eval()
    x = source.sample(tcfg.eval_tokens, tcfg.seed + 1).to(device=layer.W_dec.device, dtype=layer.W_dec.dtype)
    counter = ActivityCounter(layer.cfg.level_sizes, layer.W_dec.device)
    x_hats, hits, count = [], 0.0, 0
    for chunk in x.split(4096):
        out = layer(chunk)
        counter.update(out.levels)
        x_hats.append(out.x_hat)
        h = hcs(out.levels, layer.parent, layer.cfg.level_sizes, layer.path_mask)
        for pair in h["pairs"]:
            if pair["count"]:
                hits, count = hits + pair["score"] * pair["count"], count + pair["count"]
    layer.train()
    x_hat = torch.cat(x_hats)
    return {"fvu": float(fvu(x, x_hat)), "mse": float(mse(x, x_hat)), "l0": counter.l0(),
            "dead_frac": counter.dead_fraction(layer.path_mask), "hcs": hits / count if count else float("nan")}


def fisher_transform(tcfg: TrainConfig) -> Optional[tuple]:
    """(A, A^-1) of `fisher_weight` (None at 0), from `fisher_file` or DATA/fisher/output_fisher.safetensors."""
    if tcfg.fisher_weight == 0:
        return None
    from ..data.fisher import FISHER_FILE, load_fisher, metric_transform

    if tcfg.fisher_file is not None:
        path = Path(tcfg.fisher_file)
    elif Path(tcfg.data).is_dir():
        path = Path(tcfg.data) / FISHER_FILE
    else:
        raise ValueError(f"fisher_weight={tcfg.fisher_weight} needs the output Fisher: set fisher_file, or train on an "
                         f"activation cache folder holding {FISHER_FILE} (python -m hsae_fast.data.fisher CACHE)")
    G, _ = load_fisher(path)
    return metric_transform(G, tcfg.fisher_weight)


def train_one(cfg: HSAEConfig, tcfg: TrainConfig, source, out_dir: Path, resume: bool, desc: str,
              transform: Optional[tuple] = None) -> tuple:
    """Train one model into out_dir. With `transform` (A, A^-1) it trains on A x and folds A into the
    final layer (hsae_fast.data.fisher), so final/ and the metrics are of x itself."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    wanted = run_config(cfg, tcfg)
    resume = resume and (out_dir / "checkpoints" / "latest.json").is_file()
    if resume:
        _check_resume_config(config_path, wanted)
    if transform is not None:
        from ..data.fisher import TransformedSource

        if transform[0].shape[0] != source.d_model:
            raise ValueError(f"the Fisher matrix is {transform[0].shape[0]}-dimensional; the data has d={source.d_model}")
    train_source = source if transform is None else TransformedSource(source, transform[0])
    trainer = Trainer(cfg, tcfg, train_source, out_dir, resume=resume)
    if trainer.dist.main:
        write_json(config_path, wanted)
    trainer.fit(desc)
    if transform is not None:
        from ..data.fisher import fold_transform

        fold_transform(trainer.layer, *transform)
    trainer.save_final()
    metrics = {}
    if trainer.dist.main:
        refined_W = None
        if tcfg.refine and cfg.num_levels > 1:
            from safetensors.torch import save_file

            from .refine import refine_decoder

            sample = source.sample(tcfg.eval_tokens, tcfg.seed + 2)
            refined_W = refine_decoder(trainer.layer, sample.split(4096))["W_dec"]
            save_file({"W_dec": refined_W.contiguous()}, str(out_dir / "final" / "refined_decoder.safetensors"))
        metrics = evaluate(trainer.layer, source, tcfg, tcfg.synthetic, refined_W)
        metrics.update(steps=trainer.step, tokens=trainer.step * tcfg.batch_size, train_seconds=round(trainer.elapsed, 1))
        write_json(out_dir / "final_metrics.json", metrics)
    return trainer, metrics


def run(model_fields: dict, train_fields: dict, out_dir, resume: bool = False) -> dict:
    """Train the configured model (and the flat baseline when asked); returns the final metrics."""
    tcfg = resolve_paths(TrainConfig(**train_fields))
    check_device_and_backend(tcfg)  # before the data is opened and the run folder made
    use_threads(tcfg)
    source = open_run_source(tcfg, model_fields)
    cfg = resolve_model_config(model_fields, source.d_model, tcfg)
    if tcfg.fisher_weight > 0 and cfg.input_norm != "none":
        # input_norm scales each token by its own norm: the norm of A x is not that of x, so the fold
        # would not give the trained layer's codes
        raise ValueError(f"fisher_weight={tcfg.fisher_weight} with input_norm={cfg.input_norm!r}: "
                         "choose one (input_norm='none' with the Fisher metric)")
    transform = fisher_transform(tcfg)
    out_dir = Path(out_dir)
    trainer, metrics = train_one(cfg, tcfg, source, out_dir, resume, "hsae", transform)
    results = {"hsae": metrics}
    if tcfg.baseline == "flat" and cfg.num_levels > 1:
        _, flat_metrics = train_one(flat_baseline_config(cfg), tcfg, source, out_dir / "flat", resume, "flat", transform)
        results["flat"] = flat_metrics
        if trainer.dist.main:
            print(comparison_table(results["hsae"], flat_metrics))
    elif trainer.dist.main:
        print(comparison_table(metrics, None))
    trainer.dist.close()
    return results


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v, digits) for v in value)
    return f"{value:.{digits}f}"


def comparison_table(hsae: dict, flat: Optional[dict]) -> str:
    """The side-by-side table of the README's first command (Markdown)."""
    rows = [("FVU", "fvu", 4), ("L0 per level", "l0", 2), ("HCS", "hcs", 3)]
    if "recovery" in hsae:
        rows = [("recovery bottom/mid/top (own level)", "recovery", 3),
                ("recovery, any level (flat's criterion)", "recovery_any_level", 3),
                ("tree recovery", "tree_recovery", 3)] + rows
    header = "| metric | HSAE |" + (" flat SAE |" if flat else "")
    lines = [header, "|---|---|" + ("---|" if flat else "")]
    for label, key, digits in rows:
        line = f"| {label} | {_fmt(hsae.get(key), digits)} |"
        if flat:
            line += f" {_fmt(flat.get(key), digits)} |"
        lines.append(line)
    if "refined" in hsae:
        refined = hsae["refined"]
        lines.append(f"| recovery, refined decoder | {_fmt(refined['recovery'])} |" + (" - |" if flat else ""))
        lines.append(f"| recovery any level, refined | {_fmt(refined['recovery_any_level'])} |" + (" - |" if flat else ""))
        lines.append(f"| tree recovery, refined | {_fmt(refined['tree_recovery'])} |" + (" - |" if flat else ""))
    lines.append(f"| train seconds | {_fmt(hsae.get('train_seconds'), 1)} |" + (f" {_fmt(flat.get('train_seconds'), 1)} |" if flat else ""))
    return "\n".join(lines)
