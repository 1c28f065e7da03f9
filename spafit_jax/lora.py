"""LoRA for Flax: a wrapper that keeps the wrapped module's parameter paths.

`LoRA(base=nn.Dense(..., parent=None), name="query")` owns `query/kernel` and `query/bias` (the
base module shares its scope) plus `query/lora_a` (in x r) and `query/lora_b` (r x out).
A is Kaiming-uniform as in PEFT, B is zero, so a fresh adapter changes no output.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafit_jax.errors import ConfigError
from spafit_jax.methods import LORA_TARGETS as TARGETS, LoRAConfig  # noqa: F401 (re-exported)

# PEFT initialises A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kaiming_uniform_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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
