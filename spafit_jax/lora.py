"""LoRA for Flax: a wrapper that keeps the wrapped module's parameter paths.

`LoRA(base=nn.Dense(..., parent=None), name="query")` owns `query/kernel` and `query/bias` (the
base module shares its scope) plus `query/lora_a` (in x r) and `query/lora_b` (r x out).
A is Kaiming-uniform as in PEFT, B is zero, so a fresh adapter changes no output. The base is an
`nn.Dense` or `nn.DenseGeneral` (its contracted input and its features flattened for A and B);
anything else is refused at init, since `merge` could not fold it exactly. `model.init` also
returns each adapter's scaling in the "lora" collection, so `merge` can read it from the model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from spafit_jax.errors import ConfigError
from spafit_jax.methods import LORA_TARGETS as TARGETS, LoRAConfig, check_lora_args  # noqa: F401 (re-exported)

# PEFT initialises A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
kaiming_uniform_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
#: the base modules LoRA wraps; merge folds an adapter into their kernel exactly.
SUPPORTED = (nn.Dense, nn.DenseGeneral)
#: the variable collection in which `init` records each adapter's scaling (alpha / r, or alpha / sqrt(r)).
COLLECTION = "lora"


class LoRA(nn.Module):
    """y = base(x) + scaling * dropout(x) @ A @ B, with the base's parameters at this module's path.

    Pass the base unbound (`nn.Dense(features, parent=None)`); its kernel and bias live beside
    `lora_a` and `lora_b`, so pre-trained weights load into a wrapped model unchanged. rank (an int
    > 0), alpha (> 0), dropout (in [0, 1)) and rslora (a bool) are checked when the module is made.
    """

    base: nn.Module
    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_lora_args(self.rank, self.alpha, self.dropout, self.rslora)  # here, not deep in jax at init
        super().__post_init__()

    def setup(self):
        base, kind = self.base, type(self.base).__name__
        if not isinstance(base, SUPPORTED):
            raise ConfigError(f"LoRA wraps nn.Dense or nn.DenseGeneral, not nn.{kind}: merge could not fold "
                              f"an adapter into its kernel exactly; leave {self.name or kind} unadapted")
        if base.parent is not self:
            raise ConfigError(f"LoRA's base nn.{kind} is bound to {type(base.parent).__name__} as {base.name!r}, "
                              f"so its parameters would not sit beside lora_a; create it with parent=None, "
                              f"e.g. LoRA(nn.{kind}(..., parent=None), ...)")
        if isinstance(base, nn.DenseGeneral) and base.batch_dims:
            raise ConfigError(f"LoRA does not wrap an nn.DenseGeneral with batch_dims={base.batch_dims}; "
                              "use one without batch_dims")
        nn.share_scope(self, base)

    def _flat_input(self, x):
        """x with the axes the base contracts moved last and flattened (Dense: x itself)."""
        if not isinstance(self.base, nn.DenseGeneral):
            return x
        axis = self.base.axis if isinstance(self.base.axis, (tuple, list)) else (self.base.axis,)
        axis = tuple(a % x.ndim for a in axis)
        moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
        return moved.reshape(moved.shape[: x.ndim - len(axis)] + (-1,))

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = self.base(x)
        h = self._flat_input(x)
        n_out = math.prod(y.shape[h.ndim - 1:])
        a = self.param("lora_a", kaiming_uniform_a, (h.shape[-1], self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, n_out), self.param_dtype)
        scale = self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        if self.is_initializing():
            try:
                self.variable(COLLECTION, "scaling", lambda: jnp.asarray(scale, jnp.float32))
            except flax.errors.ScopeCollectionNotFound:  # nn.scan / nn.vmap without an axis for our collection
                raise ConfigError(f"LoRA records its scaling in the {COLLECTION!r} collection, which this transform does "
                                  f"not carry; give nn.scan / nn.vmap variable_axes={{'params': 0, {COLLECTION!r}: 0}}") from None
        dtype = self.dtype or x.dtype
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic) if self.dropout else h
        update = (h.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return y + (scale * update).reshape(y.shape).astype(y.dtype)


def _adapter_paths(params, prefix=()):
    """Yields (path, node) for every dict node that holds lora_a and lora_b."""
    if not isinstance(params, Mapping):
        return
    if "lora_a" in params and "lora_b" in params:
        yield prefix, params
    for key, value in params.items():
        yield from _adapter_paths(value, prefix + (key,))


def _rebuild(params, fn, prefix=()):
    """Copies a nested mapping into plain dicts, applying fn(path, node) to adapter nodes."""
    if not isinstance(params, Mapping):
        return params
    if "lora_a" in params and "lora_b" in params:
        return fn("/".join(map(str, prefix)), dict(params))
    return {k: _rebuild(v, fn, prefix + (k,)) for k, v in params.items()}


def _record(scalings: Mapping) -> dict[str, Any]:
    """{adapter path: scaling} of a "lora" collection from `model.init`."""
    return {"/".join(map(str, k[:-1])): v for k, v in flatten_dict(dict(scalings)).items() if k[-1] == "scaling"}


def _scaling(path: str, rank: int, lora) -> Any:
    """The scaling of the adapter at `path`: recorded by the model, or from a LoRAConfig that fits its rank."""
    if isinstance(lora, LoRAConfig):
        ranks = {lora.rank, *(r for _, r in lora.rank_pattern)}
        if rank not in ranks:
            raise ConfigError(f"merge: the adapter at {path} has rank {rank} but the LoRAConfig gives rank(s) "
                              f"{sorted(ranks)}; pass the model's own record (model.init(...)['{COLLECTION}']) "
                              "or the LoRAConfig the model was built with")
        return lora.scaling(rank)
    if path not in lora:
        raise ConfigError(f"merge: no scaling recorded for the adapter at {path}; pass the '{COLLECTION}' "
                          "collection of this model's init variables, or its LoRAConfig")
    return lora[path]


def _delta(path, node, lora):
    a, b, kernel = node["lora_a"], node["lora_b"], node["kernel"]
    scale = _scaling(path, a.shape[-1], lora)
    return (scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).reshape(kernel.shape).astype(kernel.dtype)


def _source(tree, lora):
    """(params, how to scale): `tree` may be init's variables ({"params", "lora"}); a LoRAConfig given
    with them must agree with what they record."""
    if isinstance(tree, Mapping) and COLLECTION in tree and "params" in tree:
        record = _record(tree[COLLECTION])
        for path, node in _adapter_paths(tree["params"]):
            key, rank = "/".join(map(str, path)), node["lora_a"].shape[-1]
            if isinstance(lora, LoRAConfig) and not math.isclose(_scaling(key, rank, lora), float(record[key]), rel_tol=1e-6):
                raise ConfigError(f"merge: the LoRAConfig gives scaling {lora.scaling(rank):g} at {key} but the model "
                                  f"was built with {float(record[key]):g}; leave lora= out to use the model's own")
        return tree["params"], record
    if lora is None:
        raise ConfigError(f"merge: pass the variables of model.init (with their '{COLLECTION}' collection), "
                          "the collection itself, or the LoRAConfig the model was built with")
    return tree, lora if isinstance(lora, LoRAConfig) else _record(lora)


def merge(params, lora=None):
    """Folds every adapter into its kernel and drops lora_a / lora_b: a tree for the plain model.

    The scalings come from the model: pass `model.init`'s variables whole (then `lora` is None),
    or `lora=` their "lora" collection; a `LoRAConfig` is accepted when its ranks fit the adapters
    (and, with the variables, only when it agrees with them). Variables in, variables out.
    """
    tree, how = _source(params, lora)

    def fold(path, node):
        node["kernel"] = node["kernel"] + _delta(path, node, how)
        del node["lora_a"], node["lora_b"]
        return node

    merged = _rebuild(tree, fold)
    if tree is params:
        return merged
    return {k: v for k, v in params.items() if k != COLLECTION} | {"params": merged}  # the plain model's variables


def adapters(params) -> dict:
    """The adapter leaves of a LoRA tree: {"a/b/query": {"lora_a": A, "lora_b": B}, ...}."""
    return {"/".join(map(str, p)): {"lora_a": n["lora_a"], "lora_b": n["lora_b"]} for p, n in _adapter_paths(params)}


def unmerge(merged, adapter_leaves: Mapping, lora):
    """Inverse of `merge`: subtracts the adapters from the kernels and puts them back in the tree.

    `lora` is the "lora" collection of the model's init variables or its LoRAConfig, as for `merge`.
    """
    merged = jax.tree_util.tree_map(lambda x: x, dict(merged))
    how = lora if isinstance(lora, LoRAConfig) else _record(lora)

    def walk(node, prefix):
        key = "/".join(prefix)
        if key in adapter_leaves:
            node = dict(node, **adapter_leaves[key])
            node["kernel"] = node["kernel"] - _delta(key, node, how)
            return node
        if isinstance(node, Mapping):
            return {k: walk(v, prefix + (str(k),)) for k, v in node.items()}
        return node

    out = walk(merged, ())
    missing = set(adapter_leaves) - {"/".join(map(str, p)) for p, _ in _adapter_paths(out)}
    if missing:
        raise ConfigError(f"unmerge: adapters for {sorted(missing)} have no module in this tree; pass the tree merge() returned")
    return out
