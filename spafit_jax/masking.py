"""Trainability labels for any Flax model: labels, split/join, filters, a stratified optimizer.

Labels are a pytree of strings with the structure of the parameters: each leaf names the group
its parameter belongs to (the labels of `spafit_jax.methods`: frozen, weight, bias, layernorm, lora,
head, pooler; or any label of your own from `label_params`). Everything here works on plain dicts,
FrozenDict, Hugging Face Flax trees, `nnx.State` and `nnx.Module` (its `nnx.Param` variables)
through `jax.tree_util` key paths; the module imports only the standard library, numpy, jax and optax.

Paths are '/'-joined key names, e.g. "bert/encoder/layer/7/attention/self/query/kernel"; the
trailing `.value` of an `nnx.Variable` (or a boxed `nn.Partitioned`) is dropped, so an NNX
parameter reads "layers/0/query/kernel". Layers are either unrolled (one subtree per layer, its
index in the path) or stacked by `nn.scan` / `nnx.scan` / `nnx.vmap` (one row per layer along an
axis of each leaf); a stacked leaf whose rows train in part is labelled with `Rows`, and the
optimizer keeps state only for those rows. See docs/masking.md.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from spafit_jax.errors import MaskingError
from spafit_jax.methods import (
    BIAS, FROZEN, HEAD, LAYER_LABELS, LAYERNORM, LORA, METHODS, POOLER, TRAINABLE_LABELS, WEIGHT, resolve_strata,
)
from spafit_jax.stratified import stratified_optimizer
from spafit_jax.tree_paths import (
    Rows, Trainable, map_paths, param_leaves, params_of, path_leaves, path_lookup, size_of, unbox,
)

__all__ = [
    "MaskingError", "LAYER_PATTERN", "HEAD_PATTERN", "STACKED_PATTERN", "METHODS", "Rows", "Trainable",
    "layer_index", "num_layers", "label_params", "resolve_strata", "spafit_labels", "method_labels",
    "trainable", "split", "join", "count_params", "summary", "stratified_optimizer",
]

#: layer/7, layers/7, layers_7, layer_7, h/7, block/7, blocks/7, blocks_7 (case-insensitive).
LAYER_PATTERN = r"(?i)(?:^|/)(?:layers?|h|blocks?)[/_](\d+)(?:/|$)"
#: task heads: BERT's / DistilBERT's classifier (and DistilBERT's pre_classifier), RoBERTa's and
#: ELECTRA's classifier/dense + classifier/out_proj, and the usual names of other libraries.
HEAD_PATTERN = r"(^|/)(classifier|pre_classifier|score|head|qa_outputs)(/|$)"
#: stacked (scanned) layers: a subtree named layer(s), block(s), h or Scan... (nn.scan's ScanBlock_0)
#: whose next key is not a layer number, e.g. "layers/attn/kernel" of shape (L, ...).
STACKED_PATTERN = r"(?i)(?:^|/)(?:layers?|blocks?|h|scan\w*)/(?!\d+(?:/|$))"
# A path component naming a normalisation module (its scale/bias are labelled "layernorm"):
# LayerNorm, layer_norm, ln, ln_1, ln_f, norm, norm1, norm_f, final_layer_norm, input_layernorm,
# RMSNorm_0, rms_norm, BatchNorm_0, batch_norm, bn, GroupNorm, gn, ... (case-insensitive, whole
# words between '_'); "normal", "kernel" or "bnorm" do not match.
_NORM_RE = re.compile(r"(?i)(^|_)(ln|bn|gn|norm|(layer|rms|batch|group)_?norm)(_|\d|$)")
_LORA_RE = re.compile(r"(?i)lora_[ab]")
_ORDER = TRAINABLE_LABELS


_EXAMPLES = {"layer_pattern": r"r'enc_(\d+)/'", "head_pattern": "'out_proj'"}


def _regex(name: str, value: Any) -> re.Pattern:
    """`value` compiled, or a one-line MaskingError naming argument `name` and a valid example."""
    fix = f"pass e.g. {name}={_EXAMPLES[name]}"
    if isinstance(value, re.Pattern):
        rx = value
    elif not isinstance(value, str):
        raise MaskingError(f"{name}={value!r} is not a regex string; {fix}")
    else:
        try:
            rx = re.compile(value)
        except re.error as e:
            raise MaskingError(f"{name}={value!r} is not a valid regex ({e}); {fix}") from None
    if name == "layer_pattern" and rx.groups < 1:
        raise MaskingError(f"layer_pattern={value!r} has no capture group for the layer index; pass a regex "
                           f"whose group 1 is the index, e.g. {name}={_EXAMPLES[name]}")
    return rx


def layer_index(path: str, pattern: str | re.Pattern | None = None) -> int | None:
    """The layer number in a '/'-joined parameter path (first match of `pattern`'s group 1), or None."""
    m = _regex("layer_pattern", pattern).search(path) if pattern else re.search(LAYER_PATTERN, path)
    if m is None:
        return None
    if m.group(1) is None or not m.group(1).isdigit():
        raise MaskingError(f"group 1 of layer_pattern={pattern!r} matched {m.group(1)!r} in {path!r}, not a layer "
                           f"number; pass a regex whose group 1 is the index, e.g. layer_pattern={_EXAMPLES['layer_pattern']}")
    return int(m.group(1))


def _kind(path: str) -> str:
    """What a leaf is: "lora", "layernorm", "bias" or "weight" (by its path component names)."""
    parts = path.split("/")
    if any(_LORA_RE.fullmatch(p) for p in parts):
        return LORA
    if any(_NORM_RE.search(p) for p in parts[:-1]):
        return LAYERNORM
    return BIAS if parts[-1] == "bias" else WEIGHT


# ----------------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the layers are: unrolled (`pattern` finds the index) or stacked (`stacked` finds the leaves)."""

    num_layers: int
    pattern: str | None = None
    stacked: re.Pattern | None = None
    axis: int = 0

    def index(self, path: str) -> int | None:
        return None if self.stacked else layer_index(path, self.pattern)

    def is_stacked(self, path: str) -> bool:
        return self.stacked is not None and self.stacked.search(path) is not None


def _stacked_arg(stacked: str | tuple[str, int]) -> tuple[re.Pattern, int | None]:
    """(regex, axis) of a `stacked=` argument; axis None when only the regex was given."""
    regex, axis = (stacked, None) if isinstance(stacked, str) else tuple(stacked) if \
        isinstance(stacked, (tuple, list)) and len(stacked) == 2 else (None, None)
    if not isinstance(regex, str) or (not isinstance(stacked, str) and (
            isinstance(axis, bool) or not isinstance(axis, numbers.Integral))):
        raise MaskingError(f"stacked={stacked!r} is not a regex or a (regex, axis) pair; pass e.g. "
                           "stacked='layers' or stacked=('decoder/layers', 1)")
    try:
        return re.compile(regex), None if axis is None else int(axis)
    except re.error as e:
        raise MaskingError(f"stacked regex {regex!r} is invalid ({e}); fix the pattern") from None


def _uniform_axes(shapes: list[tuple]) -> dict[int, int]:
    """{axis: size} of the axes along which every shape has one size: 0, 1, ... (axes every shape has),
    then -1 when it is never axis 0 (every shape has two axes or more)."""
    out, least = {}, min(len(s) for s in shapes)
    for k in [*range(least), *([-1] if least >= 2 else [])]:
        sizes = {s[k] for s in shapes}
        if len(sizes) == 1 and not (k == -1 and all(len(s) == least for s in shapes) and least - 1 in out):
            out[k] = sizes.pop()
    return out


def _stacked_layout(leaves: list[tuple[str, Any]], rx: re.Pattern, axis: int | None, named: bool) -> _Layout | None:
    """The stacked layers under `rx`, along `axis` (None: axis 0, refused when another axis fits as well)."""
    hits = [(p, np.shape(x)) for p, x in leaves if rx.search(p)]
    if not hits:
        return None
    where = rx.pattern if named else hits[0][0][:rx.search(hits[0][0]).end()]  # e.g. "layers/"
    fits = _uniform_axes([s for _, s in hits])
    if axis is None and 0 in fits and len(fits) > 1:
        other = next(k for k in fits if k)
        raise MaskingError(f"stacked layers under {where!r} could run along axis 0 ({fits[0]} layers) or axis "
                           f"{other} ({fits[other]} layers): every leaf has one size along both; name the layer axis, "
                           f"stacked=({where!r}, 0) or stacked=({where!r}, {other})")
    axis = 0 if axis is None else axis
    sizes: dict[Any, tuple[str, tuple]] = {}
    for p, s in hits:
        sizes.setdefault(s[axis] if -len(s) <= axis < len(s) else None, (p, s))
    if len(sizes) != 1 or None in sizes:
        seen = ", ".join(f"{p} {s}" for p, s in sizes.values())
        how = "" if named else "pass stacked=(regex, axis) naming the stacked subtree and its layer axis, or "
        hint = "".join(f"; axis {k} has one size ({n}) in every leaf: pass stacked=({where!r}, {k})"
                       for k, n in [kv for kv in fits.items() if kv[0] != axis][:1])
        raise MaskingError(f"stacked layers need one size along axis {axis} in every leaf under {where!r}, "
                           f"but saw {seen}{hint}; or {how}unroll the layers as layers/0, layers/1 ...")
    return _Layout(next(iter(sizes)), stacked=rx, axis=axis)


def _layout(params: Any, layer_pattern: str | None, stacked: Any, required: bool = True) -> _Layout:
    """The layers of `params`: `stacked=` if given, else unrolled indices, else a detected stacked subtree."""
    leaves = param_leaves(params)
    if layer_pattern is not None:
        _regex("layer_pattern", layer_pattern)
    if stacked is not None:
        rx, axis = _stacked_arg(stacked)
        found = _stacked_layout(leaves, rx, axis, named=True)
        if found is None:
            raise MaskingError(f"stacked={stacked!r} matches no parameter path (they read like "
                               f"{leaves[0][0] if leaves else '<empty>'!r}); pass a regex of the stacked subtree")
        return found
    indices = [i for p, _ in leaves if (i := layer_index(p, layer_pattern)) is not None]
    if indices:
        return _Layout(max(indices) + 1, pattern=layer_pattern)
    found = None if layer_pattern else _stacked_layout(leaves, re.compile(STACKED_PATTERN), None, named=False)
    if found is not None or not required:
        return found or _Layout(0, pattern=layer_pattern)
    example = max((p for p, _ in leaves), key=lambda p: p.count("/"), default="<empty>")
    raise MaskingError(f"no layers found: no layer index in any parameter path (e.g. {example!r}) and no "
                       "stacked subtree named layers/blocks/h/Scan...; unroll the layers as layers/0, "
                       r"blocks_0 ..., pass layer_pattern= a regex whose group 1 is the index (e.g. r'enc_(\d+)/') "
                       "or stacked= the regex of scanned layers, e.g. stacked=('encoder', 0)")


def num_layers(params: Any, *, layer_pattern: str | None = None, stacked: str | tuple[str, int] | None = None) -> int:
    """The number of layers of `params` (unrolled indices, or the rows of stacked layers).

    Stacked layers run along axis 0 unless `stacked=(regex, axis)` says otherwise; when another axis
    fits every stacked leaf as well, the layout is ambiguous and refused, naming `stacked=`.

    Use it to resolve fractions first: `n1, n2 = resolve_strata(num_layers(params), 0.25, 0.5)`.
    """
    return _layout(params, layer_pattern, stacked).num_layers


# ----------------------------------------------------------------------------------- labels
def label_params(params: Any, rules: Sequence[tuple[str, str]] | Mapping[str, str]) -> Any:
    """Labels each leaf by ordered (regex, label) rules, `re.search` on its path; first match wins."""
    param_leaves(params)
    rules = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], (str, re.Pattern))
                and isinstance(rule[1], str)):
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

    state = params_of(params)
    labels = map_paths(one, state)
    if uncovered:
        shown = ", ".join(repr(p) for p in uncovered[:5]) + (" ..." if len(uncovered) > 5 else "")
        raise MaskingError(f"{len(uncovered)} parameter(s) match no rule: {shown}; add a rule for "
                           "them, e.g. ('.*', 'frozen') as the last rule")
    return unbox(labels) if state is not params else labels


def _label_tree(params: Any, in_layer: Callable[[int], frozenset], outside: frozenset, layout: _Layout, *,
          train_layernorm: bool, train_pooler: bool, head_pattern: str, needs_head: bool) -> Any:
    """Labels leaves from the kinds allowed to train in layer i (`in_layer`) and outside layers."""
    head_re = _regex("head_pattern", head_pattern)
    state = params_of(params)

    def one(path: str, _: Any) -> str:
        kind = _kind(path)
        if layout.is_stacked(path):
            rows = [r for r in range(layout.num_layers) if kind in in_layer(r)]
            if not rows or (kind == LAYERNORM and not train_layernorm):
                return FROZEN
            return Rows(kind, rows[0], rows[-1] + 1, layout.axis)  # strata are contiguous
        i = layout.index(path)
        if i is None and head_re.search(path):
            return HEAD
        if i is None and "pooler" in path.lower():
            return POOLER if train_pooler else FROZEN
        if kind == LAYERNORM and not train_layernorm:
            return FROZEN
        return kind if kind in (outside if i is None else in_layer(i)) else FROZEN

    labels = map_paths(one, state)
    found = {str(label) for _, label in path_leaves(labels)}
    if needs_head and HEAD not in found:
        example = next((p for p, _ in path_leaves(state) if layout.index(p) is None and not layout.is_stacked(p)), "<none>")
        raise MaskingError(f"no task head found: no parameter path matches head_pattern={head_pattern!r} "
                           f"(outside the layers they read like {example!r}); pass head_pattern= a regex "
                           "naming your output module, e.g. head_pattern='out_proj'")
    if found <= {FROZEN}:
        raise MaskingError("the labels train no parameter: no layer leaf is trainable; lower n1/n2 or "
                           "pick another method")
    return unbox(labels) if state is not params else labels


def _no_lora(where: str) -> MaskingError:
    return MaskingError(f"no lora_a/lora_b leaves in {where}; build the model with LoRA adapters "
                        "(spafit_jax.lora.LoRA, nnx.LoRA) on those layers, or use method 'bitfit'")


def bias_free(params: Any, head_pattern: str = HEAD_PATTERN) -> bool:
    """Whether the model has no bias outside its head and pooler (ModernBERT's default). Then the
    methods that train biases (spafit's strata 2 and 3, bitfit) train the layers' norm scales instead,
    labelled "layernorm": the per-feature parameters such a model has (`spafit_labels`)."""
    head = _regex("head_pattern", head_pattern)
    return not any(_kind(p) == BIAS and not head.search(p) and "pooler" not in p.lower()
                   for p, _ in path_leaves(params_of(params)))


def _flags(**flags: Any) -> None:
    """Refuses a flag that is not True or False (None allowed where it means "the method's default")."""
    for name, value in flags.items():
        if not isinstance(value, bool) and not (value is None and name == "train_layernorm"):
            raise MaskingError(f"{name}={value!r} is not True or False; pass {name}=True or {name}=False")


def _strata(n1: Any, n2: Any, L: int) -> None:
    for name, value in (("n1", n1), ("n2", n2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise MaskingError(f"{name}={value!r} is not a whole layer count; pass an int 0..{L}, or turn "
                               "a fraction or None into counts with resolve_strata(num_layers(params), n1, n2)")
        if value < 0:
            raise MaskingError(f"{name}={value!r} is negative; pass a layer count 0..{L}")
        if value > L:
            raise MaskingError(f"{name}={value!r} exceeds the {L} layers of this model; pass a layer count 0..{L}")
    if n1 > n2:
        raise MaskingError(f"n1={n1} > n2={n2}; need 0 <= n1 <= n2 <= L={L} (stratum 1 comes first)")


def spafit_labels(params: Any, n1: int, n2: int, *, train_layernorm: bool = False, train_pooler: bool = True,
                  stratum3_bias: bool = True, head_pattern: str = HEAD_PATTERN, layer_pattern: str | None = None,
                  stacked: str | tuple[str, int] | None = None) -> Any:
    """SPAFIT strata: layers < n1 frozen, n1..n2-1 biases only, >= n2 LoRA + biases; head trains.

    n1/n2 are int layer counts 0 <= n1 <= n2 <= L (`resolve_strata` turns fractions and None into
    counts). `stratum3_bias=False` is the paper's other group-3 variant: layers >= n2 train LoRA
    only. Embeddings and final norms stay frozen; norm scale/bias of strata 2-3 train as
    "layernorm" only with `train_layernorm`; the pooler (any path containing "pooler") trains as
    "pooler" when `train_pooler`. Stacked layers (`stacked=` a regex or (regex, axis), else detected)
    get `Rows` labels. A model with no leaf matching `head_pattern` is an error. A model without
    biases (`bias_free`) trains its norm scales wherever biases would train.
    """
    _flags(train_layernorm=train_layernorm, train_pooler=train_pooler, stratum3_bias=stratum3_bias)
    layout = _layout(params, layer_pattern, stacked)
    L = layout.num_layers
    _strata(n1, n2, L)
    lora = [p for p, _ in path_leaves(params) if _kind(p) == LORA]
    if n2 < L and not any(layout.is_stacked(p) or (layout.index(p) is not None and layout.index(p) >= n2) for p in lora):
        raise _no_lora(f"stratum 3 (layers {n2}..{L - 1})")
    some = frozenset({BIAS, LAYERNORM})
    full = some | {LORA} if stratum3_bias else frozenset({LAYERNORM, LORA})
    if not train_layernorm and bias_free(params, head_pattern):  # ModernBERT: norm scales stand in for biases
        some, full, train_layernorm = frozenset({LAYERNORM}), full if stratum3_bias else frozenset({LORA}), True
    labels = _label_tree(params, lambda i: frozenset() if i < n1 else some if i < n2 else full, frozenset(), layout,
                   train_layernorm=train_layernorm, train_pooler=train_pooler, head_pattern=head_pattern,
                   needs_head=True)
    trains2 = any(l != FROZEN and (layout.index(p) in range(n1, n2) or isinstance(l, Rows) and l.start < n2)
                  for p, l in path_leaves(labels))  # stacked: a Rows label starting before n2
    if n1 < n2 and not trains2:
        raise MaskingError(f"stratum 2 (layers {n1}..{n2 - 1}) has no bias or norm scale to train; set n1 = n2 "
                           "to drop it, or train_layernorm=True where the layers have norms")
    return labels


def method_labels(params: Any, method: str, *, n1: int | None = None, n2: int | None = None,
                  train_layernorm: bool | None = None, train_pooler: bool = True, stratum3_bias: bool = True,
                  head_pattern: str = HEAD_PATTERN, layer_pattern: str | None = None,
                  stacked: str | tuple[str, int] | None = None) -> Any:
    """Labels for one of METHODS: full, bitfit, lora, spafit, head_only (int n1/n2 used by spafit only).

    full trains everything (embeddings too) as weight/bias/layernorm/lora/head/pooler; bitfit all
    layer biases + head (+ pooler); lora all lora leaves + head (+ pooler), biases frozen; spafit
    as `spafit_labels` (with `stratum3_bias`); head_only the head (+ pooler). `train_layernorm=None`
    means True for full, False otherwise. Every method but full needs a head (`head_pattern`).
    """
    if method not in METHODS:
        raise MaskingError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    _flags(train_layernorm=train_layernorm, train_pooler=train_pooler, stratum3_bias=stratum3_bias)
    ln = (method == "full") if train_layernorm is None else bool(train_layernorm)
    ln = ln or (method == "bitfit" and bias_free(params, head_pattern))  # norm scales stand in for biases
    kw = dict(train_layernorm=ln, train_pooler=train_pooler, head_pattern=head_pattern)
    if method == "spafit":
        return spafit_labels(params, n1, n2, stratum3_bias=stratum3_bias, layer_pattern=layer_pattern,
                             stacked=stacked, **kw)
    layout = _layout(params, layer_pattern, stacked, required=method in ("bitfit", "lora"))
    if method == "lora" and not any(_kind(p) == LORA for p, _ in path_leaves(params)):
        raise _no_lora("params")
    allowed = LAYER_LABELS[method]
    labels = _label_tree(params, lambda i: allowed, allowed if method == "full" else frozenset(), layout,
                         needs_head=method != "full", **kw)
    in_layers = [l for p, l in path_leaves(labels) if layout.index(p) is not None or layout.is_stacked(p)]
    if method in ("bitfit", "lora") and all(l == FROZEN for l in in_layers):  # not quietly head-only
        what = "a bias or norm scale" if method == "bitfit" else "lora_a/lora_b leaves"
        raise MaskingError(f"{method}: no layer has {what} to train, so only the head would; pick another method "
                           "(full, or lora with adapters), or name what trains with label_params")
    return labels


# ----------------------------------------------------------------------------------- use
def trainable(labels: Any) -> Trainable:
    """The filter of the leaves `labels` does not mark frozen: `nnx.Optimizer(..., wrt=trainable(labels))`,
    `nnx.DiffState(0, trainable(labels))`, or `trainable(labels)(path, leaf)` on a linen tree."""
    return Trainable(frozenset(p for p, label in path_lookup(labels).items() if label != FROZEN))


def split(params: Any, labels: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like params, None where a leaf belongs to the other.

    A stacked leaf with `Rows` goes whole to the trainable half; the optimizer leaves its frozen rows alone.
    """
    lookup = path_lookup(labels, params)
    params = params_of(params)
    trainable = map_paths(lambda p, x: None if lookup[p] == FROZEN else x, params)
    frozen = map_paths(lambda p, x: x if lookup[p] == FROZEN else None, params)
    return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`: each leaf from whichever half holds it."""
    try:
        joined = jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)
    except ValueError:
        raise MaskingError("trainable and frozen trees differ in structure; pass the two halves "
                           "returned by split(params, labels)") from None
    if any(isinstance(x, str) for x in jax.tree.leaves(joined)):
        raise MaskingError("join got a tree of labels (strings); pass the two halves returned by split(params, labels)")
    return joined


def count_params(params: Any, labels: Any) -> dict[str, int]:
    """{label: number of parameters} over the leaves of params (the frozen rows of a `Rows` leaf count as frozen)."""
    lookup = path_lookup(labels, params)
    counts: dict[str, int] = {}
    for path, x in path_leaves(params):
        label, n = lookup[path], size_of(x)
        if isinstance(label, Rows):
            k = n * (label.stop - label.start) // np.shape(x)[label.axis]
            counts[FROZEN] = counts.get(FROZEN, 0) + n - k
            n = k
        counts[str(label)] = counts.get(str(label), 0) + n
    return dict(sorted(counts.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(label: str) -> tuple[int, str]:
    return (_ORDER.index(label) if label in _ORDER else len(_ORDER) + (label == FROZEN), label)


def summary(params: Any, labels: Any) -> str:
    """A text table: every label present, its tensors, parameters and percent; then trainable and total."""
    counts, tensors = count_params(params, labels), {}
    for _, label in path_leaves(labels):
        tensors[str(label)] = tensors.get(str(label), 0) + 1
    total = sum(counts.values()) or 1
    n_tr = sum(v for k, v in counts.items() if k != FROZEN)
    t_tr = sum(v for k, v in tensors.items() if k != FROZEN)
    rows = [(k, tensors.get(k, 0), v) for k, v in counts.items()]
    rows += [("trainable", t_tr, n_tr), ("total", sum(tensors.values()), sum(counts.values()))]
    lines = [f"{'label':<12}{'tensors':>9}{'parameters':>14}{'percent':>10}"]
    lines += [f"{k:<12}{t:>9}{n:>14,}{100 * n / total:>9.2f}%" for k, t, n in rows]
    return "\n".join(lines)

