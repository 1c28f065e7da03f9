"""What a method trains, as plain Python: the methods, the labels, the LoRA settings, the strata rule.

The one owner of these facts. `config` validates its `method:` and `train:` sections by asking
this module, `masking` labels parameter trees with these names, `lora` builds the adapters that
`LoRAConfig` describes, `plan` puts them together for one model. Imports no jax, numpy or flax,
so config validation stays light.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from typing import Any, Mapping

from spafit_jax.errors import ConfigError, MaskingError

FROZEN, WEIGHT, BIAS, LAYERNORM, LORA, HEAD, POOLER = (
    "frozen", "weight", "bias", "layernorm", "lora", "head", "pooler")
#: the labels of trainable leaves, in display order (config's train.lr_by_label keys).
TRAINABLE_LABELS = (WEIGHT, BIAS, LAYERNORM, LORA, HEAD, POOLER)
#: full fine-tuning, BitFit on all layers, LoRA on all layers, SPAFIT, and the head alone.
METHODS = ("full", "bitfit", "lora", "spafit", "head_only")
#: methods whose model carries LoRA adapters.
LORA_METHODS = ("lora", "spafit")
#: the labels each method but spafit may give a layer's leaves (LAYERNORM only when norms train; spafit: per
#: stratum, `masking.spafit_labels`); the head and pooler are labelled apart.
LAYER_LABELS = {"full": frozenset({WEIGHT, BIAS, LAYERNORM, LORA}), "bitfit": frozenset({BIAS, LAYERNORM}),
                "lora": frozenset({LORA, LAYERNORM}), "head_only": frozenset()}

# Module names our BERT exposes to LoRA, in the order they appear in a layer.
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")


def check_lora_args(rank: Any, alpha: Any, dropout: Any, rslora: Any = False) -> None:
    """Raises a one-line ConfigError unless rank is a whole number > 0, alpha a finite number > 0,
    dropout a number in [0, 1) and rslora a bool (the settings of `LoRAConfig` and `lora.LoRA`)."""
    def real(x):
        return not isinstance(x, bool) and isinstance(x, numbers.Real)

    if not (real(rank) and isinstance(rank, numbers.Integral) and rank > 0):
        raise ConfigError(f"LoRA rank must be an integer > 0, got {rank!r}; set e.g. rank=8")
    if not (real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"LoRA alpha must be a finite number > 0, got {alpha!r}; set e.g. alpha=16")
    if not (real(dropout) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}; set e.g. dropout=0.1")
    if not isinstance(rslora, bool):
        raise ConfigError(f"LoRA rslora must be True or False, got {rslora!r}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which modules of which layers get adapters, and how large.

    targets: module names or regexes (matched whole, `re.fullmatch`), e.g. ("query", "value") or
    ("attn_.*",). modules: the module names the targets must select from (default our BERT's
    `LORA_TARGETS`; None for a model of your own, where any name goes). layers: layer indices
    (None = every layer). rank_pattern: {regex: rank} matched (re.search, first match wins)
    against "layer/<i>/<target>", e.g. {"layer/(10|11)/value": 16}. rslora scales by alpha/sqrt(r).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    rslora: bool = False
    modules: tuple[str, ...] | None = LORA_TARGETS

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if self.layers is not None:
            try:
                if any(isinstance(i, bool) for i in self.layers):
                    raise TypeError
                set_("layers", tuple(operator.index(i) for i in self.layers))
            except TypeError:
                raise ConfigError(f"LoRA layers must be integer layer indices, got {self.layers!r}") from None
        if isinstance(self.rank_pattern, Mapping):
            set_("rank_pattern", tuple(self.rank_pattern.items()))
        else:
            set_("rank_pattern", tuple(tuple(p) for p in self.rank_pattern))
        check_lora_args(self.rank, self.alpha, self.dropout, self.rslora)
        set_("rank", int(self.rank))
        for pattern, rank in self.rank_pattern:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"LoRA rank_pattern {pattern!r} is not a regular expression ({e})") from None
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoRA rank_pattern {pattern!r} gives rank {rank!r}; ranks must be positive integers")
        if self.modules is not None:
            set_("modules", tuple(self.modules))
        names = ", ".join(self.modules or ("the names of your modules",))
        if not self.targets:
            raise ConfigError(f"LoRA targets are empty; choose some of {names}")
        for t in self.targets:
            try:
                re.compile(t)
            except (re.error, TypeError) as e:
                raise ConfigError(f"LoRA target {t!r} is neither a module name nor a regular expression ({e})") from None
        unknown = [t for t in self.targets if self.modules is not None and not any(re.fullmatch(t, m) for m in self.modules)]
        if unknown:
            raise ConfigError(f"LoRA targets {unknown} match no module; the modules that exist are: {names} "
                              "(for a model of your own pass modules=None)")

    def validate(self, num_layers: int) -> None:
        """Fails when `layers` or `rank_pattern` name nothing in a model of `num_layers` layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"LoRA layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
        names = [f"layer/{i}/{t}" for i in range(num_layers) for t in self.matched() if self.wraps(i, t)]
        for pattern, _ in self.rank_pattern:
            if not any(re.search(pattern, n) for n in names):
                raise ConfigError(
                    f"LoRA rank_pattern {pattern!r} matches no wrapped module; they are named like "
                    f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                )

    def matched(self) -> tuple[str, ...]:
        """The names in `modules` that the targets select, in `modules` order (the targets when modules is None)."""
        if self.modules is None:
            return self.targets
        return tuple(m for m in self.modules if any(re.fullmatch(t, m) for t in self.targets))

    def wraps(self, layer: int, target: str) -> bool:
        """Whether module `target` of layer `layer` gets an adapter (a target names it or matches it whole)."""
        hit = target in self.targets or any(re.fullmatch(t, target) for t in self.targets)
        return hit and (self.layers is None or layer in self.layers)

    def rank_for(self, layer: int, target: str) -> int:
        """The rank of the adapter on `target` in `layer` (rank_pattern first, then `rank`)."""
        name = f"layer/{layer}/{target}"
        for pattern, rank in self.rank_pattern:
            if re.search(pattern, name):
                return rank
        return self.rank

    def scaling(self, rank: int) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)



# ----------------------------------------------------------------------------------- strata
def _resolve(name: str, value: Any, default: float, L: int | None) -> int | None:
    """An int layer count 0..L, or a float in [0, 1] as a fraction of L (rounded half up).

    With L None (the model not yet known) only the value itself is checked and None returned.
    """
    count = f" 0..{L}" if L is not None else ""
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MaskingError(f"{name}={value!r} is not a number; give a layer count{count} or a "
                           "fraction in [0, 1]")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif not math.isfinite(value) or value < 0:
        raise MaskingError(f"{name}={value!r} is a fraction outside [0, 1], so it is negative or not finite; "
                           f"give a fraction in [0, 1] or a layer count{count}")
    elif value <= 1:
        n = None if L is None else math.floor(float(value) * L + 0.5)
    elif float(value).is_integer():
        n = int(value)
    else:
        raise MaskingError(f"{name}={value!r} is neither a whole layer count nor a fraction in "
                           f"[0, 1] (a fraction > 1); give an int{count} or a fraction such as 0.5")
    if n is not None and n < 0:
        raise MaskingError(f"{name}={value!r} is negative; give a layer count{count} or a "
                           "fraction in [0, 1]")
    if L is not None and n > L:
        raise MaskingError(f"{name}={value!r} exceeds the {L} layers of this model; give a layer "
                           f"count{count} or a fraction in [0, 1]")
    return n if L is not None else None


def resolve_strata(num_layers: int, n1: int | float | None = None,
                   n2: int | float | None = None) -> tuple[int, int]:
    """(n1, n2) as layer counts: ints pass through, fractions of L are rounded, None is L/3, 2L/3."""
    L = num_layers
    if isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 0:
        raise MaskingError(f"num_layers={L!r} is not a layer count (an int >= 0); pass masking.num_layers(params)")
    n1 = _resolve("n1", n1, 1 / 3, L)
    n2 = _resolve("n2", n2, 2 / 3, L)
    if n1 > n2:
        raise MaskingError(f"n1={n1} > n2={n2}; need 0 <= n1 <= n2 <= L={L} (stratum 1 comes first)")
    return n1, n2


def check_strata(n1: Any = None, n2: Any = None) -> None:
    """What can be checked of n1/n2 without the model: numbers, not negative, n1 <= n2 when comparable.

    Raises MaskingError; `resolve_strata` checks the rest once the number of layers is known.
    """
    for name, value in (("n1", n1), ("n2", n2)):
        if value is not None:
            _resolve(name, value, 0.0, None)
    comparable = n1 is not None and n2 is not None and \
        isinstance(n1, numbers.Integral) == isinstance(n2, numbers.Integral)
    if comparable and n1 > n2:
        raise MaskingError(f"n1={n1} > n2={n2}; need n1 <= n2 (stratum 1 comes first)")
