"""A run directory (SPEC 9) and the evaluation data it is judged on, shared by eval, analyze and plot.

Evaluation data, batch by batch (`EvalBatch`):
- LM runs (`trainer.model` set, or `trainer.data` an activation cache of `hsae_fast.data.lm`):
  held-out text of the run's corpus (whole plays for Shakespeare), cut into rows as for training;
  each batch carries the rows, their special-token mask and the hooked activations, so the CE/KL
  splice can run on the very same rows and positions.
- Other runs (synthetic, .npy, shard folders): the training source reopened as the trainer opens
  it, `sample(tokens, EVAL_SEED)`, a seed no training default uses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..layer import HSAELayer

# A held-out sample for non-LM sources: another seed than any training default.
EVAL_SEED = 12345

# Tokens that eval and analyze read when not told (LM runs also run the model over them).
DEFAULT_LM_TOKENS = 8192
DEFAULT_TOKENS = 32768


@dataclass
class Run:
    directory: Path
    hsae: dict
    trainer: dict
    layer: HSAELayer

    @property
    def lm(self) -> Optional[dict]:
        """{model, layer, corpus, context} of an LM run, else None. An LM run names its model in the
        trainer config, or trains on an activation cache folder whose meta.json names it."""
        if self.trainer.get("model"):
            return {"model": self.trainer["model"], "layer": self.trainer.get("layer"),
                    "corpus": self.trainer.get("corpus"), "context": self.trainer.get("context")}
        data = self.trainer.get("data")
        meta_path = Path(data) / "meta.json" if data else None
        if meta_path is not None and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("model"):
                return {key: meta.get(key) for key in ("model", "layer", "corpus", "context")}
        return None

    @property
    def is_lm(self) -> bool:
        return self.lm is not None

    def sample_tokens(self, tokens: Optional[int]) -> int:
        """The token count eval and analyze read: `tokens`, or this kind of run's default for None."""
        if tokens is None:
            return DEFAULT_LM_TOKENS if self.is_lm else DEFAULT_TOKENS
        if not isinstance(tokens, int) or tokens < 1:  # 0 once meant the default, silently
            raise ValueError(f"tokens={tokens!r}: must be a positive int (or None for the default)")
        return tokens

    @property
    def hooked_layer(self) -> int:
        """The LM layer the run's activations came from (LM runs; the data module's default if unset)."""
        from ..data.lm import DEFAULT_LAYER

        layer = self.lm.get("layer")
        return DEFAULT_LAYER if layer is None else int(layer)

    def train_config(self):
        """The run's TrainConfig, rebuilt from config.json (fields this version does not know are dropped)."""
        from ..train.config import TrainConfig

        known = set(TrainConfig.__dataclass_fields__)
        return TrainConfig(**{k: v for k, v in self.trainer.items() if k in known})

    def metrics_log(self) -> list[dict]:
        """The training log (metrics.jsonl): one dict per logged step; [] when absent."""
        path = self.directory / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir, device="cpu", backend: str = "auto") -> Run:
    directory = Path(run_dir)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {directory} is not a run directory (SPEC 9)")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or "hsae" not in config:
        raise ValueError(f"{config_path} has no 'hsae' section: not a run directory written by `hsae train`")
    final = directory / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"{final} is missing: the run has not finished (no final checkpoint)")
    layer = HSAELayer.from_pretrained(final, backend=backend, device=device).eval()
    return Run(directory, config["hsae"], config.get("trainer", {}), layer)


@dataclass
class EvalBatch:
    """x: (n, d) float32 activations of the evaluated positions. For LM runs also rows (B, C) token
    ids, special (B, C) bool, and the model's hooked activations (B, C, d); x = hidden[~special].
    logits: (B, C, V) the clean model's logits when asked for (`with_logits`).
    token_ids: (n,) the token at each evaluated position (None without text). first_index: the
    batch's first position in the whole evaluated set (positions are numbered in order)."""

    x: torch.Tensor
    first_index: int
    token_ids: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    special: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


@dataclass
class EvalData:
    """The evaluated positions of a run, plus what LM metrics need (model, tokenizer, hooked layer)."""

    run: Run
    tokens: int
    batch_rows: int = 8
    batch_tokens: int = 4096
    device: str = "cpu"
    with_logits: bool = False
    corpus: Optional[str] = None
    context: Optional[int] = None
    model: object = None
    tokenizer: object = None
    rows: Optional[torch.Tensor] = None
    special: Optional[torch.Tensor] = None
    _samples: Optional[torch.Tensor] = field(default=None, repr=False)
    _positions: Optional[torch.Tensor] = field(default=None, repr=False)  # flat (row, pos) of each evaluated position

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens}: the evaluation needs at least one token")
        if self.run.is_lm:
            self._open_lm()
        else:
            self._samples = self._open_source().sample(self.tokens, EVAL_SEED).float()
            if self._samples.shape[-1] != self.run.layer.cfg.d_model:
                raise ValueError(
                    f"data {self.run.trainer.get('data')!r} has d={self._samples.shape[-1]}, "
                    f"the model d_model={self.run.layer.cfg.d_model}"
                )

    @property
    def hooked_layer(self) -> int:
        return self.run.hooked_layer

    def _open_lm(self) -> None:
        from ..data import lm

        if self.model is None:
            self.model, self.tokenizer = lm.load_model(self.run.lm["model"], self.device)
        corpus = self.corpus or self.run.lm.get("corpus") or "shakespeare"
        context = int(self.context or self.run.lm.get("context") or lm.DEFAULT_CONTEXT)
        self.rows = lm.sample_rows(lm.token_rows(self.tokenizer, lm.corpus_documents(corpus, "eval"), context), self.tokens)
        self.special = lm.special_mask(self.rows, lm.special_token_ids(self.tokenizer))

    def _open_source(self):
        """The training source, reopened as the trainer opened it (synthetic options included)."""
        from ..train.run import open_run_source

        return open_run_source(self.run.train_config(), self.run.hsae)

    def batches(self) -> Iterator[EvalBatch]:
        if not self.run.is_lm:
            for start in range(0, self._samples.shape[0], self.batch_tokens):
                yield EvalBatch(self._samples[start : start + self.batch_tokens], start)
            return
        first = 0
        for start in range(0, self.rows.shape[0], self.batch_rows):
            rows = self.rows[start : start + self.batch_rows]
            special = self.special[start : start + self.batch_rows]
            hidden, logits = self._forward(rows)
            keep = ~special
            yield EvalBatch(hidden[keep], first, rows[keep], rows, special, hidden, logits)
            first += int(keep.sum())

    @torch.no_grad()
    def _forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hidden (B, C, d) float32, clean logits or None); without logits the forward stops at the layer."""
        from ..data.lm import layer_activations, patched_layer

        if not self.with_logits:
            return layer_activations(self.model, self.hooked_layer, rows.to(self.device)).cpu(), None
        captured = []
        with patched_layer(self.model, self.hooked_layer, lambda hidden: captured.append(hidden)):
            logits = self.model(input_ids=rows.to(self.device), use_cache=False).logits
        return captured[0].float().cpu(), logits

    def context_of(self, index: int, width: int = 12) -> tuple[str, str, str]:
        """(left text, the token, right text) around evaluated position `index` (LM runs)."""
        if self._positions is None:
            self._positions = (~self.special).reshape(-1).nonzero().squeeze(1)
        flat = int(self._positions[index])
        row, pos = divmod(flat, self.rows.shape[1])
        ids = self.rows[row]
        decode = lambda t: self.tokenizer.decode(t.tolist(), skip_special_tokens=False)
        return decode(ids[max(0, pos - width) : pos]), decode(ids[pos : pos + 1]), decode(ids[pos + 1 : pos + 1 + width // 2])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]) if self.tokenizer is not None else str(token_id)
