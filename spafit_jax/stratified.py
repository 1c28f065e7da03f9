"""The stratified optimizer: one AdamW per trainable label, no state for frozen leaves or frozen rows.

`stratified_optimizer(labels, settings)` is an `optax.multi_transform` whose labels are looked up
by parameter path, so one optimizer serves every form of the tree it is given: the trainable half of
`masking.split` (frozen leaves None) or the `nnx.State` that `nnx.Optimizer(...,
wrt=masking.trainable(labels))` passes (Variables at init, pure arrays at update); a frozen leaf
given to it is an error. Its state has the layout optax gives `multi_transform` over a labels tree
(checkpoints written before stay readable). A stacked leaf labelled `Rows` keeps Adam moments for its trainable
rows only and gets exact zero updates on the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from spafit_jax.errors import MaskingError
from spafit_jax.methods import FROZEN, TRAINABLE_LABELS
from spafit_jax.tree_paths import Rows, check_rows, join_path, map_paths, path_lookup

_ADAM_KEYS = ("learning_rate", "weight_decay", "b1", "b2", "eps")


def _slice_rows(tree: Any, rows: Mapping[str, Rows]) -> Any:
    """Each `Rows` leaf cut to its trainable rows; other leaves as they are."""
    def one(path, x):
        r = rows.get(path)
        if r is not None:
            check_rows(path, r, x)
        return x if r is None else jax.lax.slice_in_dim(x, r.start, r.stop, axis=r.axis)
    return map_paths(one, tree)


def _pad_rows(sliced: Any, full: Any, rows: Mapping[str, Rows]) -> Any:
    """`sliced` put back at its rows of zeros shaped like `full` (frozen rows get exactly zero)."""
    def one(kp, u, x):
        r = rows.get(join_path(kp))
        return u if r is None else jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(x), u, r.start, r.axis)
    return jax.tree_util.tree_map_with_path(one, sliced, full)


def _on_rows(inner: optax.GradientTransformation, rows: Mapping[str, Rows]) -> optax.GradientTransformation:
    """`inner` applied to the trainable rows of `Rows` leaves only (its state holds those rows alone)."""
    def init(params):
        return inner.init(_slice_rows(params, rows))

    def update(updates, state, params=None):
        cut = None if params is None else _slice_rows(params, rows)
        new, state = inner.update(_slice_rows(updates, rows), state, cut)
        return _pad_rows(new, updates, rows), state

    return optax.GradientTransformation(init, update)


def _number(v: Any) -> float | None:
    """v as a finite float when it is a real number or a 0-d array (not a bool), else None."""
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or getattr(v, "shape", None) == ()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _adamw(label: str, s: Any, rows: Mapping[str, Rows]) -> optax.GradientTransformation:
    if not isinstance(s, Mapping) or "learning_rate" not in s:
        raise MaskingError(f"settings[{label!r}] must be a mapping with a learning_rate, got {s!r}")
    unknown = sorted(set(s) - set(_ADAM_KEYS))
    if unknown:
        raise MaskingError(f"settings[{label!r}] has unknown key(s) {unknown}; use {list(_ADAM_KEYS)}")
    for key, ok, want in (("learning_rate", lambda v: v >= 0, "a number >= 0 or an optax schedule"),
                          ("weight_decay", lambda v: v >= 0, "a number >= 0"), ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
                          ("b2", lambda v: 0 <= v < 1, "in [0, 1)"), ("eps", lambda v: v > 0, "a number > 0")):
        v = s.get(key, 0.5)
        if not (key == "learning_rate" and callable(v)) and not ((x := _number(v)) is not None and ok(x)):
            raise MaskingError(f"settings[{label!r}][{key!r}]={v!r} is not {want}; e.g. {{'learning_rate': 1e-3}}")
    parts = [optax.scale_by_adam(b1=s.get("b1", 0.9), b2=s.get("b2", 0.999), eps=s.get("eps", 1e-8))]
    if s.get("weight_decay", 0.0):  # matrices only; a stacked leaf's layer axis does not count
        decay = lambda tree: map_paths(lambda p, x: x.ndim - (p in rows) >= 2, tree)  # noqa: E731
        parts.append(optax.add_decayed_weights(s["weight_decay"], mask=decay))
    parts.append(optax.scale_by_learning_rate(s["learning_rate"]))
    return _on_rows(optax.chain(*parts), rows) if rows else optax.chain(*parts)


def _order(label: str) -> tuple[int, str]:
    return (TRAINABLE_LABELS.index(label) if label in TRAINABLE_LABELS else len(TRAINABLE_LABELS), label)


def stratified_optimizer(labels: Any, settings: Mapping[str, Mapping[str, Any]]) -> optax.GradientTransformation:
    """optax.multi_transform of one AdamW per trainable label, matched to leaves by path.

    settings[label] holds learning_rate (float or optax schedule) and optionally weight_decay
    (default 0; applied to matrices only), b1, b2, eps. Frozen leaves carry no optimizer state:
    they are None in `masking.split(params, labels)[0]` and left out by `wrt=masking.trainable(labels)`
    in NNX. Pass params to `update` when using weight decay. Settings for a label no parameter carries
    are allowed (one dict for several methods) but checked like the others.
    """
    lookup = path_lookup(labels)
    present = sorted({str(label) for label in lookup.values() if label != FROZEN}, key=_order)
    if not present:
        raise MaskingError("labels mark every parameter frozen; nothing to optimize")
    if not isinstance(settings, Mapping):
        raise MaskingError(f"settings is a {type(settings).__name__}; pass a dict {{label: {{'learning_rate': ...}}}} "
                           f"for the labels present: {', '.join(present)}")
    missing = [label for label in present if label not in settings]
    if missing:
        raise MaskingError(f"no optimizer settings for label(s) {', '.join(map(repr, missing))}; "
                           f"add them to settings (labels present: {', '.join(present)})")
    for label in set(settings) - set(present):  # settings for labels this model lacks: checked, not used
        _adamw(str(label), settings[label], {})
    rows = {p: label for p, label in lookup.items() if isinstance(label, Rows)}
    transforms = {label: _adamw(label, settings[label], {p: r for p, r in rows.items() if r == label})
                  for label in present}

    def label_of(path: str, _: Any) -> str:
        if path not in lookup:
            raise MaskingError(f"the optimizer got a parameter {path!r} its labels do not have; build the "
                               "labels from the same model or tree that the optimizer updates")
        if lookup[path] == FROZEN:
            raise MaskingError(f"the optimizer got the frozen parameter {path!r}; give it the trainable half "
                               "(masking.split) or, in NNX, wrt=masking.trainable(labels)")
        return str(lookup[path])

    return optax.multi_transform(transforms, lambda tree: map_paths(label_of, tree))
