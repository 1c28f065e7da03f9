"""Trainability plans for any Flax parameter pytree: labels, split/merge, a stratified optimizer.

A *plan* is a pytree of strings with the structure of the parameters: each leaf names the group
its parameter belongs to (the labels of `spafit_jax.methods`: frozen, weight, bias, layernorm, lora, head, pooler; or
any label of your own from `label_params`). Everything here works on plain dicts, FrozenDict,
`nnx.State` and Hugging Face Flax trees alike, through `jax.tree_util` key paths; the module
imports only the standard library, numpy, jax and optax.

Paths are '/'-joined key names, e.g. "bert/encoder/layer/7/attention/self/query/kernel"; the
trailing `.value` of an `nnx.Variable` (or a boxed `nn.Partitioned`) is dropped, so an NNX
parameter reads "layers/0/query/kernel". Layers must be unrolled (one subtree per layer, its
index in the path), not stacked by `nn.scan`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from spafit_jax.errors import MaskingError
from spafit_jax.methods import (BIAS, FROZEN, HEAD, LAYERNORM, LORA, METHODS, POOLER,  # noqa: F401
                                TRAINABLE_LABELS, WEIGHT, resolve_strata)

__all__ = [
    "MaskingError", "LAYER_PATTERN", "HEAD_PATTERN", "METHODS", "layer_index", "label_params", "resolve_strata",
    "spafit_labels", "method_labels", "split", "merge", "count_params", "summary",
    "stratified_optimizer",
]

#: layer/7, layers/7, layers_7, layer_7, h/7, block/7, blocks/7, blocks_7 (case-insensitive).
LAYER_PATTERN = r"(?i)(?:^|/)(?:layers?|h|blocks?)[/_](\d+)(?:/|$)"
#: task heads: BERT's / DistilBERT's classifier (and DistilBERT's pre_classifier), RoBERTa's and
#: ELECTRA's classifier/dense + classifier/out_proj, and the usual names of other libraries.
HEAD_PATTERN = r"(^|/)(classifier|pre_classifier|score|head|qa_outputs)(/|$)"
# A path component naming a normalisation module (its scale/bias are labelled "layernorm"):
# LayerNorm, layer_norm, ln, ln_1, ln_f, norm, norm1, final_layer_norm, input_layernorm,
# RMSNorm_0, BatchNorm_0, GroupNorm, ... (case-insensitive, whole words between '_');
# "normal" or "kernel" do not match.
_NORM_RE = re.compile(r"(?i)(^|_)(ln|norm|(layer|rms|batch|group)_?norm)(_|\d|$)")
_LORA_RE = re.compile(r"(?i)lora_[ab]")
_ORDER = TRAINABLE_LABELS
_ADAM_KEYS = ("learning_rate", "weight_decay", "b1", "b2", "eps")


# ----------------------------------------------------------------------------------- paths
def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keypath: Sequence[Any]) -> str:
    keys = list(keypath)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]  # nnx.Variable / nn.Partitioned box
    return "/".join(_key_str(k) for k in keys)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(_path(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _map(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(_path(kp), x), tree)


def _size(x: Any) -> int:
    return int(math.prod(getattr(x, "shape", np.shape(x))))


def _check_labels(params: Any, labels: Any) -> None:
    if jax.tree.structure(params) != jax.tree.structure(labels):
        raise MaskingError("labels do not have the structure of params; build them from this "
                           "very tree with label_params / spafit_labels / method_labels")


def layer_index(path: str, pattern: str | re.Pattern | None = None) -> int | None:
    """The layer number in a '/'-joined parameter path (first match of `pattern`'s group 1), or None."""
    m = re.search(pattern or LAYER_PATTERN, path)
    return int(m.group(1)) if m else None


def _kind(path: str) -> str:
    """What a leaf is: "lora", "layernorm", "bias" or "weight" (by its path component names)."""
    parts = path.split("/")
    if any(_LORA_RE.fullmatch(p) for p in parts):
        return LORA
    if any(_NORM_RE.search(p) for p in parts[:-1]):
        return LAYERNORM
    return BIAS if parts[-1] == "bias" else WEIGHT


# ----------------------------------------------------------------------------------- labels
def label_params(params: Any, rules: Sequence[tuple[str, str]] | Mapping[str, str]) -> Any:
    """Labels each leaf by ordered (regex, label) rules, `re.search` on its path; first match wins."""
    rules = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], str)):
            raise MaskingError(f"rule {i} is {rule!r}; each rule must be a (regex, label) pair of strings")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise MaskingError(f"rule {i} regex {rule[0]!r} is invalid ({e}); fix the pattern") from None
    uncovered: list[str] = []

    def one(path: str, _: Any) -> str:
        for rx, label in compiled:
            if rx.search(path):
                return label
        uncovered.append(path)
        return FROZEN

    labels = _map(one, params)
    if uncovered:
        shown = ", ".join(repr(p) for p in uncovered[:5]) + (" ..." if len(uncovered) > 5 else "")
        raise MaskingError(f"{len(uncovered)} parameter(s) match no rule: {shown}; add a rule for "
                           "them, e.g. ('.*', 'frozen') as the last rule")
    return labels


def _num_layers(params: Any, layer_pattern: str | None) -> int:
    paths = [p for p, _ in _leaves(params)]
    found = [i for p in paths if (i := layer_index(p, layer_pattern)) is not None]
    if not found:
        example = paths[0] if paths else "<empty>"
        raise MaskingError(f"no layer index found in any parameter path (e.g. {example!r}); unroll "
                           "the layers as layers/0, blocks_0, h/0 ... or pass layer_pattern= a "
                           r"regex whose group 1 is the index, e.g. r'enc_(\d+)/'")
    return max(found) + 1


def _plan(params: Any, in_layer: Callable[[int], frozenset], outside: frozenset, *,
          train_layernorm: bool, train_pooler: bool, head_pattern: str,
          layer_pattern: str | None) -> Any:
    """Labels leaves from the kinds allowed to train in layer i (`in_layer`) and outside layers."""
    try:
        head_re = re.compile(head_pattern)
    except re.error as e:
        raise MaskingError(f"head_pattern {head_pattern!r} is invalid ({e}); fix the regex") from None

    def one(path: str, _: Any) -> str:
        i = layer_index(path, layer_pattern)
        if i is None and head_re.search(path):
            return HEAD
        if i is None and "pooler" in path.lower():
            return POOLER if train_pooler else FROZEN
        kind = _kind(path)
        if kind == LAYERNORM and not train_layernorm:
            return FROZEN
        return kind if kind in (outside if i is None else in_layer(i)) else FROZEN

    labels = _map(one, params)
    if all(label == FROZEN for label in jax.tree.leaves(labels)):
        raise MaskingError(f"the plan trains no parameter: no leaf matches head_pattern="
                           f"{head_pattern!r} and no layer leaf is trainable; pass head_pattern= "
                           "naming your output module, or lower n1/n2")
    return labels


def _no_lora(where: str) -> MaskingError:
    return MaskingError(f"no lora_a/lora_b leaves in {where}; build the model with a LoRAConfig "
                        "(LoRA adapters on those layers), or use method 'bitfit'")


def bias_free(params: Any, head_pattern: str = HEAD_PATTERN) -> bool:
    """Whether the model has no bias outside its head and pooler (ModernBERT's default). Then the
    methods that train biases (spafit's strata 2 and 3, bitfit) train the layers' norm scales instead,
    labelled "layernorm": the per-feature parameters such a model has (`spafit_labels`)."""
    head = re.compile(head_pattern)
    return not any(_kind(p) == BIAS and not head.search(p) and "pooler" not in p.lower() for p, _ in _leaves(params))


def spafit_labels(params: Any, n1: int | float | None = None, n2: int | float | None = None, *,
                  train_layernorm: bool = False, train_pooler: bool = True, stratum3_bias: bool = True,
                  head_pattern: str = HEAD_PATTERN, layer_pattern: str | None = None) -> Any:
    """SPAFIT strata: layers < n1 frozen, n1..n2-1 biases only, >= n2 LoRA + biases; head trains.

    `stratum3_bias=False` is the paper's other group-3 variant: layers >= n2 train LoRA only.
    A model without biases (`bias_free`) trains its norm scales wherever biases would train.

    n1/n2 are int layer counts (0..L) or floats in [0, 1] as fractions of L (rounded half up);
    defaults round(L/3) and round(2L/3). Embeddings and final norms stay frozen; LayerNorm
    scale/bias of strata 2-3 train as "layernorm" only with `train_layernorm`; the pooler (any
    path containing "pooler") trains as "pooler" when `train_pooler`.
    """
    L = _num_layers(params, layer_pattern)
    n1, n2 = resolve_strata(L, n1, n2)
    lora_layers = {layer_index(p, layer_pattern) for p, _ in _leaves(params) if _kind(p) == LORA}
    if n2 < L and not any(i is not None and i >= n2 for i in lora_layers):
        raise _no_lora(f"stratum 3 (layers {n2}..{L - 1})")
    some = frozenset({BIAS, LAYERNORM})
    full = some | {LORA} if stratum3_bias else frozenset({LAYERNORM, LORA})
    if not train_layernorm and bias_free(params, head_pattern):  # ModernBERT: norm scales stand in for biases
        some, full, train_layernorm = frozenset({LAYERNORM}), full if stratum3_bias else frozenset({LORA}), True
    labels = _plan(params, lambda i: frozenset() if i < n1 else some if i < n2 else full,
                   frozenset(), train_layernorm=train_layernorm, train_pooler=train_pooler,
                   head_pattern=head_pattern, layer_pattern=layer_pattern)
    stratum2 = [l for p, l in _leaves(labels) if layer_index(p, layer_pattern) in range(n1, n2)]
    if stratum2 and all(l == FROZEN for l in stratum2):
        raise MaskingError(f"stratum 2 (layers {n1}..{n2 - 1}) has no bias or norm scale to train; set n1 = n2 "
                           "to drop it, or train_layernorm")
    return labels


def method_labels(params: Any, method: str, *, n1: int | float | None = None,
                  n2: int | float | None = None, train_layernorm: bool | None = None,
                  train_pooler: bool = True, stratum3_bias: bool = True, head_pattern: str = HEAD_PATTERN,
                  layer_pattern: str | None = None) -> Any:
    """Labels for one of METHODS: full, bitfit, lora, spafit, head_only (n1/n2 used by spafit only).

    full trains everything (embeddings too) as weight/bias/layernorm/lora/head/pooler; bitfit all
    layer biases + head (+ pooler); lora all lora leaves + head (+ pooler), biases frozen; spafit
    as `spafit_labels` (with `stratum3_bias`); head_only the head (+ pooler). `train_layernorm=None` means True for full,
    False otherwise.
    """
    if method not in METHODS:
        raise MaskingError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    ln = (method == "full") if train_layernorm is None else bool(train_layernorm)
    ln = ln or (method == "bitfit" and bias_free(params, head_pattern))  # norm scales stand in for biases
    kw = dict(train_layernorm=ln, train_pooler=train_pooler, head_pattern=head_pattern,
              layer_pattern=layer_pattern)
    if method == "spafit":
        return spafit_labels(params, n1, n2, stratum3_bias=stratum3_bias, **kw)
    if method in ("bitfit", "lora"):
        _num_layers(params, layer_pattern)
    if method == "lora" and not any(_kind(p) == LORA for p, _ in _leaves(params)):
        raise _no_lora("params")
    allowed = {"full": frozenset({WEIGHT, BIAS, LAYERNORM, LORA}), "bitfit": frozenset({BIAS, LAYERNORM}),
               "lora": frozenset({LORA, LAYERNORM}), "head_only": frozenset()}[method]
    return _plan(params, lambda i: allowed, allowed if method == "full" else frozenset(), **kw)


# ----------------------------------------------------------------------------------- split
def split(params: Any, labels: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like params, None where a leaf belongs to the other."""
    _check_labels(params, labels)
    trainable = jax.tree.map(lambda x, l: None if l == FROZEN else x, params, labels)
    frozen = jax.tree.map(lambda x, l: x if l == FROZEN else None, params, labels)
    return trainable, frozen


def merge(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`: each leaf from whichever half holds it."""
    try:
        return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                            is_leaf=lambda x: x is None)
    except ValueError:
        raise MaskingError("trainable and frozen trees differ in structure; pass the two halves "
                           "returned by split(params, labels)") from None


def count_params(params: Any, labels: Any) -> dict[str, int]:
    """{label: number of parameters} over the leaves of params."""
    _check_labels(params, labels)
    counts: dict[str, int] = {}
    for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[label] = counts.get(label, 0) + _size(x)
    return dict(sorted(counts.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(label: str) -> tuple[int, str]:
    return (_ORDER.index(label) if label in _ORDER else len(_ORDER) + (label == FROZEN), label)


def summary(params: Any, labels: Any) -> str:
    """A text table: label, tensors, parameters, percent of total; then trainable and total rows."""
    counts, tensors = count_params(params, labels), {}
    for label in jax.tree.leaves(labels):
        tensors[label] = tensors.get(label, 0) + 1
    total = sum(counts.values()) or 1
    n_tr = sum(v for k, v in counts.items() if k != FROZEN)
    t_tr = sum(v for k, v in tensors.items() if k != FROZEN)
    rows = [(k, tensors[k], v) for k, v in counts.items()]
    rows += [("trainable", t_tr, n_tr), ("total", sum(tensors.values()), sum(counts.values()))]
    lines = [f"{'label':<12}{'tensors':>9}{'parameters':>14}{'percent':>10}"]
    lines += [f"{k:<12}{t:>9}{n:>14,}{100 * n / total:>9.2f}%" for k, t, n in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- optimizer
def _decay_mask(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def _adamw(label: str, s: Any) -> optax.GradientTransformation:
    if not isinstance(s, Mapping) or "learning_rate" not in s:
        raise MaskingError(f"settings[{label!r}] must be a mapping with a learning_rate, got {s!r}")
    unknown = sorted(set(s) - set(_ADAM_KEYS))
    if unknown:
        raise MaskingError(f"settings[{label!r}] has unknown key(s) {unknown}; use {list(_ADAM_KEYS)}")
    parts = [optax.scale_by_adam(b1=s.get("b1", 0.9), b2=s.get("b2", 0.999), eps=s.get("eps", 1e-8))]
    if s.get("weight_decay", 0.0):
        parts.append(optax.add_decayed_weights(s["weight_decay"], mask=_decay_mask))
    parts.append(optax.scale_by_learning_rate(s["learning_rate"]))
    return optax.chain(*parts)


def stratified_optimizer(labels: Any, settings: Mapping[str, Mapping[str, Any]]) -> optax.GradientTransformation:
    """optax.multi_transform of one AdamW per trainable label, for `split(params, labels)[0]`.

    settings[label] holds learning_rate (float or optax schedule) and optionally weight_decay
    (default 0; applied to leaves with ndim >= 2 only), b1, b2, eps. Frozen leaves are None in
    the trainable tree, so they carry no optimizer state. Pass params to `update` when using
    weight decay.
    """
    present = sorted({l for l in jax.tree.leaves(labels) if l != FROZEN}, key=_sort_key)
    if not present:
        raise MaskingError("labels mark every parameter frozen; nothing to optimize")
    missing = [l for l in present if l not in settings]
    if missing:
        raise MaskingError(f"no optimizer settings for label(s) {', '.join(map(repr, missing))}; "
                           f"add them to settings (labels present: {', '.join(present)})")
    transforms = {label: _adamw(label, settings[label]) for label in present}
    return optax.multi_transform(transforms, jax.tree.map(lambda l: None if l == FROZEN else l, labels))
