"""Parameter paths of any Flax tree, and the two label types that travel with them (`Rows`, `Trainable`).

The low layer under `masking` (labels) and `stratified` (the optimizer): '/'-joined key paths for
dicts, FrozenDict, `nnx.State` and `nnx.Module` alike, a {path: label} lookup, and the row label of a
stacked leaf. Imports only the standard library, numpy and jax (flax.nnx only when the caller has).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from spafit_jax.errors import MaskingError


class Rows(str):
    """The label of a stacked leaf whose rows `start..stop-1` along `axis` train (the others stay frozen).

    It is the label string itself (`Rows("bias", 2, 6) == "bias"`), so code that groups leaves by
    label needs nothing else; `count_params` and `stratified_optimizer` read the rows.
    """

    def __new__(cls, label: str, start: int, stop: int, axis: int = 0):
        self = super().__new__(cls, label)
        self.start, self.stop, self.axis = start, stop, axis
        return self

    def __repr__(self) -> str:
        return f"Rows({str(self)!r}, {self.start}, {self.stop}, axis={self.axis})"

    def __reduce__(self):
        return Rows, (str(self), self.start, self.stop, self.axis)


# ----------------------------------------------------------------------------------- paths
def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def join_path(keypath: Sequence[Any]) -> str:
    """The '/'-joined path of a jax key path (an `nnx.Variable` / `nn.Partitioned` box's `value` left out)."""
    keys = list(keypath)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]  # nnx.Variable / nn.Partitioned box
    return "/".join(_key_str(k) for k in keys)


def _nnx():
    return sys.modules.get("flax.nnx")  # only loaded when the caller uses NNX: masking stays light


def params_of(tree: Any) -> Any:
    """An `nnx.Module`'s `nnx.Param` state; any other tree as it is."""
    nnx = _nnx()
    if nnx is not None and isinstance(tree, nnx.Module):
        return nnx.state(tree, nnx.Param)
    return tree


def unbox(labels: Any) -> Any:
    """Labels of an nnx State with the `Param(value=label)` boxes replaced by the label strings."""
    nnx = _nnx()
    if nnx is None:
        return labels
    box = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    value = lambda v: v.get_value() if hasattr(v, "get_value") else v.value  # noqa: E731
    return jax.tree.map(lambda v: value(v) if box(v) else v, labels, is_leaf=box)


def path_leaves(tree: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] of a tree (an `nnx.Module`: its `nnx.Param` state), in jax's leaf order."""
    return [(join_path(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(params_of(tree))[0]]


_PASS = "pass the parameters: model.init(rng, x)['params'], an nnx.Module or nnx.state(model, nnx.Param)"


def param_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`path_leaves` of a parameter tree; a one-line MaskingError for what is not one (nothing in it, a
    bare object, a leaf that is no array, other variable collections, an nnx.State with non-Param variables)."""
    nnx, state = _nnx(), params_of(tree)
    if nnx is not None and isinstance(state, nnx.State):
        box = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        odd = [(join_path(k), type(v).__name__) for k, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=box)[0]
               if box(v) and not isinstance(v, nnx.Param)]
        if odd:
            raise MaskingError(f"the nnx.State holds {len(odd)} variable(s) that are not parameters ({odd[0][1]} at "
                               f"{odd[0][0]!r}), which must not train; pass the module or nnx.state(model, nnx.Param)")
    if isinstance(state, Mapping) and "params" in state and len(state) > 1:
        others = sorted(str(k) for k in state if k != "params")
        raise MaskingError(f"params holds the variable collections {others} beside 'params', which must not train; "
                           "pass variables['params'] (split/join and labels cover the parameters only)")
    leaves = path_leaves(state)
    if not leaves:
        raise MaskingError(f"params ({type(tree).__name__}) holds no parameters; {_PASS}")
    for path, x in leaves:
        if not path:
            raise MaskingError(f"params is a single {type(x).__name__}, not a tree of named parameters; {_PASS}")
        if isinstance(x, (str, bytes)) or not (hasattr(x, "shape") or isinstance(x, numbers.Number)):
            raise MaskingError(f"parameter {path!r} is a {type(x).__name__}, not an array; {_PASS} (labels come second)")
    return leaves


def map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """The tree of `fn(path, leaf)` over `tree`'s leaves."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(join_path(kp), x), tree)


def size_of(x: Any) -> int:
    """The number of elements of an array (or of anything with a shape)."""
    return int(math.prod(getattr(x, "shape", np.shape(x))))


def path_lookup(labels: Any, params: Any = None) -> dict[str, str]:
    """{path: label} of a labels tree; with `params`, checks that both have the same paths."""
    found = path_leaves(labels)
    odd = next(((p, x) for p, x in found if not isinstance(x, str)), None)
    if odd is not None:
        raise MaskingError(f"labels leaf {odd[0]!r} is a {type(odd[1]).__name__}, not a label string; pass the labels "
                           "from label_params / spafit_labels / method_labels (params come first)")
    leaves = None if params is None else path_leaves(params)
    if leaves is not None and [p for p, _ in leaves] != [p for p, _ in found]:
        raise MaskingError("labels do not have the structure of params; build them from this "
                           "very tree with label_params / spafit_labels / method_labels")
    for (path, label), (_, x) in zip(found, leaves or ()):
        check_rows(path, label, x)
    return dict(found)


def check_rows(path: str, label: Any, x: Any) -> None:
    """A one-line MaskingError when a `Rows` label names rows that leaf `x` does not have (labels of a deeper model)."""
    if isinstance(label, Rows):
        shape = np.shape(x)
        if not -len(shape) <= label.axis < len(shape) or shape[label.axis] < label.stop:
            raise MaskingError(f"labels of another model: {path!r} has shape {tuple(shape)} but its label trains rows "
                               f"{label.start}..{label.stop - 1} along axis {label.axis}; build the labels from this very tree")


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which parameters train, by path: an NNX filter and a predicate `(path, leaf) -> bool`.

    `path` is an NNX path tuple, a `jax.tree_util` key path or a '/'-joined string.
    """

    paths: frozenset[str]

    def __call__(self, path: Any, _leaf: Any = None) -> bool:
        key = path if isinstance(path, str) else join_path(path)
        return key in self.paths
