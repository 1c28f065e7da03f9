"""The trainability plan of a run, built once from the method config and the model: the one owner of strata.

`make_plan(method, num_layers)` resolves the strata (n1, n2) and the LoRA adapters the model
must be built with; `plan.label(params)` then labels that model's parameters and counts them.
Everything that asks what trains asks the plan: the optimizer (`trainable_labels`), the
frozen-stratum cache (`frozen_depth`), the checkpoint fingerprint (`labels`), the report's strata
picture (`layer_kinds`), the summary table and results.json (`describe`). Nothing else resolves
n1/n2 or reads a label tree to find layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from spafit_jax import masking
from spafit_jax.errors import MaskingError
from spafit_jax.methods import BIAS, FROZEN, LAYERNORM, LORA, LORA_METHODS, TRAINABLE_LABELS, WEIGHT, LoRAConfig
from spafit_jax.config.schema import MethodConfig

#: what a layer trains, as the report's strata picture names it (`Plan.layer_kinds`).
LAYER_KINDS = (FROZEN, "bias only", "LoRA", "LoRA + bias", "all weights", "norm scale only", "LoRA + norm scale")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What trains in one model: the method, its strata, its LoRA adapters, and (once labelled) the labels.

    `n1`/`n2` are layer counts for spafit and None for the other methods. `labels` is a tree of
    label strings shaped like the parameters, `counts` {label: parameters}, `layers` the set of
    trainable labels of each encoder layer and `embeddings_train` whether any embedding leaf
    trains; all four are None until `label` has run.
    """

    method: MethodConfig
    num_layers: int
    n1: int | None
    n2: int | None
    lora: LoRAConfig | None
    labels: Any = None
    counts: dict[str, int] | None = None
    layers: tuple[frozenset[str], ...] | None = None
    embeddings_train: bool | None = None

    def label(self, params: Any) -> "Plan":
        """This plan with the labels, counts and per-layer labels of `params` (a model built with `self.lora`)."""
        m = self.method
        labels = masking.method_labels(params, m.name, n1=self.n1, n2=self.n2, train_pooler=m.train_pooler,
                                       stratum3_bias=m.stratum3_bias,
                                       train_layernorm=None if m.name == "full" else m.train_layernorm)
        layers: list[set[str]] = [set() for _ in range(self.num_layers)]
        embeddings_train = False
        for keypath, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
            path = jax.tree_util.keystr(keypath, simple=True, separator="/")
            i = masking.layer_index(path)
            if label != FROZEN and i is not None and i < self.num_layers:
                layers[i].add(label)
            embeddings_train |= label != FROZEN and i is None and "embeddings" in path
        return dataclasses.replace(self, labels=labels, counts=masking.count_params(params, labels),
                                   layers=tuple(frozenset(s) for s in layers), embeddings_train=embeddings_train)

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trainable, frozen) halves of `params` (see `masking.split`)."""
        return masking.split(params, self.labels)

    @property
    def trainable_labels(self) -> tuple[str, ...]:
        """The labels of the leaves that train, in display order (one optimizer group each)."""
        present = {label for label in jax.tree_util.tree_leaves(self.labels) if label != FROZEN}
        return tuple(sorted(present, key=lambda l: (TRAINABLE_LABELS.index(l) if l in TRAINABLE_LABELS
                                                    else len(TRAINABLE_LABELS), l)))

    @property
    def frozen_depth(self) -> int:
        """How many leading layers are frozen together with the embeddings (0 when an embedding trains):
        what the frozen-stratum cache can compute once."""
        if self.embeddings_train:
            return 0
        n = 0
        while n < self.num_layers and not self.layers[n]:
            n += 1
        return n

    def layer_kinds(self) -> list[str]:
        """What each encoder layer trains, one of LAYER_KINDS per layer (the report's strata picture)."""
        small = LAYERNORM if self.bias_stand_in else BIAS  # a model without biases trains its norm scales

        def kind(s: frozenset[str]) -> str:
            if WEIGHT in s:
                return "all weights"
            if LORA in s:
                return ("LoRA + bias" if BIAS in s else "LoRA + norm scale" if small in s else "LoRA")
            return ("norm scale only" if small == LAYERNORM else "bias only") if s else FROZEN
        return [kind(s) for s in self.layers]

    @property
    def trainable_params(self) -> int:
        return sum(n for label, n in self.counts.items() if label != FROZEN)

    @property
    def total_params(self) -> int:
        return sum(self.counts.values())

    @property
    def bias_stand_in(self) -> str | None:
        """"layernorm" when the model has no biases and the norm scales train in their place
        (`masking.bias_free`: spafit's strata 2-3, bitfit), else None."""
        m = self.method
        swapped = m.name in ("spafit", "bitfit") and not m.train_layernorm and BIAS not in self.counts
        return LAYERNORM if swapped and LAYERNORM in self.counts else None

    def describe(self) -> dict[str, Any]:
        """The plan's fields of results.json: method, n1, n2, stratum3_bias (spafit), trainable/total params
        and percent, by label, and each layer's kind."""
        return {"method": self.method.name, "n1": self.n1, "n2": self.n2,
                "stratum3_bias": None if self.n1 is None else self.method.stratum3_bias,
                "bias_stand_in": self.bias_stand_in,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_percent": 100.0 * self.trainable_params / self.total_params,
                "params_by_label": dict(self.counts), "layer_kinds": self.layer_kinds()}

    def summary(self, params: Any) -> str:
        """The label table of `params`, then the strata in words (spafit)."""
        lines = [masking.summary(params, self.labels)]
        if self.n1 is not None:
            bias = "norm scale" if self.bias_stand_in else "bias"  # a model without biases (ModernBERT)
            lines += ["", f"strata: frozen layers 0..{self.n1 - 1}, {bias}-only {self.n1}..{self.n2 - 1}, "
                          f"LoRA{f' + {bias}' if self.method.stratum3_bias else ' only'} {self.n2}..{self.num_layers - 1}"]
            if self.bias_stand_in:
                lines.append("(the model has no biases: its norm scales train in their place)")
        return "\n".join(lines)


def make_plan(method: MethodConfig, num_layers: int) -> Plan:
    """Strata and LoRA placement for a model of `num_layers` layers: LoRA on every layer for lora,
    on layers n2..L-1 for spafit, none otherwise. Raises MaskingError when n1/n2 do not fit L.

    The one place n1/n2 are resolved (fractions and None to layer counts); everything after
    passes the plan's integers on."""
    n1 = n2 = None
    if method.name == "spafit":
        try:
            n1, n2 = masking.resolve_strata(num_layers, method.n1, method.n2)
        except MaskingError as e:  # "n1=9 exceeds the 6 layers ..." names the config field
            raise MaskingError(f"method.{e}") from None
    lora = None
    if method.name in LORA_METHODS:
        lora = method.lora(None if n2 is None else range(n2, num_layers))
    return Plan(method, num_layers, n1, n2, lora)
