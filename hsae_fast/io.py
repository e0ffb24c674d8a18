"""Atomic checkpoints: safetensors weights + JSON config, each written to a temp file and renamed.

The config records the weights file's sha256, so a torn pair (weights from one save, config from
another) or a corrupted file is rejected on load instead of loading wrong numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import HSAEConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def _atomic_replace(path: Path):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, so a reader
    sees the old file or the new one, never a torn one; on failure remove it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600 (and safetensors writes it so too) and the rename keeps that:
        # give it the mode a plain open() would (0666 less the umask), so a shared run folder's models
        # stay readable to the group
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename)."""
    with _atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> str:
    """safetensors save_file through a temp file + rename; returns the file's sha256."""
    with _atomic_replace(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_layer(layer, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = atomic_save_tensors(layer.state_dict(), directory / WEIGHTS_NAME)
    meta = {"format_version": FORMAT_VERSION, "weights_sha256": digest, "config": layer.cfg.to_dict()}
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2).encode())


def load_layer(cls, directory, backend: str = "auto", device=None):
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a directory written by save_pretrained")
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = HSAEConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path} is not a valid hsae_fast config: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    digest = sha256_file(weights_path)
    if digest != meta.get("weights_sha256"):
        raise ValueError(
            f"{weights_path} does not match {cfg_path} (sha256 {digest[:12]} != {str(meta.get('weights_sha256'))[:12]}): "
            "the file is corrupt or from another save"
        )
    try:
        state = load_file(weights_path)
    except SafetensorError as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if "W_enc" not in state:
        raise ValueError(f"{weights_path}: missing tensors ['W_enc']")
    layer = cls(cfg, backend=backend, device="cpu", dtype=state["W_enc"].dtype)
    expected = layer.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape or state[name].dtype != tensor.dtype:
            raise ValueError(
                f"{weights_path}: tensor {name} is {tuple(state[name].shape)} {state[name].dtype}, "
                f"expected {tuple(tensor.shape)} {tensor.dtype} for this config"
            )
    layer.load_state_dict(state)
    return layer.to(device) if device is not None else layer
