"""The trainability plan of a run, built once from the method config and the model.

`make_plan(method, num_layers)` resolves the strata (n1, n2) and the LoRA adapters the model
must be built with; `plan.label(params)` then labels that model's parameters and counts them.
The trainer, the benchmarks, the checkpoint fingerprint, the summary table and results.json
all read this one object; nothing else re-derives strata or LoRA placement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spafit_jax import masking
from spafit_jax.errors import MaskingError
from spafit_jax.methods import BIAS, FROZEN, LAYERNORM, LORA_METHODS, LoRAConfig
from spafit_jax.schema import MethodConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """What trains in one model: the method, its strata, its LoRA adapters, and (once labelled) the labels.

    `n1`/`n2` are layer counts for spafit and None for the other methods. `labels` is a tree of
    label strings shaped like the parameters and `counts` {label: parameters}, both None until
    `label` has run.
    """

    method: MethodConfig
    num_layers: int
    n1: int | None
    n2: int | None
    lora: LoRAConfig | None
    labels: Any = None
    counts: dict[str, int] | None = None

    def label(self, params: Any) -> "Plan":
        """This plan with the labels and counts of `params` (a model built with `self.lora`)."""
        m = self.method
        labels = masking.method_labels(params, m.name, n1=self.n1, n2=self.n2, train_pooler=m.train_pooler,
                                       stratum3_bias=m.stratum3_bias,
                                       train_layernorm=None if m.name == "full" else m.train_layernorm)
        return dataclasses.replace(self, labels=labels, counts=masking.count_params(params, labels))

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trainable, frozen) halves of `params` (see `masking.split`)."""
        return masking.split(params, self.labels)

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
        and percent, by label."""
        return {"method": self.method.name, "n1": self.n1, "n2": self.n2,
                "stratum3_bias": None if self.n1 is None else self.method.stratum3_bias,
                "bias_stand_in": self.bias_stand_in,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_percent": 100.0 * self.trainable_params / self.total_params,
                "params_by_label": dict(self.counts)}

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
    on layers n2..L-1 for spafit, none otherwise. Raises MaskingError when n1/n2 do not fit L."""
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
