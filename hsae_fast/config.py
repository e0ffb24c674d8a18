"""`HSAEConfig`: every knob of SPEC sections 1-5, validated in one place.

Levels are indexed bottom first: level 0 is the finest (largest), level L-1 the top.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

GATINGS = ("hard", "none")
SELECTIONS = ("batch", "threshold", "token")
CONSISTENCIES = ("orphan", "kl")
INPUT_NORMS = ("none", "token")


def _config_error(field_name: str, value, rule: str) -> ValueError:
    return ValueError(f"HSAEConfig.{field_name}={value!r}: {rule}")


def _as_tuple(field: str, value, what: str) -> tuple:
    """A list-like field as a tuple; anything else (an int, None) an error naming the field."""
    if isinstance(value, (str, bytes)):
        raise _config_error(field, value, f"must be {what}")
    try:
        return tuple(value)
    except TypeError:
        raise _config_error(field, value, f"must be {what}") from None


def sizes_from_ratios(dict_size: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """SPEC 1: F_l = floor(F * r_l / sum(r) + 1e-9) for every level but the top, which takes the rest."""
    total = float(sum(ratios))
    sizes = [int(math.floor(dict_size * r / total + 1e-9)) for r in ratios[:-1]]
    sizes.append(dict_size - sum(sizes))
    return tuple(sizes)


@dataclass
class HSAEConfig:
    """The model's configuration (SPEC 1-5). Fields are public: config files and checkpoints use them.

    `level_sizes` wins over `level_ratios` when given; `dict_size` may then be left out.
    `k` is one mean active count per level, bottom first (an int is accepted for one level).
    `parent` is an optional custom parent map (global ids, -1 for the top level), length F.
    """

    d_model: int
    k: Sequence[int]
    dict_size: Optional[int] = None
    level_sizes: Optional[Sequence[int]] = None
    level_ratios: Sequence[float] = (16, 4, 1)
    gating: str = "hard"
    selection: str = "batch"
    cap: int = 4
    learn_edges: bool = False
    parent: Optional[Sequence[int]] = None
    # Losses (SPEC 5).
    aux_coef: float = 1.0 / 32
    k_aux: Optional[int] = None
    dead_after_tokens: int = 1_000_000
    prefix_until: float = 0.5
    lambda_cons: float = 0.0
    beta: float = 0.0
    consistency: str = "orphan"
    # Bad-input checks: a NaN/Inf scan of the input costs one reduction over (N, d).
    check_finite: bool = True
    # "token": each token scaled to norm sqrt(d_model) before the SPEC forward and the output scaled
    # back, so the loss weighs tokens alike (HSAELayer.input_scale says when that matters).
    input_norm: str = "none"

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def level_offsets(self) -> tuple[int, ...]:
        offsets, acc = [], 0
        for size in self.level_sizes:
            offsets.append(acc)
            acc += size
        return tuple(offsets)

    def kmax(self, level: int, selection: Optional[str] = None) -> int:
        """Per-token candidates kept at `level` (SPEC 1): k_l for token selection, else min(F_l, cap*k_l)."""
        selection = selection or self.selection
        if selection == "token":
            return self.k[level]
        return min(self.level_sizes[level], self.cap * self.k[level])

    @property
    def resolved_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else min(self.dict_size, max(1, self.d_model // 2))

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        self.level_ratios = _as_tuple("level_ratios", self.level_ratios, "a non-empty list of positive numbers")
        if not isinstance(self.d_model, int) or isinstance(self.d_model, bool) or self.d_model < 1:
            raise _config_error("d_model", self.d_model, "must be a positive int")
        if self.level_sizes is not None:
            sizes = _as_tuple("level_sizes", self.level_sizes, "a non-empty list of positive ints")
            if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
                raise _config_error("level_sizes", self.level_sizes, "must be a non-empty list of positive ints")
            if self.dict_size is not None and self.dict_size != sum(sizes):
                raise _config_error(
                    "dict_size", self.dict_size, f"must equal sum(level_sizes)={sum(sizes)} when both are given"
                )
            self.dict_size = sum(sizes)
        else:
            ratios = tuple(self.level_ratios)
            if not ratios or any(not isinstance(r, (int, float)) or r <= 0 for r in ratios):
                raise _config_error("level_ratios", self.level_ratios, "must be a non-empty list of positive numbers")
            if not isinstance(self.dict_size, int) or self.dict_size < len(ratios):
                raise _config_error(
                    "dict_size", self.dict_size, f"must be an int >= the number of levels ({len(ratios)})"
                )
            sizes = sizes_from_ratios(self.dict_size, ratios)
            self.level_ratios = ratios
        if any(s < 1 for s in sizes):
            raise _config_error("level_sizes", sizes, "every level needs at least one feature")
        for l in range(len(sizes) - 1):
            if sizes[l] < sizes[l + 1]:
                raise _config_error(
                    "level_sizes", sizes, f"sizes must be non-increasing upward (level {l}: {sizes[l]} < level {l+1}: {sizes[l+1]})"
                )
        self.level_sizes = sizes
        L = len(sizes)

        k = (self.k,) if isinstance(self.k, int) and not isinstance(self.k, bool) else _as_tuple(
            "k", self.k, "an int or a list of ints, one per level")
        if len(k) != L or any(not isinstance(x, int) or isinstance(x, bool) for x in k):
            raise _config_error("k", self.k, f"must be {L} ints, one per level (bottom first)")
        self.k = k
        for l in range(L):
            if not 1 <= k[l] <= sizes[l]:
                raise _config_error("k", k, f"needs 1 <= k_l <= F_l; level {l} has k={k[l]}, F={sizes[l]}")
        for l in range(L - 1):
            if k[l] < k[l + 1]:
                raise _config_error("k", k, f"must be non-increasing upward (level {l}: {k[l]} < level {l+1}: {k[l+1]})")

        if self.input_norm not in INPUT_NORMS:
            raise _config_error("input_norm", self.input_norm, f"must be one of {INPUT_NORMS}")
        if self.gating not in GATINGS:
            raise _config_error("gating", self.gating, f"must be one of {GATINGS}")
        if self.selection not in SELECTIONS:
            raise _config_error("selection", self.selection, f"must be one of {SELECTIONS}")
        if not isinstance(self.cap, int) or isinstance(self.cap, bool) or self.cap < 1:
            raise _config_error("cap", self.cap, "must be an int >= 1")
        if self.gating == "hard":
            for l in range(L - 1):
                # A token has at most k_{l+1} active parents' children as candidates (SPEC 1).
                if k[l] * sizes[l + 1] > k[l + 1] * sizes[l]:
                    raise _config_error(
                        "k", k,
                        f"with hard gating needs k_l <= k_(l+1) * F_l / F_(l+1); level {l}: "
                        f"{k[l]} > {k[l+1]} * {sizes[l]} / {sizes[l+1]}",
                    )
        if not isinstance(self.learn_edges, bool):
            raise _config_error("learn_edges", self.learn_edges, "must be a bool")
        if self.parent is not None:
            self.parent = tuple(int(p) for p in self.parent)
            self._validate_parent(self.parent)

        for name in ("aux_coef", "prefix_until", "lambda_cons", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise _config_error(name, value, "must be a finite number >= 0")
        if self.prefix_until > 1:
            raise _config_error("prefix_until", self.prefix_until, "is a fraction of training in [0, 1]")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or isinstance(self.k_aux, bool)
                                       or not 1 <= self.k_aux <= self.dict_size):
            raise _config_error("k_aux", self.k_aux, f"must be an int in [1, dict_size={self.dict_size}]")
        if (not isinstance(self.dead_after_tokens, int) or isinstance(self.dead_after_tokens, bool)
                or self.dead_after_tokens < 1):
            raise _config_error("dead_after_tokens", self.dead_after_tokens, "must be a positive int")
        if self.consistency not in CONSISTENCIES:
            raise _config_error("consistency", self.consistency, f"must be one of {CONSISTENCIES}")
        if not isinstance(self.check_finite, bool):
            raise _config_error("check_finite", self.check_finite, "must be a bool")

    def _validate_parent(self, parent: tuple[int, ...]) -> None:
        F, offsets, sizes = self.dict_size, self.level_offsets, self.level_sizes
        if len(parent) != F:
            raise _config_error("parent", f"<{len(parent)} entries>", f"must have dict_size={F} entries")
        for l, (off, size) in enumerate(zip(offsets, sizes)):
            for i in range(off, off + size):
                p = parent[i]
                if l == len(sizes) - 1:
                    if p != -1:
                        raise _config_error("parent", f"parent[{i}]={p}", "top-level features have parent -1")
                elif not offsets[l + 1] <= p < offsets[l + 1] + sizes[l + 1]:
                    raise _config_error(
                        "parent", f"parent[{i}]={p}",
                        f"feature {i} of level {l} needs a parent in level {l+1}, ids "
                        f"[{offsets[l+1]}, {offsets[l+1] + sizes[l+1]})",
                    )

    # ----------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HSAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"HSAEConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes) -> "HSAEConfig":
        """A copy with `changes`. The sizes follow what changed: new `level_ratios` or `dict_size`
        (without `level_sizes`) derive the sizes again from the ratios and dict_size; new `level_sizes`
        (without `dict_size`) give their sum as dict_size. Fields that depend on F (`parent`, `k_aux`)
        are checked again, not adapted."""
        if "level_sizes" in changes:
            changes.setdefault("dict_size", None)
        elif "level_ratios" in changes or "dict_size" in changes:
            changes["level_sizes"] = None
        return dataclasses.replace(self, **changes)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(HSAEConfig))
