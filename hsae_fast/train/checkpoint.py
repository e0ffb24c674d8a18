"""Resumable training checkpoints: every tensor (model, optimizer moments, trackers, RNG) in one
safetensors file, the rest (step, schedules, data position, current k) in a JSON file that names
the tensors file and its sha256. Both are written atomically (`hsae_fast.io`), the JSON last, so
an interrupted save leaves the previous checkpoint in force."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import atomic_save_tensors, atomic_write_bytes, sha256_file

LATEST = "latest.json"


def _flatten_optimizer(state: dict, out: dict) -> dict:
    """torch optimizer state_dict -> tensors into `out` (prefix "optim."), returns the JSON-able rest."""
    meta = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                out[f"optim.{pid}.{key}"] = value
                meta["state"][str(pid)][key] = None
            else:
                meta["state"][str(pid)][key] = value
    return meta


def _unflatten_optimizer(meta: dict, tensors: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: tensors[f"optim.{pid}.{k}"] if v is None else v for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory, step: int, tensors: dict, optimizer_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` into `directory` and point latest.json at it; keep the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(tensors)
    meta = dict(meta, step=step, optimizer=_flatten_optimizer(optimizer_state, tensors))
    name = f"step_{step:09d}.safetensors"
    meta["tensors_file"] = name
    meta["tensors_sha256"] = atomic_save_tensors(tensors, directory / name)
    atomic_write_bytes(directory / f"step_{step:09d}.json", json.dumps(meta, indent=1).encode())
    atomic_write_bytes(directory / LATEST, json.dumps({"step": step, "meta": f"step_{step:09d}.json"}).encode())
    # the newest `keep` up to this one (a later step's files are not this run's to prune against)
    for old in [p for p in sorted(directory.glob("step_*.json")) if p.name <= f"step_{step:09d}.json"][:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return directory / name


def clear_checkpoints(directory) -> list:
    """Remove a previous run's checkpoints from `directory` (a fresh run starting there); returns
    the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for pattern in ("step_*.json", "step_*.safetensors", "nan_batch_step_*.safetensors", LATEST, ".*.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint file ({exc})") from None
    if not isinstance(data, dict) or (path.name == LATEST and not isinstance(data.get("meta"), str)):
        raise ValueError(f"{path}: not a checkpoint file of this library")
    return data


def load_checkpoint(directory) -> tuple[dict, dict, dict]:
    """(tensors, optimizer state_dict, meta) of the latest checkpoint; a torn or corrupt one is an error."""
    directory = Path(directory)
    latest = directory / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {directory} ({LATEST} is missing)")
    meta_path = directory / _read_json(latest)["meta"]
    meta = _read_json(meta_path)
    tensors_path = directory / meta["tensors_file"]
    if not tensors_path.is_file() or sha256_file(tensors_path) != meta["tensors_sha256"]:
        raise ValueError(f"{tensors_path} is missing or does not match {meta_path}: corrupt checkpoint")
    tensors = load_file(str(tensors_path))
    optimizer_state = _unflatten_optimizer(meta.pop("optimizer"), tensors)
    return tensors, optimizer_state, meta
