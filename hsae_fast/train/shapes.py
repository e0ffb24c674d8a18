"""Tree shapes at equal wall time (issue 10, quality): for each shape, an HSAE and the matched flat
SAE (same dict size and total L0) each trained for the same number of seconds.

Synthetic (default): a synthetic hierarchy of each shape (one true concept per feature), scored on
recovery, tree recovery, HCS, FVU and dead fraction.

    python -m hsae_fast.train.shapes --out runs/shapes [--seconds 60] [--seeds 0,1]
        [--shapes 128/32/8,512/64/8,...] [--FIELD VALUE ...]

Language model: `--data CACHE` (a folder written by `python -m hsae_fast.data.lm`); each shape gives
its k after a colon (`4608/288/18:32/8/2`). Every model is then evaluated by `hsae eval` on held-out
text (`--eval-tokens-lm`): explained variance, CE increase, KL, dead fraction per level. One flat SAE
is trained per distinct (dict size, total L0) and shared by the shapes that match it.

    python -m hsae_fast.train.shapes --out runs/lm_shapes --data CACHE --seconds 120 \
        --shapes 4608/288/18:32/8/2,16384/1024/64:32/8/2 --config configs/lm_smollm2.yaml

A shape is its level sizes bottom first; the true tree has the same sizes, and a mean of 2 active
concepts per token at the top, doubling at each level below (k matches). Equal wall time: each
model's tokens are its measured tokens/s (a probe of `--probe-steps` steps, half early and half late
in the schedules) times `--seconds`; the table reports the tokens and seconds each run really took
(the probe sees no dead features yet, so a run where AuxK later scores many dead ones takes longer).
Any `hsae train` field (`--lr`, `--batch-size`, `--d-model`, ...) applies to every run.
Writes RUN/<shape>_s<seed>/{hsae,flat}/ (ordinary run directories), RUN/results.jsonl and
RUN/table.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .config import (TrainConfig, flat_baseline_config, load_config_file, parse_field_flags,
                     resolve_model_config, split_fields)
from .run import open_run_source, train_one, use_threads
from .trainer import Trainer, _plain

DEFAULT_SHAPES = ("128/32/8", "512/64/8", "2048/128/8", "4096/64/8", "512/128/32/8", "4096/512/64/8")


def parse_shape(text: str) -> tuple:
    """'512/64/8' -> (512, 64, 8); level sizes bottom first, each a whole multiple of the next."""
    sizes = tuple(int(s) for s in text.replace("x", "/").split("/") if s.strip())
    if len(sizes) < 2 or any(a % b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"--shapes {text!r}: level sizes bottom first, each a whole multiple of the next")
    return sizes


def parse_shape_k(text: str) -> tuple:
    """'4608/288/18:32/8/2' -> ((4608, 288, 18), (32, 8, 2)); k is None when no colon."""
    shape, _, k_text = text.partition(":")
    sizes = parse_shape(shape)
    if not k_text:
        return sizes, None
    k = tuple(int(v) for v in k_text.split("/") if v.strip())
    if len(k) != len(sizes):
        raise ValueError(f"--shapes {text!r}: {len(sizes)} level sizes but {len(k)} values of k")
    return sizes, k


def mean_active(sizes: tuple) -> tuple:
    """2 active concepts per token at the top, doubling at each level below (bottom first)."""
    L = len(sizes)
    return tuple(float(min(2 ** (L - l), sizes[l])) for l in range(L))


def measure_tokens(cfg, tcfg: TrainConfig, source, seconds: float, probe_steps: int) -> int:
    """Tokens this model trains in `seconds`: steps timed half at 25% and half at 75% of the
    schedules (the prefix loss is on early and off late), after two warm-up steps."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tcfg, source, tmp)
        batches = trainer._batches()
        elapsed, timed = 0.0, 0
        for position in (0.25, 0.75):
            trainer.step = int(position * trainer.total_steps)
            for i in range(2 + probe_steps // 2):
                t0 = time.perf_counter()
                trainer.train_step(next(batches))
                if i >= 2:
                    elapsed, timed = elapsed + time.perf_counter() - t0, timed + 1
    rate = timed * tcfg.batch_size / max(elapsed, 1e-9)
    return max(tcfg.batch_size, int(rate * seconds) // tcfg.batch_size * tcfg.batch_size)


def run_shape(sizes: tuple, seed: int, seconds: float, fields: dict, out_dir: Path, probe_steps: int,
              k: Optional[tuple] = None, flat_done: Optional[dict] = None, lm_eval: Optional[dict] = None) -> list:
    """Train (and, for LM data, evaluate) the HSAE of this shape and its matched flat SAE.
    `flat_done` maps (dict size, total L0, seed) to a flat row already made (LM mode reuses it)."""
    model_fields, train_fields = split_fields(fields)
    train_fields = dict(train_fields, data_seed=seed, seed=seed, progress=False)
    model_fields = {key: v for key, v in model_fields.items() if key not in ("level_sizes", "dict_size", "k", "level_ratios")}
    lm = train_fields.get("data", "synthetic") != "synthetic"
    if lm:
        if k is None:
            raise ValueError(f"shape {sizes}: with --data, give each shape its k (e.g. 4608/288/18:32/8/2)")
        model_fields.update(level_sizes=sizes, k=k)
    else:
        train_fields.update(synthetic_sizes=sizes, synthetic_active=mean_active(sizes))
        if k is not None:
            model_fields.update(k=k)
    tcfg = TrainConfig(**train_fields)
    use_threads(tcfg)
    source = open_run_source(tcfg, model_fields)
    hsae_cfg = resolve_model_config(model_fields, source.d_model, tcfg)
    flat_cfg = flat_baseline_config(hsae_cfg)
    flat_key = (flat_cfg.dict_size, flat_cfg.k[0], seed)
    rows = []
    for name, cfg in (("hsae", hsae_cfg), ("flat", flat_cfg)):
        row = {"shape": "/".join(map(str, sizes)), "seed": seed, "model": name, "level_sizes": list(cfg.level_sizes),
               "k": list(cfg.k)}
        if name == "flat" and flat_done is not None and flat_key in flat_done:
            rows.append(dict(flat_done[flat_key], **row, shared_with=flat_done[flat_key]["shape"]))
            continue
        tokens = measure_tokens(cfg, dataclasses.replace(tcfg, tokens=10 ** 9), source, seconds, probe_steps)
        run_tcfg = dataclasses.replace(tcfg, tokens=tokens)
        _, metrics = train_one(cfg, run_tcfg, source, out_dir / name, resume=False, desc=name)
        row.update(metrics)
        if lm:
            row["held_out"] = held_out_metrics(out_dir / name, lm_eval or {})
        if name == "flat" and flat_done is not None:
            flat_done[flat_key] = row
        rows.append(row)
    return rows


HELD_OUT_KEYS = ("n_tokens", "explained_variance", "ce_loss_increase", "kl_div_with_sae", "l0", "l0_per_level",
                 "frac_dead_per_level", "hcs", "healthy")


def held_out_metrics(run_dir: Path, lm_eval: dict) -> dict:
    """`hsae eval` of one run (it writes RUN/metrics.json); `lm_eval` holds the held-out token count
    (the LM reloads per run: a converted safetensors folder takes about 2 s)."""
    from ..eval.evaluate import evaluate_run

    metrics = evaluate_run(run_dir, tokens=lm_eval.get("tokens"), progress=False)
    return {key: metrics.get(key) for key in HELD_OUT_KEYS}


def _fmt(values, digits=3) -> str:
    if values is None:
        return "-"
    if isinstance(values, (list, tuple)):
        return "/".join(_fmt(v, digits) for v in values)
    if isinstance(values, float) and values != values:
        return "-"
    return f"{values:.{digits}f}"


def _markdown(columns: tuple, rows: list) -> str:
    """A Markdown table: `columns` is ((title, cell(row) -> str), ...), one line per row."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def _refined(r: dict) -> dict:
    return r.get("refined") or {}


def _held(r: dict) -> dict:
    return r.get("held_out") or {}


SYNTHETIC_COLUMNS = (
    ("shape (bottom first)", lambda r: r["shape"]),
    ("seed", lambda r: str(r["seed"])),
    ("model", lambda r: r["model"]),
    ("tokens", lambda r: f"{r['tokens']:,}"),
    ("train s", lambda r: f"{r['train_seconds']:.0f}"),
    ("FVU", lambda r: _fmt(r["fvu"], 4)),
    ("dead frac per level", lambda r: _fmt(r["dead_frac"], 2)),
    ("recovery per level, raw", lambda r: _fmt(r["recovery"])),
    ("refined", lambda r: _fmt(_refined(r).get("recovery"))),
    ("tree raw / refined", lambda r: f"{_fmt(r['tree_recovery'])} / {_fmt(_refined(r).get('tree_recovery'))}"),
    ("HCS", lambda r: _fmt(r["hcs"])),
)

LM_COLUMNS = (
    ("shape (bottom first)", lambda r: r["shape"]),
    ("k", lambda r: "/".join(map(str, r["k"]))),
    ("model", lambda r: r["model"] + (f" (= {r['shared_with']})" if r.get("shared_with") else "")),
    ("F", lambda r: f"{sum(r['level_sizes']):,}"),
    ("tokens", lambda r: f"{r['tokens']:,}"),
    ("train s", lambda r: f"{r['train_seconds']:.0f}"),
    ("train FVU", lambda r: _fmt(r["fvu"], 4)),
    ("held-out EV", lambda r: _fmt(_held(r).get("explained_variance"))),
    ("CE increase (nats)", lambda r: _fmt(_held(r).get("ce_loss_increase"))),
    ("KL", lambda r: _fmt(_held(r).get("kl_div_with_sae"))),
    ("L0", lambda r: _fmt(_held(r).get("l0"), 1)),
    ("dead frac per level (held-out)", lambda r: _fmt(_held(r).get("frac_dead_per_level"), 2)),
)


def table(rows: list) -> str:
    """Markdown for synthetic runs, one line per (shape, seed, model)."""
    return _markdown(SYNTHETIC_COLUMNS, rows)


def lm_table(rows: list) -> str:
    """Markdown for language-model runs: held-out reconstruction and model preservation."""
    return _markdown(LM_COLUMNS, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsae_fast.train.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the runs, results.jsonl and table.md")
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per model")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data draw and model init)")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated level sizes, e.g. 512/64/8")
    parser.add_argument("--probe-steps", type=int, default=40, help="timed steps per model to measure tokens/s")
    parser.add_argument("--config", default=None, help="a .json or .yaml file of fields for every run (flags override it)")
    parser.add_argument("--eval-tokens-lm", type=int, default=None,
                        help="held-out tokens per `hsae eval` with --data (default: hsae eval's)")
    args, extra = parser.parse_known_args(argv)
    try:
        fields = parse_field_flags(extra)
        if args.config:  # flags override the file, as in `hsae train`
            fields = dict(load_config_file(args.config), **fields)
        shapes = [parse_shape_k(s) for s in args.shapes.split(",") if s.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        print(f"shapes: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = fields.get("data", "synthetic") != "synthetic"
    render = lm_table if lm else table
    flat_done, lm_eval = {}, {"tokens": args.eval_tokens_lm}
    rows = []
    for sizes, k in shapes:
        for seed in seeds:
            tag = "-".join(map(str, sizes)) + ("_k" + "-".join(map(str, k)) if k else "")
            try:
                shape_rows = run_shape(sizes, seed, args.seconds, fields, out / f"{tag}_s{seed}", args.probe_steps,
                                       k=k, flat_done=flat_done, lm_eval=lm_eval)
            except ValueError as exc:
                print(f"shapes: error: {exc}", file=sys.stderr)
                return 2
            with open(out / "results.jsonl", "a") as log:
                for r in shape_rows:
                    log.write(json.dumps(_plain(r)) + "\n")
            rows += shape_rows
            print("\n".join(render(shape_rows).splitlines()[2:]), flush=True)
    text = render(rows)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
