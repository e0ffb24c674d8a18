"""`TrainConfig` (every trainer knob, validated) and the resolution of a run's configuration from a
config file and `--field value` flags (SPEC 9): model fields go to `HSAEConfig`, trainer fields
here, anything else is an error before any work starts."""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import HSAEConfig
from ..data.synthetic import SyntheticConfig

B_DEC_INITS = ("geometric_median", "mean", "zero")
BASELINES = ("none", "flat")
DTYPES = ("float32", "bfloat16", "float16", "float64")

SYNTHETIC_D_MODEL = SyntheticConfig.d_model


def default_model(d_model: int) -> dict:
    """A 3-level model for any source: d top features, 4 children each, 4 grandchildren each
    (21 * d in all), k = (32, 8, 2). Exact multiples keep k within the gating rule of SPEC 1."""
    sizes = (16 * d_model, 4 * d_model, d_model)
    return {"level_sizes": sizes, "k": tuple(min(k, size) for k, size in zip((32, 8, 2), sizes))}


@dataclass
class TrainConfig:
    """Trainer fields (SPEC 9: settable in the config file or as --field value).

    Fractions (`*_frac`, `prefix_until`, ...) are of the whole run's tokens. Switches default to
    what SPEC 8 measured to help; the ones it found neutral or harmful default off.
    """

    data: str = "synthetic"
    model: Optional[str] = None
    layer: Optional[int] = None
    data_seed: int = 0
    # The embedded synthetic hierarchy (data="synthetic"; its d_model is the model's). The defaults
    # are SyntheticConfig's, so the generator and the trainer cannot drift apart.
    synthetic_sizes: Sequence[int] = SyntheticConfig.level_sizes
    synthetic_active: Sequence[float] = SyntheticConfig.mean_active
    synthetic_child_cos: float = SyntheticConfig.child_parent_cos
    synthetic_noise: float = SyntheticConfig.noise_std
    # Defaults sized for the embedded synthetic task on a small CPU (measured: batch 256 learns
    # more per token than 512 or 1024 at the same cost per token; lr 1e-2 beat 2e-2, 5e-3 and 3e-3).
    # 3M tokens take 2-3 minutes on one busy core; recovery still rises from 1M (0.95/0.92/0.97)
    # to 3M (0.99/0.98/1.00, FVU 0.006). Language-model activations want a smaller lr
    # (configs/lm_smollm2.yaml uses 5e-3) and set their own token count.
    tokens: int = 3_000_000
    batch_size: int = 256
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_frac: float = 0.02
    decay_start: float = 0.7
    grad_clip: float = 1.0
    renorm_decoder: bool = True
    b_dec_init: str = "geometric_median"
    b_dec_init_tokens: int = 8192
    cons_warmup_frac: float = 0.1
    # The prefix loss's weight is prefix_coef * w(t) (SPEC 5's w(t) times this). Measured on the
    # synthetic task (3 draws, 1M tokens): 1 -> refined recovery 0.91/0.86/0.95, 8 -> 0.95/0.92/0.97:
    # mid-level features otherwise lock onto one of their children early, and a weak prefix term
    # does not teach the upper levels the general directions before the bottom level takes them.
    prefix_coef: float = 8.0
    # Progressive sparsity: k starts at 2x its target and decays to it by 30% of the run (synthetic,
    # 3 draws, 1M tokens, with prefix_coef 8: refined recovery 0.95/0.92/0.97 -> 0.96/0.95/0.99,
    # tree 0.97 -> 0.98, for about 30% more time per token).
    k_start_mult: float = 2.0
    k_schedule_until: float = 0.3
    adaptive_sparsity: bool = False
    adapt_every_tokens: int = 500_000
    adapt_target_util: float = 0.9
    adapt_rate: float = 0.25
    adapt_max_mult: float = 2.0
    prune_unused: bool = False
    prune_after: float = 0.5
    prune_window_tokens: int = 1_000_000
    # Train in the model's output-Fisher metric (hsae_fast.data.fisher): 0 is SPEC 5's plain FVU; w in
    # (0, 1) trains on x' = A x, A = ((1 - w) I + w G d / tr G)^(1/2), and folds A into the final layer.
    # fisher_file: G's file (default: DATA/fisher/output_fisher.safetensors of an activation cache folder).
    fisher_weight: float = 0.0
    fisher_file: Optional[str] = None
    refine: bool = True
    baseline: str = "none"
    eval_tokens: int = 16384
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    # CPU threads for torch in this run; 0: one for the embedded synthetic task (its tiny model only
    # pays for thread synchronization: measured 4.4x more tokens/s than 2 threads on this shared
    # 2-core machine at load 7), torch's default for any other source.
    threads: int = 0
    dtype: str = "float32"
    backend: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise _error(f.name, value, f"must be of type {_type_name(hints[f.name])}")
        positive_ints = ("tokens", "batch_size", "b_dec_init_tokens", "adapt_every_tokens", "prune_window_tokens",
                         "eval_tokens", "log_every", "checkpoint_every", "keep_checkpoints")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise _error(name, getattr(self, name), "must be >= 1")
        if self.threads < 0:
            raise _error("threads", self.threads, "must be >= 0 (0: automatic)")
        if self.batch_size < 2:  # the loss's FVU divides by the batch's variance: none in one token
            raise _error("batch_size", self.batch_size, "must be >= 2 (the FVU loss needs the batch's variance)")
        if self.tokens < self.batch_size:
            raise _error("tokens", self.tokens, f"must be at least one batch (batch_size={self.batch_size})")
        for name in ("lr", "weight_decay", "grad_clip", "adapt_rate", "prefix_coef"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise _error(name, value, "must be a finite number >= 0")
        if self.lr == 0:
            raise _error("lr", self.lr, "must be > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise _error(name, getattr(self, name), "must be in [0, 1)")
        for name in ("warmup_frac", "decay_start", "cons_warmup_frac", "k_schedule_until", "prune_after",
                     "adapt_target_util"):
            if not 0 <= getattr(self, name) <= 1:
                raise _error(name, getattr(self, name), "is a fraction in [0, 1]")
        if self.decay_start < self.warmup_frac:  # the lr would jump down mid-warmup, or never decay
            raise _error("decay_start", self.decay_start, f"must be >= warmup_frac={self.warmup_frac}")
        if not (math.isfinite(self.fisher_weight) and 0 <= self.fisher_weight < 1):
            raise _error("fisher_weight", self.fisher_weight, "must be in [0, 1) (0: the plain FVU)")
        if self.k_start_mult < 1:
            raise _error("k_start_mult", self.k_start_mult, "must be >= 1 (k decays from k_start_mult * k to k)")
        if self.adapt_max_mult < 1:
            raise _error("adapt_max_mult", self.adapt_max_mult, "must be >= 1")
        if self.b_dec_init not in B_DEC_INITS:
            raise _error("b_dec_init", self.b_dec_init, f"must be one of {B_DEC_INITS}")
        if self.baseline not in BASELINES:
            raise _error("baseline", self.baseline, f"must be one of {BASELINES}")
        if self.dtype not in DTYPES:
            raise _error("dtype", self.dtype, f"must be one of {DTYPES}")
        if (self.model is None) != (self.layer is None):
            raise _error("layer" if self.model else "model", self.layer if self.model else self.model,
                         "--model and --layer go together (a language model source needs both)")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def cpu_threads(self) -> int:
        """The torch thread count this run asks for (0: leave torch's default)."""
        return self.threads or (1 if self.synthetic else 0)

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic" and self.model is None

    def synthetic_model(self) -> dict:
        """What the synthetic task trains when the user names no sizes: one feature per concept
        and k = the mean active concepts per level (SPEC 8's setting by default)."""
        return {"level_sizes": tuple(self.synthetic_sizes), "k": tuple(max(1, round(a)) for a in self.synthetic_active)}


# Model fields the synthetic task sets unless the user does. A true concept fires on at least 1 token
# in 100 here, so a feature silent for 50k tokens is dead; the 1M-token default suits LM dictionaries
# but never revives anything in a synthetic run of a few million tokens (measured: AuxK on at 50k
# raised refined recovery 0.88/0.82/0.95 -> 0.91/0.86/0.95 at 1M tokens).
SYNTHETIC_MODEL_DEFAULTS = {"dead_after_tokens": 50_000}


def _error(name, value, rule) -> ValueError:
    return ValueError(f"TrainConfig.{name}={value!r}: {rule}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


# ---------------------------------------------------------------- flag parsing
HSAE_FIELDS = {f.name for f in dataclasses.fields(HSAEConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_HSAE_HINTS = typing.get_type_hints(HSAEConfig)
_TRAIN_HINTS = typing.get_type_hints(TrainConfig)


def _parse_scalar(text: str, hint, name: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_scalar(text, a, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else str
        return tuple(_parse_scalar(t.strip(), item, name) for t in text.split(",") if t.strip())
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text.replace("_", ""))
        if hint is float:
            return float(text)
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} {text!r}: expected {_type_name(hint)}") from None
    return text


def parse_field_flags(extra: Sequence[str]) -> dict:
    """['--level-sizes', '128,32,8', '--lr=1e-3', ...] -> {"level_sizes": (128, 32, 8), "lr": 0.001}.
    Unknown fields and flags without a value are errors naming them."""
    out, i, extra = {}, 0, list(extra)
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--"):
            raise ValueError(f"unexpected argument {flag!r}: fields are given as --field value")
        name, _, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if not value:
            if i + 1 >= len(extra) or (extra[i + 1].startswith("--") and not _is_number(extra[i + 1])):
                raise ValueError(f"--{name.replace('_', '-')} needs a value")
            value, i = extra[i + 1], i + 1
        i += 1
        if name in HSAE_FIELDS:
            out[name] = _parse_scalar(value, _HSAE_HINTS[name], name)
        elif name in TRAIN_FIELDS:
            out[name] = _parse_scalar(value, _TRAIN_HINTS[name], name)
        else:
            raise ValueError(f"unknown field --{name.replace('_', '-')}; model fields: {sorted(HSAE_FIELDS)}; "
                             f"trainer fields: {sorted(TRAIN_FIELDS)}")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def yaml_load(text: str):
    """yaml.safe_load, but reading 1e-3 as a float as YAML 1.2 and JSON do (PyYAML follows YAML 1.1,
    where a float needs a dot: `lr: 1e-3` came back as the string '1e-3'). Its errors as ValueError."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def load_config_file(path) -> dict:
    """A .json or .yaml file: flat {field: value} or sectioned {"hsae": {...}, "trainer": {...}}
    (a run's config.json is a valid config file)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--config {path}: expected a .json, .yaml or .yml file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml_load(text) or {}
    except ValueError as e:  # json's errors are ValueErrors; yaml_load raises its own as one
        raise ValueError(f"--config {path}: not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of fields, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if key in ("hsae", "trainer") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - HSAE_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"--config {path}: unknown field(s) {unknown}")
    return flat


def split_fields(fields: dict) -> tuple[dict, dict]:
    """(model fields, trainer fields); lists become tuples for the model config."""
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in HSAE_FIELDS}
    trainer = {k: v for k, v in fields.items() if k in TRAIN_FIELDS}
    return model, trainer


def resolve_model_config(model_fields: dict, d_model: int, tcfg: TrainConfig) -> HSAEConfig:
    """The user's model fields over the defaults for this source (d_model comes from the data)."""
    fields = dict(model_fields)
    if "d_model" in fields and fields["d_model"] != d_model:
        raise ValueError(f"HSAEConfig.d_model={fields['d_model']}: the data has d_model={d_model}")
    fields["d_model"] = d_model
    defaults = tcfg.synthetic_model() if tcfg.synthetic else default_model(d_model)
    if not any(key in fields for key in ("level_sizes", "dict_size")):
        for key, value in defaults.items():
            fields.setdefault(key, value)
    fields.setdefault("k", defaults["k"])
    if tcfg.synthetic:
        for key, value in SYNTHETIC_MODEL_DEFAULTS.items():
            fields.setdefault(key, value)
    return HSAEConfig(**fields)


def flat_baseline_config(cfg: HSAEConfig) -> HSAEConfig:
    """The matched flat SAE: L = 1, the same dict size and total L0, the same selection and losses."""
    return cfg.replace(level_sizes=(cfg.dict_size,), k=(sum(cfg.k),), parent=None, level_ratios=(1,))
