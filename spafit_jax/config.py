"""Typed run configuration: dataclasses, YAML files merged in order, dotted overrides, the CLI parser.

A run is described by one `Config` with seven sections (model, data, method, train, checkpoint,
parallel, distributed). The dataclass defaults are the offline demo (MiniLM on BBC News with
SPAFIT). `load_config` reads YAML files in order (later files win, key by key within a section),
then applies `section.key=value` overrides, then checks every type and value, so a bad config
fails with a one-line `ConfigError` before anything heavy is imported or loaded.

Stdlib and PyYAML only: importing this module never imports jax, flax or transformers.
Sequences are stored as tuples (the dataclasses are frozen); mappings as plain dicts.
"""

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from spafit_jax.errors import ConfigError

__all__ = [
    "Config", "ModelConfig", "DataConfig", "MethodConfig", "TrainConfig", "CheckpointConfig",
    "ParallelConfig", "DistributedConfig", "SECTIONS", "METHODS", "TASKS", "GLUE_TASKS", "DTYPES",
    "PADDINGS", "PARALLEL_MODES", "TRAINABLE_LABELS", "load_config", "config_from_dict", "to_dict",
    "save_config", "build_parser", "parse_args", "format_fields",
]

METHODS = ("full", "bitfit", "lora", "spafit", "head_only")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
TASKS = GLUE_TASKS + ("bbc_news", "local")
DTYPES = ("float32", "bfloat16")
PADDINGS = ("bucket", "max_length")
PARALLEL_MODES = ("mesh", "pmap")
TRAINABLE_LABELS = ("weight", "bias", "layernorm", "lora", "head", "pooler")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def _field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by --help)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The pre-trained encoder and its numerics."""

    name: str = _field("minilm", "alias (minilm), local folder or hub id (e.g. bert-large-cased)")
    dtype: str = _field("float32", "compute dtype: float32 | bfloat16")
    param_dtype: str = _field("float32", "parameter dtype: float32 | bfloat16")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task, its files and how text becomes batches."""

    task: str = _field("bbc_news", "GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli) | bbc_news | local")
    train_file: str | None = _field(None, "local task: csv/tsv/json/jsonl/parquet training file")
    eval_file: str | None = _field(None, "local task: evaluation file")
    text_column: str = _field("text", "local task: column holding the text")
    text_pair_column: str | None = _field(None, "local task: column holding the second text of a pair")
    label_column: str = _field("label", "local task: column holding the label")
    num_labels: int | None = _field(None, "local task: number of classes (null = infer from the data)")
    is_regression: bool = _field(False, "local task: float labels, one output, MSE loss")
    max_length: int = _field(128, "maximum tokens per example (longer ones are truncated)")
    padding: str = _field("bucket", "bucket (pad to the smallest bucket that fits) | max_length")
    buckets: tuple[int, ...] | None = _field(None, "bucket lengths (null = max_length/4, /2, /1)")
    limit_train: int | None = _field(None, "use at most this many training examples")
    limit_eval: int | None = _field(None, "use at most this many examples per evaluation split")
    eval_splits: tuple[str, ...] | None = _field(None, "evaluation splits (null = the task's default)")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What trains: full | bitfit | lora | spafit | head_only, and the LoRA adapters."""

    name: str = _field("spafit", "full | bitfit | lora | spafit | head_only")
    n1: int | float | None = _field(
        None, "spafit: layers below N1 frozen (int = layers, float = fraction of L; null = L/3)"
    )
    n2: int | float | None = _field(None, "spafit: layers N1..N2-1 bias only, N2.. LoRA + bias (null = 2L/3)")
    lora_rank: int = _field(8, "LoRA rank r")
    lora_alpha: float = _field(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _field(0.0, "dropout on the LoRA input, in [0, 1)")
    lora_targets: tuple[str, ...] = _field(("query", "value"), "matrices that get LoRA, e.g. [query, key, value]")
    rslora: bool = _field(False, "rank-stabilised LoRA (scale = alpha / sqrt(r))")
    rank_pattern: dict[str, int] = _field(help="per-path LoRA rank: {regex: rank}", factory=dict)
    train_pooler: bool = _field(True, "train the pooler with the head")
    train_layernorm: bool = _field(False, "train LayerNorm scales and biases in the trained layers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and evaluation cadence."""

    seed: int = _field(0, "seed for init, dropout and shuffling")
    batch_size: int = _field(32, "training examples per optimizer step")
    eval_batch_size: int = _field(64, "examples per evaluation batch")
    epochs: float = _field(1.0, "passes over the training data (fractions allowed)")
    max_steps: int | None = _field(None, "stop after this many optimizer steps (caps epochs)")
    lr: float = _field(3e-3, "peak learning rate (warmup, then linear decay to 0)")
    lr_by_label: dict[str, float] = _field(help="per-label learning rate, e.g. {head: 1e-3}", factory=dict)
    warmup_ratio: float = _field(0.06, "fraction of steps spent in linear warmup, in [0, 1]")
    weight_decay: float = _field(0.01, "AdamW weight decay (matrices only, never biases/LayerNorm)")
    max_grad_norm: float | None = _field(1.0, "clip gradients to this global norm (null = no clipping)")
    grad_accum: int = _field(1, "micro-batches accumulated per optimizer step")
    log_every: int = _field(10, "log training metrics every N steps")
    eval_every: int = _field(0, "evaluate every N steps (0 = only at the end)")
    best_metric: str | None = _field(None, "metric that picks the best checkpoint (null = the task's main metric)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in <workdir>/checkpoints."""

    every: int = _field(0, "save every N steps (0 = only at the end and on SIGTERM)")
    keep: int = _field(2, "keep the last N checkpoints")
    keep_best: bool = _field(True, "also keep the checkpoint with the best eval metric")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the step runs over the local devices."""

    mode: str = _field("mesh", "mesh (jit + NamedSharding) | pmap")
    fsdp: int = _field(1, "mesh mode: devices the parameters are sharded over (1 = pure data parallel)")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runs (jax.distributed.initialize)."""

    enabled: bool = _field(False, "call jax.distributed.initialize() (TPU pods fill in the rest)")
    coordinator_address: str | None = _field(None, "host:port of process 0 (null = auto-detect)")
    num_processes: int | None = _field(None, "number of processes (null = auto-detect)")
    process_id: int | None = _field(None, "this process's index (null = auto-detect)")
    initialization_timeout: int = _field(300, "seconds to wait for the other processes")
    heartbeat_timeout: int = _field(
        100, "seconds without heartbeats after which a process counts as dead and the others exit with an error"
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. `Config()` is the offline demo: MiniLM, bbc_news, SPAFIT, 1 epoch."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


# ----------------------------------------------------------------------------------------------
# YAML reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(
                f"{node.start_mark.name}:{line}: duplicate key '{key}'; keep only one of them"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _missing_file_message(path: str) -> str:
    msg = f"config file '{path}' not found (working directory {os.getcwd()})"
    p = Path(path)
    for guess in (CONFIGS_DIR.parent / p, CONFIGS_DIR / p):
        if not p.is_absolute() and guess.is_file():
            return f"{msg}; did you mean --config {guess}?"
    folder = p.parent if p.parent.is_dir() else None
    if folder is None and not p.is_absolute() and (CONFIGS_DIR.parent / p.parent).is_dir():
        folder = CONFIGS_DIR.parent / p.parent
    if folder is not None:
        names = sorted(q.name for q in folder.glob("*.y*ml"))
        close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.5)
        if close:
            return f"{msg}; did you mean --config {folder / close[0]}?"
        if names:
            return f"{msg}; files in {folder}: {', '.join(names)}"
    return f"{msg}; pass an existing YAML file (the shipped ones are under {CONFIGS_DIR})"


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(_missing_file_message(str(path)))
    if p.is_dir():
        raise ConfigError(f"config path '{path}' is a directory; pass a YAML file inside it")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}; check the file and its permissions") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(str(e).replace("<unicode string>", str(path))) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (model:, data:, ...), "
            f"got {type(data).__name__}; see configs/default.yaml"
        )
    return data


# ----------------------------------------------------------------------------------------------
# Merging


# Names people bring from other trainers (Hugging Face, peft) -> ours.
_ALIASES = {
    "learning_rate": "train.lr", "num_epochs": "train.epochs", "num_train_epochs": "train.epochs",
    "warmup": "train.warmup_ratio", "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.batch_size", "max_seq_length": "data.max_length",
    "model_name_or_path": "model.name", "r": "method.lora_rank", "rank": "method.lora_rank",
    "alpha": "method.lora_alpha", "target_modules": "method.lora_targets", "method": "method.name",
}


def _suggest(section: str | None, key: str) -> str | None:
    """The closest known 'section.key' (or section name when `section` is None)."""
    if key in _ALIASES:
        return _ALIASES[key]
    if section is None:
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)
        if close:
            return close[0]
        for s in SECTIONS:  # a field given at top level, e.g. `seed: 1`
            if key in _fields(s):
                return f"{s}.{key}"
        return None
    close = difflib.get_close_matches(key, list(_fields(section)), n=1, cutoff=0.6)
    if close:
        return f"{section}.{close[0]}"
    for s in SECTIONS:  # right key, wrong section
        if key in _fields(s):
            return f"{s}.{key}"
    everything = [f"{s}.{k}" for s in SECTIONS for k in _fields(s)]
    close = difflib.get_close_matches(f"{section}.{key}", everything, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_section(name: Any, source: str) -> ConfigError:
    hint = _suggest(None, str(name))
    fix = f"did you mean '{hint}'?" if hint else f"sections are: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config section '{name}' ({source}); {fix}")


def _unknown_key(section: str, key: Any, source: str) -> ConfigError:
    hint = _suggest(section, str(key))
    fix = f"did you mean '{hint}'?" if hint else f"{section} keys are: {', '.join(_fields(section))}"
    return ConfigError(f"unknown config key '{section}.{key}' ({source}); {fix}")


def _merge(merged: dict, origins: dict, data: Mapping, source: str) -> None:
    """Merge one file's sections into `merged`, key by key; a field's value is replaced whole."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown_section(section, source)
        if values is None:  # an empty `train:` section
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config section '{section}' must be a mapping of keys ({source}), got "
                f"{type(values).__name__} {values!r}; write e.g. '{section}:' then indented 'key: value' lines"
            )
        fields = _fields(section)
        for key, value in values.items():
            if key not in fields:
                raise _unknown_key(section, key, source)
            merged[section][key] = value
            origins[(section, key)] = source


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text  # e.g. an unbalanced bracket in a regex: keep it as a string


def _apply_override(merged: dict, origins: dict, item: str) -> None:
    source = f"override '{item}'"
    if not isinstance(item, str):
        raise ConfigError(f"override {item!r} must be a string 'section.key=value'")
    if "=" not in item:
        if item.endswith((".yaml", ".yml")):
            raise ConfigError(f"override '{item}' looks like a file; load config files with --config {item}")
        raise ConfigError(f"override '{item}' has no '='; write section.key=value, e.g. train.lr=5e-4")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".", 2)
    if len(parts) < 2 or not all(parts[:2]):
        hint = _suggest(None, dotted) if dotted else None
        fix = (f"did you mean '{hint}={text}'?" if hint and "." in hint
               else "write section.key=value, e.g. train.lr=5e-4")
        raise ConfigError(f"override '{item}' must name section.key; {fix}")
    section, key = parts[0], parts[1]
    if section not in SECTIONS:
        raise _unknown_section(section, source)
    if key not in _fields(section):
        raise _unknown_key(section, key, source)
    value = _parse_value(text)
    if len(parts) == 3:  # train.lr_by_label.head=1e-3 sets one entry of a mapping field
        if typing.get_origin(_types(section)[key]) is not dict:
            raise ConfigError(
                f"override '{item}': {section}.{key} is not a mapping, so it has no entry '{parts[2]}'; "
                f"write {section}.{key}=VALUE"
            )
        current = merged[section].get(key, _default(section, key))
        if not isinstance(current, Mapping):
            current = {}
        value = {**current, parts[2]: value}
    merged[section][key] = value
    origins[(section, key)] = source


def _default(section: str, key: str) -> Any:
    f = _fields(section)[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ----------------------------------------------------------------------------------------------
# Types


class _Mismatch(Exception):
    pass


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return text + (" or null" if len(arms) < len(args) else "")
    if origin is tuple:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return f"a mapping of strings to {_describe(args[1]).split(' ', 1)[1]}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raise _Mismatch. int -> float is fine, numeric strings -> float too."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise _Mismatch
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:  # method.lora_targets=query,value
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_coerce(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _coerce(v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(out):
            raise _Mismatch
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {tp!r}")  # pragma: no cover - a bug here


def _build_section(section: str, values: Mapping, origins: Mapping) -> Any:
    hints = _types(section)
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch:
            where = origins.get((section, key), "default")
            shown = f"{type(value).__name__} {value!r}"
            if str in (hints[key], *typing.get_args(hints[key])) and isinstance(value, (bool, int, float)):
                fix = "quote it so YAML reads a string (YAML turns yes/no/on/off into booleans)"
            else:
                fix = f"e.g. {section}.{key}={_fmt(_default(section, key))}"
            raise ConfigError(
                f"{section}.{key} must be {_describe(hints[key])}, got {shown} ({where}); {fix}"
            ) from None
    return SECTIONS[section](**kwargs)


# ----------------------------------------------------------------------------------------------
# Values


def _check(config: Config, origins: Mapping) -> None:
    """Raise ConfigError for the first impossible value (or combination of values)."""

    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            where = origins.get((section, name), "default")
            raise ConfigError(f"{key} {problem}, got {value!r} ({where}); {fix}")

    def one_of(key: str, choices: Sequence[str]) -> None:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            fix = f"did you mean '{close[0]}'?" if close else f"use {key}={choices[0]}"
            need(False, key, f"must be one of {' | '.join(choices)}", fix)

    m, d, me, t = config.model, config.data, config.method, config.train
    c, p, dist = config.checkpoint, config.parallel, config.distributed

    need(bool(m.name.strip()), "model.name", "is empty", "name an alias (minilm), a local folder or a hub id")
    one_of("model.dtype", DTYPES)
    one_of("model.param_dtype", DTYPES)

    one_of("data.task", TASKS)
    need(d.task != "local" or bool(d.train_file), "data.train_file", "is required when data.task=local",
         "set data.train_file=PATH (and data.eval_file=PATH)")
    need(d.max_length >= 8, "data.max_length", "must be >= 8", "use e.g. data.max_length=128")
    one_of("data.padding", PADDINGS)
    if d.buckets is not None:
        b = d.buckets
        need(len(b) > 0, "data.buckets", "is empty", "list lengths such as [32, 64, 128] or use null")
        need(all(x >= 1 for x in b), "data.buckets", "must hold positive lengths", "use e.g. [32, 64, 128]")
        need(all(x < y for x, y in zip(b, b[1:])), "data.buckets", "must be strictly increasing",
             "sort them, e.g. [32, 64, 128]")
        need(max(b) <= d.max_length, "data.buckets", f"must not exceed data.max_length={d.max_length}",
             "drop the longer buckets or raise data.max_length")
    need(d.num_labels is None or d.num_labels >= 1, "data.num_labels", "must be >= 1", "use null to infer it")
    need(not (d.is_regression and d.num_labels not in (None, 1)), "data.num_labels",
         "must be 1 or null when data.is_regression=true", "set data.num_labels=null")
    need(d.limit_train is None or d.limit_train >= 1, "data.limit_train", "must be >= 1", "use null for no limit")
    need(d.limit_eval is None or d.limit_eval >= 1, "data.limit_eval", "must be >= 1", "use null for no limit")
    need(d.eval_splits is None or len(d.eval_splits) > 0, "data.eval_splits", "is empty",
         "name at least one split or use null for the task's default")

    one_of("method.name", METHODS)
    for k in ("n1", "n2"):
        v = getattr(me, k)
        need(v is None or v >= 0, f"method.{k}", "must not be negative",
             "use a layer count (int) or a fraction of the layers in [0, 1] (float)")
        as_int = int(v) if isinstance(v, float) else v
        need(not isinstance(v, float) or v <= 1.0, f"method.{k}", "is a fraction (float) > 1",
             f"write an int for a layer count (method.{k}={as_int}) or a fraction in [0, 1]")
    if me.n1 is not None and me.n2 is not None and type(me.n1) is type(me.n2):
        need(me.n1 <= me.n2, "method.n1", f"must not exceed method.n2={me.n2}",
             "layers 0..N1-1 freeze, N1..N2-1 train biases, N2.. get LoRA; pick N1 <= N2")
    need(me.lora_rank > 0, "method.lora_rank", "must be > 0", "use e.g. method.lora_rank=8")
    need(me.lora_alpha > 0, "method.lora_alpha", "must be > 0", "use e.g. method.lora_alpha=16")
    need(0.0 <= me.lora_dropout < 1.0, "method.lora_dropout", "must be in [0, 1)", "use e.g. 0.0 or 0.1")
    need(all(s.strip() for s in me.lora_targets), "method.lora_targets", "holds an empty name",
         "list matrices such as [query, value]")
    need(me.name not in ("lora", "spafit") or len(me.lora_targets) > 0, "method.lora_targets",
         f"is empty but method.name={me.name} needs LoRA targets", "list e.g. [query, value], or use method bitfit")
    need(all(r > 0 for r in me.rank_pattern.values()), "method.rank_pattern", "must map to ranks > 0",
         "use e.g. {'layer/1[01]/.*': 16}")

    need(t.seed >= 0, "train.seed", "must be >= 0", "use e.g. train.seed=0")
    need(t.batch_size > 0, "train.batch_size", "must be > 0", "use e.g. train.batch_size=32")
    need(t.eval_batch_size > 0, "train.eval_batch_size", "must be > 0", "use e.g. train.eval_batch_size=64")
    need(t.epochs > 0, "train.epochs", "must be > 0", "use e.g. train.epochs=1 (or cap with train.max_steps)")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1", "use null for no cap")
    need(t.lr > 0, "train.lr", "must be > 0", "use a positive learning rate such as 5e-4")
    bad = [k for k in t.lr_by_label if k not in TRAINABLE_LABELS]
    if bad:
        close = difflib.get_close_matches(bad[0], TRAINABLE_LABELS, n=1, cutoff=0.5)
        need(False, "train.lr_by_label", f"has unknown label '{bad[0]}'",
             f"did you mean '{close[0]}'?" if close else f"labels are {', '.join(TRAINABLE_LABELS)}")
    need(all(v > 0 for v in t.lr_by_label.values()), "train.lr_by_label", "must hold learning rates > 0",
         "use e.g. {head: 1e-3}")
    need(0.0 <= t.warmup_ratio <= 1.0, "train.warmup_ratio", "must be in [0, 1]", "use e.g. 0.06")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", "use e.g. 0.01 or 0")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0",
         "use e.g. 1.0, or null for no clipping")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1", "use 1 for no accumulation")
    need(t.log_every >= 1, "train.log_every", "must be >= 1", "use e.g. train.log_every=10")
    need(t.eval_every >= 0, "train.eval_every", "must be >= 0", "use 0 to evaluate only at the end")
    need(t.best_metric is None or bool(t.best_metric.strip()), "train.best_metric", "is empty",
         "name a metric or use null for the task's main metric")

    need(c.every >= 0, "checkpoint.every", "must be >= 0", "use 0 to save only at the end and on SIGTERM")
    need(c.keep >= 1, "checkpoint.keep", "must be >= 1", "use e.g. checkpoint.keep=2")

    one_of("parallel.mode", PARALLEL_MODES)
    need(p.fsdp >= 1, "parallel.fsdp", "must be >= 1", "use 1 for pure data parallelism")
    need(p.fsdp == 1 or p.mode == "mesh", "parallel.fsdp", "needs parallel.mode=mesh",
         "set parallel.mode=mesh or parallel.fsdp=1")

    need(dist.num_processes is None or dist.num_processes >= 1, "distributed.num_processes", "must be >= 1",
         "use null to auto-detect")
    need(dist.process_id is None or dist.process_id >= 0, "distributed.process_id", "must be >= 0",
         "use null to auto-detect")
    need(dist.process_id is None or dist.num_processes is None or dist.process_id < dist.num_processes,
         "distributed.process_id", f"must be < distributed.num_processes={dist.num_processes}",
         "number processes 0..num_processes-1")
    need(dist.initialization_timeout > 0, "distributed.initialization_timeout", "must be > 0", "use e.g. 300")
    need(dist.heartbeat_timeout > 0, "distributed.heartbeat_timeout", "must be > 0", "use e.g. 100")


# ----------------------------------------------------------------------------------------------
# Public API


def config_from_dict(data: Mapping, *, source: str = "from a dict") -> Config:
    """Build and validate a Config from a nested mapping {section: {key: value}} (missing keys: defaults)."""
    merged: dict[str, dict] = {s: {} for s in SECTIONS}
    origins: dict = {}
    _merge(merged, origins, data, source)
    return _finish(merged, origins)


def _finish(merged: Mapping, origins: Mapping) -> Config:
    config = Config(**{s: _build_section(s, merged[s], origins) for s in SECTIONS})
    _check(config, origins)
    return config


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then YAML `paths` in order (later wins, key by key), then `section.key=value` overrides.

    Override values are parsed as YAML (`train.lr=5e-4`, `method.lora_targets=[query,key,value]`,
    `train.max_steps=null`); `train.lr_by_label.head=1e-3` sets one entry of a mapping field.
    Raises ConfigError (one line: the key, what is wrong, where it came from, the fix).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(overrides, str):
        overrides = [overrides]
    merged: dict[str, dict] = {s: {} for s in SECTIONS}
    origins: dict = {}
    for path in paths:
        _merge(merged, origins, _read_yaml(os.fspath(path)), f"from {os.fspath(path)}")
    for item in overrides:
        _apply_override(merged, origins, item)
    return _finish(merged, origins)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(config: Config) -> dict:
    """The config as plain nested dicts/lists/scalars (YAML- and JSON-safe), in field order."""
    return {
        s: {f.name: _plain(getattr(getattr(config, s), f.name)) for f in dataclasses.fields(SECTIONS[s])}
        for s in SECTIONS
    }


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (every field); `load_config([path]) == config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Resolved spafit_jax config (defaults + --config files + overrides), written by the trainer.\n"
        f"# Load it with: python -m spafit_jax.train --config {path}\n"
    )
    body = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + body, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_fields() -> str:
    """Every config field with its default and a short description, grouped by section."""
    lines = []
    for s, cls in SECTIONS.items():
        lines.append(f"  {s}:  {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            left = f"    {s}.{f.name} = {_fmt(_default(s, f.name))}"
            lines.append(f"{left:<44} {f.metadata.get('help', '')}" if len(left) < 44 else
                         f"{left}\n{'':<44} {f.metadata.get('help', '')}")
    return "\n".join(lines)


_DESCRIPTION = """\
Fine-tune a BERT encoder with SPAFIT (Stratified Progressive Adaptation Fine-tuning): layers below N1
stay frozen, layers N1..N2-1 train only their biases (BitFit), layers N2..L-1 train LoRA adapters plus
biases, and the task head trains. Full fine-tuning, BitFit, LoRA and head-only run from the same CLI."""

_EXAMPLES = """\
examples:
  # the offline demo: MiniLM on BBC News with SPAFIT (N1=2, N2=4 of 6 layers), 1 epoch, CPU is enough
  python -m spafit_jax.train

  # a GLUE task with bert-large-cased, as in the paper; later --config files win
  python -m spafit_jax.train --config configs/glue/sst2.yaml --config configs/methods/spafit.yaml

  # dotted overrides (values are YAML) after the files
  python -m spafit_jax.train train.max_steps=100 train.log_every=5
  python -m spafit_jax.train --config configs/glue/rte.yaml --config configs/methods/lora.yaml \\
      train.lr=5e-4 method.lora_targets=[query,key,value] --workdir runs/rte-lora

  # print the resolved config and exit
  python -m spafit_jax.train --config configs/glue/mnli.yaml --config configs/methods/bitfit.yaml --print-config

config files: configs/default.yaml (the offline demo), configs/glue/<task>.yaml (cola sst2 mrpc qqp
stsb mnli qnli rte wnli), configs/methods/<method>.yaml (full bitfit lora spafit head_only); a task
file and a method file compose in either order. Every run writes its resolved config to
<workdir>/config.yaml, which --config accepts.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.train`."""
    parser = argparse.ArgumentParser(
        prog="python -m spafit_jax.train",
        description=_DESCRIPTION,
        epilog=_EXAMPLES + "\nconfig fields (section.key = default), settable in YAML or as overrides:\n"
        + format_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help="YAML config file; repeat to compose (later files win, key by key). "
        "Without any, the built-in defaults run the offline demo. See configs/.",
    )
    parser.add_argument(
        "--workdir", default=None, metavar="DIR",
        help="run folder for config.yaml, metrics.jsonl, TensorBoard events, checkpoints and results.json "
        "(default: runs/<task>-<method>-<timestamp>). Re-running with the same DIR resumes an unfinished run.",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="allow reusing a DIR that holds a finished run (its results are replaced)",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="override config fields, e.g. train.lr=5e-4 method.n1=8 method.lora_targets=[query,value]",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config it names. Raises ConfigError; --help exits 0.

    Options may come before, between or after the overrides. With --print-config the resolved
    YAML is printed and SystemExit(0) raised.
    """
    parser = build_parser()
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False))
        raise SystemExit(0)
    return config, args
