"""What a run loads once: the model with the plan's adapters, its weights, the tokenised task.

`load_model(cfg, num_labels)` gives (model, params, labelled plan) of a config; the trainer
(`load_for_training`) and `run.load_run` both call it, so a reloaded run has the trainer's model.
`load_for_training` also refuses, before anything heavy is allocated, settings that do not fit the
model (data.max_length above its positions, LoRA ranks above its matrices, a head above its vocabulary).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from spafit_jax.data import pipeline as data
from spafit_jax.models import hf
from spafit_jax.config.files import Config
from spafit_jax.errors import ConfigError
from spafit_jax.training.plan import Plan, make_plan


@dataclasses.dataclass
class ModelAndTask:
    """Everything a training run loads once: the model and its parameters, the plan, the tokenised task."""

    model: Any
    params: Any
    plan: Plan
    task: data.TaskData
    tokenizer: Any


def load_model(cfg: Config, num_labels: int, folder: Path | None = None,
               plan: Plan | None = None) -> tuple[Any, Any, Plan]:
    """(model, params, labelled plan) of a config: the base weights with the method's LoRA adapters.

    `folder` and `plan` are resolved from the config when not given (the trainer plans before it
    reads the data, so bad strata fail early, and passes its plan here)."""
    folder = hf.resolve(cfg.model.name) if folder is None else folder
    plan = make_plan(cfg.method, hf.read_config(folder).num_hidden_layers) if plan is None else plan
    model, params = hf.load_pretrained(folder, num_labels=num_labels, dtype=jnp.dtype(cfg.model.dtype),
                                       param_dtype=jnp.dtype(cfg.model.param_dtype), seed=cfg.train.seed,
                                       lora=plan.lora)
    return model, params, plan.label(params)


def plan_of_shapes(cfg: Config) -> Plan:
    """The labelled plan of a config's model from its parameter shapes alone (no weights are read)."""
    model_cfg = hf.read_config(hf.resolve(cfg.model.name))
    plan = make_plan(cfg.method, model_cfg.num_hidden_layers)
    return plan.label(hf.init_params(hf.build_model(model_cfg, plan.lora, num_labels=2), shapes_only=True))


def check_max_length(cfg: Config, model_cfg, source: str = "") -> None:
    """Refuses data.max_length above the model's positions (`model_cfg.max_tokens`); `source` says where
    the model's size was read (a config.json), when it was read from one."""
    if cfg.data.max_length > model_cfg.max_tokens:
        where = f" (from max_position_embeddings in {source})" if source else ""
        raise ConfigError(f"data.max_length={cfg.data.max_length} is above the {model_cfg.max_tokens} positions of "
                          f"{cfg.model.name}{where}; use data.max_length={model_cfg.max_tokens} or less",
                          "data.max_length")


def load_for_training(cfg: Config) -> ModelAndTask:
    """Resolve the model, plan its trainability, load and tokenise the task, load the weights.

    Settings that do not fit the model (data.max_length above its positions) are refused first."""
    folder = hf.resolve(cfg.model.name)
    model_cfg = hf.read_config(folder)
    check_max_length(cfg, model_cfg, str(folder / "config.json"))
    plan = make_plan(cfg.method, model_cfg.num_hidden_layers)
    _check_sizes(cfg, plan, model_cfg, folder)
    tokenizer = hf.load_tokenizer(folder)
    task = data.load_task_data(cfg.data, tokenizer, seed=cfg.train.seed)
    _check_head(cfg, task.spec.num_labels, model_cfg)
    model, params, plan = load_model(cfg, task.spec.num_labels, folder, plan)
    return ModelAndTask(model, params, plan, task, tokenizer)


def _check_sizes(cfg: Config, plan: Plan, model_cfg, folder: Path) -> None:
    """Refuses LoRA ranks above the matrices they adapt (before anything is allocated): a rank above
    min(in, out) of every target adds nothing but memory, and an absurd one would not fit."""
    if plan.lora is None:
        return
    limit = min(model_cfg.hidden_size, model_cfg.intermediate_size)
    ranks = {"method.lora_rank": cfg.method.lora_rank,
             **{f"method.rank_pattern[{k!r}]": v for k, v in dict(cfg.method.rank_pattern).items()}}
    for field, rank in ranks.items():
        if rank > limit:
            raise ConfigError(f"{field}={rank} is above {limit}, the smaller side of the matrices of {cfg.model.name} "
                              f"(hidden_size {model_cfg.hidden_size}, intermediate_size {model_cfg.intermediate_size} "
                              f"in {folder / 'config.json'}); a LoRA rank is at most min(in, out): use {limit} or "
                              "less", "lora_rank")


def _check_head(cfg: Config, num_labels: int, model_cfg) -> None:
    """Refuses a classifier head larger than the model's whole embedding table (data.num_labels=10**9)."""
    if num_labels > model_cfg.vocab_size:
        raise ConfigError(f"{num_labels} classes (data.num_labels={cfg.data.num_labels}) would make a classifier head "
                          f"larger than the whole embedding table of {cfg.model.name} ({model_cfg.vocab_size} tokens); "
                          "check data.num_labels (null infers it from the train labels)", "num_labels")
