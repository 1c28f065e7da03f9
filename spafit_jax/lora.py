"""LoRA for Flax: a wrapper that keeps the wrapped module's parameter paths.

`LoRA(base=nn.Dense(..., parent=None), name="query")` owns `query/kernel` and `query/bias` (the
base module shares its scope) plus `query/lora_a` (in x r) and `query/lora_b` (r x out).
A is Kaiming-uniform as in PEFT, B is zero, so a fresh adapter changes no output.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafit_jax.errors import ConfigError

# Module names our BERT exposes to LoRA, in the order they appear in a layer.
TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")

# PEFT initialises A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kaiming_uniform_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which modules of which layers get adapters, and how large.

    targets: module names from `TARGETS`. layers: layer indices (None = every layer).
    rank_pattern: {regex: rank} matched (re.search, first match wins) against
    "layer/<i>/<target>", e.g. {"layer/(10|11)/value": 16}. rslora scales by alpha/sqrt(r).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    rslora: bool = False

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
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}; set e.g. rank=8")
        for pattern, rank in self.rank_pattern:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"LoRA rank_pattern {pattern!r} is not a regular expression ({e})") from None
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoRA rank_pattern {pattern!r} gives rank {rank!r}; ranks must be positive integers")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"LoRA targets are empty; choose some of {', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError(
                f"LoRA targets {unknown} match no module; the modules that exist are: {', '.join(TARGETS)}"
            )

    def validate(self, num_layers: int) -> None:
        """Fails when `layers` or `rank_pattern` name nothing in a model of `num_layers` layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"LoRA layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
        names = [f"layer/{i}/{t}" for i in range(num_layers) for t in self.targets if self.wraps(i, t)]
        for pattern, _ in self.rank_pattern:
            if not any(re.search(pattern, n) for n in names):
                raise ConfigError(
                    f"LoRA rank_pattern {pattern!r} matches no wrapped module; they are named like "
                    f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                )

    def wraps(self, layer: int, target: str) -> bool:
        """Whether module `target` of layer `layer` gets an adapter."""
        return target in self.targets and (self.layers is None or layer in self.layers)

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


class LoRA(nn.Module):
    """y = base(x) + scaling * dropout(x) @ A @ B, with the base's parameters at this module's path.

    Pass the base unbound (`nn.Dense(features, parent=None)`); its kernel and bias live beside
    `lora_a` and `lora_b`, so pre-trained weights load into a wrapped model unchanged.
    """

    base: nn.Module
    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = self.base(x)
        a = self.param("lora_a", kaiming_uniform_a, (x.shape[-1], self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, y.shape[-1]), self.param_dtype)
        dtype = self.dtype or x.dtype
        h = nn.Dropout(self.dropout)(x, deterministic=deterministic) if self.dropout else x
        scale = self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        update = (h.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return y + (scale * update).astype(y.dtype)


def _adapter_paths(params, prefix=()):
    """Yields (path, node) for every dict node that holds lora_a and lora_b."""
    if not isinstance(params, Mapping):
        return
    if "lora_a" in params and "lora_b" in params:
        yield prefix, params
    for key, value in params.items():
        yield from _adapter_paths(value, prefix + (key,))


def _rebuild(params, fn):
    """Copies a nested mapping into plain dicts, applying fn to adapter nodes."""
    if not isinstance(params, Mapping):
        return params
    if "lora_a" in params and "lora_b" in params:
        return fn(dict(params))
    return {k: _rebuild(v, fn) for k, v in params.items()}


def _delta(node, lora: LoRAConfig):
    a, b = node["lora_a"], node["lora_b"]
    return (lora.scaling(a.shape[-1]) * (a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(node["kernel"].dtype)


def merge(params, lora: LoRAConfig):
    """Folds every adapter into its kernel and drops lora_a / lora_b: a tree for the plain model."""

    def fold(node):
        node["kernel"] = node["kernel"] + _delta(node, lora)
        del node["lora_a"], node["lora_b"]
        return node

    return _rebuild(params, fold)


def adapters(params) -> dict:
    """The adapter leaves of a LoRA tree: {"a/b/query": {"lora_a": A, "lora_b": B}, ...}."""
    return {"/".join(map(str, p)): {"lora_a": n["lora_a"], "lora_b": n["lora_b"]} for p, n in _adapter_paths(params)}


def unmerge(merged, adapter_leaves: Mapping, lora: LoRAConfig):
    """Inverse of `merge`: subtracts the adapters from the kernels and puts them back in the tree."""
    merged = jax.tree_util.tree_map(lambda x: x, dict(merged))

    def walk(node, prefix):
        key = "/".join(prefix)
        if key in adapter_leaves:
            node = dict(node, **adapter_leaves[key])
            node["kernel"] = node["kernel"] - _delta(node, lora)
            return node
        if isinstance(node, Mapping):
            return {k: walk(v, prefix + (str(k),)) for k, v in node.items()}
        return node

    out = walk(merged, ())
    missing = set(adapter_leaves) - {"/".join(map(str, p)) for p, _ in _adapter_paths(out)}
    if missing:
        raise ConfigError(f"unmerge: adapters for {sorted(missing)} have no module in this tree; pass the tree merge() returned")
    return out
