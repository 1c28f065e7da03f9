"""The run configuration's schema: seven frozen dataclasses whose fields carry defaults and help, and
which check their own values when built (`__post_init__`).

Each check asks the owner of its rule (`tasks` for task names, `methods` for methods, labels,
strata and LoRA settings, `batching` for buckets, `packing` for packed rows), so no rule is written
twice. A failed check raises `ConfigError(field=...)`; `config.load_config` adds where the value came from.
Stdlib only (numpy once a data section is built, for the bucket rule).
"""

import dataclasses
import difflib
from typing import Any, Callable, ClassVar, Sequence

from spafit_jax import methods
from spafit_jax.data import tasks
from spafit_jax.errors import ConfigError, SpafitError

DTYPES = ("float32", "bfloat16")
PARALLEL_MODES = ("mesh", "pmap")  # parallel.make_driver has one driver for each


def _field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by --help)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Checks a section runs on itself. Each raises ConfigError(field=...) so that `load_config` can
# add where the bad value came from.


def _need(cfg: Any, ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{cfg.section}.{key} {problem}, got {getattr(cfg, key)!r}; {fix}", field=key)


def _one_of(cfg: Any, key: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, key)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    fix = f"did you mean '{close[0]}'?" if close else f"use {cfg.section}.{key}={choices[0]}"
    _need(cfg, value in choices, key, f"must be one of {' | '.join(choices)}", fix)


def _ask(cfg: Any, key: str, check: Callable, *args: Any, context: str = "", **kwargs: Any) -> Any:
    """Run an owner's check of field `key`; its error becomes this field's ConfigError."""
    try:
        return check(*args, **kwargs)
    except SpafitError as e:
        name = f"{cfg.section}.{key}"
        text = str(e) if str(e).startswith(name) else f"{name}{context}: {e}"
        raise ConfigError(text, field=key) from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The pre-trained encoder and its numerics."""

    section: ClassVar[str] = "model"
    name: str = _field("minilm", "alias (minilm), local folder or hub id (e.g. bert-large-cased)")
    dtype: str = _field("float32", "compute dtype: float32 | bfloat16")
    param_dtype: str = _field("float32", "parameter dtype: float32 | bfloat16")

    def __post_init__(self):
        _need(self, bool(self.name.strip()), "name", "is empty", "name an alias (minilm), a local folder or a hub id")
        _one_of(self, "dtype", DTYPES)
        _one_of(self, "param_dtype", DTYPES)


def _is_codec(name: Any) -> bool:
    import codecs

    try:
        return isinstance(name, str) and codecs.lookup(name)._is_text_encoding
    except LookupError:
        return False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task, its files and how text becomes batches."""

    section: ClassVar[str] = "data"
    task: str = _field("bbc_news", f"{' | '.join(tasks.TASK_NAMES)}")
    train_file: str | None = _field(None, "local task: csv/tsv/json/jsonl/parquet training file")
    eval_file: str | None = _field(None, "local task: evaluation file")
    hf_path: str | None = _field(None, "hf task: dataset on the hub (or a local dataset folder), e.g. imdb")
    hf_name: str | None = _field(None, "hf task: the dataset's configuration name, if it has several")
    train_split: str = _field("train", "hf task: the split to train on")
    text_column: str = _field("text", "local/hf task: column holding the text")
    text_pair_column: str | None = _field(None, "local/hf task: column holding the second text of a pair")
    label_column: str = _field("label", "local/hf task: column holding the label")
    num_labels: int | None = _field(None, "local/hf task: number of classes (null = infer from the data)")
    is_regression: bool = _field(False, "local/hf task: float labels, one output, MSE loss")
    max_length: int = _field(128, "maximum tokens per example (longer ones are truncated)")
    padding: str = _field("bucket", "bucket (pad to the smallest bucket that fits) | max_length")
    buckets: tuple[int, ...] | None = _field(None, "bucket lengths ending at max_length (null = fitted by data.max_shapes; "
                                                      "with that null too, max_length/4, /2, /1)")
    bucket_multiple: int | None = _field(None, "buckets every N tokens up to max_length, e.g. 16 (instead of data.buckets)")
    max_shapes: int | None = _field(8, "fit at most N bucket lengths to the train batches, the least padding "
                                       "(data.buckets or data.bucket_multiple, when set, win; null = max_length/4, /2, /1)")
    group_by_length: bool = _field(True, "batch examples of similar length together (less padding, same maths; the "
                                         "order stays seeded and resumable; false = a plain shuffle)")
    packing: bool = _field(True, "pack several examples into each row of max_length tokens (one train shape, no "
                                 "padding; exact per example; padding/buckets/group_by_length then do not apply; "
                                 "false = the bucketed batching)")
    max_segments: int = _field(16, "data.packing: at most this many examples per packed row")
    limit_train: int | None = _field(None, "use at most this many training examples")
    limit_eval: int | None = _field(None, "use at most this many examples per evaluation split")
    eval_splits: tuple[str, ...] | None = _field(None, "evaluation splits (null = the task's default)")
    encoding: str = _field("utf-8", "local task: text encoding of csv/tsv/json/jsonl files, e.g. latin-1, cp1252")

    def __post_init__(self):
        from spafit_jax.data import batching, packing  # import numpy: only when a config is built

        _one_of(self, "task", tasks.TASK_NAMES)
        for key in ("train_file", "eval_file"):
            _need(self, self.task != "local" or bool(getattr(self, key)), key, "is required when data.task=local",
                  "set data.train_file=PATH and data.eval_file=PATH (csv, tsv, json, jsonl or parquet)")
        _need(self, self.task != "hf" or bool(self.hf_path), "hf_path", "is required when data.task=hf",
              "set data.hf_path to a hub dataset id or a local dataset folder")
        _need(self, self.max_length >= 8, "max_length", "must be >= 8", "use e.g. data.max_length=128")
        _one_of(self, "padding", batching.PADDINGS)
        key = next((k for k in ("buckets", "bucket_multiple") if getattr(self, k) is not None), "max_shapes")
        _ask(self, key, self.bucket_lengths)
        _ask(self, "max_segments", packing.check_settings, self.max_segments)
        _need(self, self.num_labels is None or self.num_labels >= 1, "num_labels", "must be >= 1",
              "use null to infer it")
        _need(self, not (self.is_regression and self.num_labels not in (None, 1)), "num_labels",
              "must be 1 or null when data.is_regression=true", "set data.num_labels=null")
        for key in ("limit_train", "limit_eval"):
            _need(self, getattr(self, key) is None or getattr(self, key) >= 1, key, "must be >= 1",
                  "use null for no limit")
        _need(self, self.eval_splits is None or len(self.eval_splits) > 0, "eval_splits", "is empty",
              "name at least one split or use null for the task's default")
        _need(self, _is_codec(self.encoding), "encoding", "is not a text encoding Python knows",
              "use e.g. data.encoding=utf-8, latin-1 or cp1252")

    def bucket_lengths(self, batch_maxima=()) -> list[int]:
        """The lengths batches are padded to (`batching.resolve_buckets`); with data.max_shapes, fitted to
        `batch_maxima` (the longest example of each batch they serve: `batching.batch_maxima`)."""
        from spafit_jax.data import batching

        return batching.resolve_buckets(self.max_length, self.padding, self.buckets, self.bucket_multiple,
                                        self.max_shapes, batch_maxima)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What trains: full | bitfit | lora | spafit | head_only, and the LoRA adapters."""

    section: ClassVar[str] = "method"
    name: str = _field("spafit", " | ".join(methods.METHODS))
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
    stratum3_bias: bool = _field(True, "spafit: layers N2.. train LoRA + biases (false: LoRA only)")

    def __post_init__(self):
        _one_of(self, "name", methods.METHODS)
        _ask(self, "n1", methods.check_strata, self.n1)
        _ask(self, "n2", methods.check_strata, None, self.n2)
        _ask(self, "n1", methods.check_strata, self.n1, self.n2, context=f" (with method.n2={self.n2})")
        _need(self, self.name not in methods.LORA_METHODS or len(self.lora_targets) > 0, "lora_targets",
              f"is empty but method.name={self.name} needs LoRA targets", "list e.g. [query, value], or use bitfit")
        for key, arg in (("lora_rank", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                         ("rank_pattern", "rank_pattern"), ("lora_targets", "targets")):
            if key != "lora_targets" or self.lora_targets:
                _ask(self, key, methods.LoRAConfig, **{arg: getattr(self, key)})

    def lora(self, layers: Sequence[int] | None = None) -> methods.LoRAConfig:
        """The LoRA adapters these settings describe, on `layers` (None = every layer)."""
        return methods.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                  targets=self.lora_targets, layers=None if layers is None else tuple(layers),
                                  rank_pattern=dict(self.rank_pattern), rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and evaluation cadence."""

    section: ClassVar[str] = "train"
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
    max_bad_steps: int = _field(5, "stop (exit 2) after this many consecutive steps with a non-finite loss or "
                                   "gradient; such steps are skipped, never applied")
    cache_frozen: bool = _field(False, "compute the frozen embeddings + first N1 layers once per example (no dropout "
                                       "there) and train from their cached output (spafit, bitfit-like plans)")
    cache_dtype: str = _field("float32", "dtype of the frozen-stratum cache on the host: float32 | bfloat16")
    cache_max_gb: float = _field(4.0, "largest frozen-stratum cache (GB of host memory per process)")

    def __post_init__(self):
        _need(self, self.seed >= 0, "seed", "must be >= 0", "use e.g. train.seed=0")
        for key, example in (("batch_size", 32), ("eval_batch_size", 64)):
            _need(self, getattr(self, key) > 0, key, "must be > 0", f"use e.g. train.{key}={example}")
        _need(self, self.epochs > 0, "epochs", "must be > 0", "use e.g. train.epochs=1 (or cap with train.max_steps)")
        _need(self, self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1", "use null for no cap")
        _need(self, self.lr > 0, "lr", "must be > 0", "use a positive learning rate such as 5e-4")
        labels = methods.TRAINABLE_LABELS
        for label in self.lr_by_label:
            close = difflib.get_close_matches(label, labels, n=1, cutoff=0.5)
            _need(self, label in labels, "lr_by_label", f"has unknown label '{label}'",
                  f"did you mean '{close[0]}'?" if close else f"labels are {', '.join(labels)}")
        _need(self, all(v > 0 for v in self.lr_by_label.values()), "lr_by_label", "must hold learning rates > 0",
              "use e.g. {head: 1e-3}")
        _need(self, 0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", "must be in [0, 1]", "use e.g. 0.06")
        _need(self, self.weight_decay >= 0, "weight_decay", "must be >= 0", "use e.g. 0.01 or 0")
        _need(self, self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0",
              "use e.g. 1.0, or null for no clipping")
        _need(self, self.grad_accum >= 1, "grad_accum", "must be >= 1", "use 1 for no accumulation")
        _need(self, self.log_every >= 1, "log_every", "must be >= 1", "use e.g. train.log_every=10")
        _need(self, self.eval_every >= 0, "eval_every", "must be >= 0", "use 0 to evaluate only at the end")
        _need(self, self.best_metric is None or bool(self.best_metric.strip()), "best_metric", "is empty",
              "name a metric or use null for the task's main metric")
        _need(self, self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1", "use e.g. train.max_bad_steps=5")
        _one_of(self, "cache_dtype", DTYPES)
        _need(self, self.cache_max_gb > 0, "cache_max_gb", "must be > 0", "use e.g. train.cache_max_gb=4")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in <workdir>/checkpoints."""

    section: ClassVar[str] = "checkpoint"
    every: int = _field(0, "save every N steps (0 = only at the end and on SIGTERM)")
    keep: int = _field(2, "keep the last N checkpoints")
    keep_best: bool = _field(True, "also keep the checkpoint with the best eval metric")

    def __post_init__(self):
        _need(self, self.every >= 0, "every", "must be >= 0", "use 0 to save only at the end and on SIGTERM")
        _need(self, self.keep >= 1, "keep", "must be >= 1", "use e.g. checkpoint.keep=2")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the step runs over the devices."""

    section: ClassVar[str] = "parallel"
    mode: str = _field("mesh", "mesh (jit + NamedSharding) | pmap")
    fsdp: int = _field(1, "mesh mode: devices the parameters are sharded over (1 = pure data parallel)")

    def __post_init__(self):
        _one_of(self, "mode", PARALLEL_MODES)
        _need(self, self.fsdp >= 1, "fsdp", "must be >= 1", "use 1 for pure data parallelism")
        _need(self, self.fsdp == 1 or self.mode == "mesh", "fsdp", "needs parallel.mode=mesh",
              "set parallel.mode=mesh or parallel.fsdp=1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runs (jax.distributed.initialize)."""

    section: ClassVar[str] = "distributed"
    enabled: bool = _field(False, "call jax.distributed.initialize() (TPU pods fill in the rest)")
    coordinator_address: str | None = _field(None, "host:port of process 0 (null = auto-detect)")
    num_processes: int | None = _field(None, "number of processes (null = auto-detect)")
    process_id: int | None = _field(None, "this process's index (null = auto-detect)")
    initialization_timeout: int = _field(300, "seconds to wait for the other processes")
    heartbeat_timeout: int = _field(
        100, "seconds without heartbeats after which a process counts as dead and the others exit with an error"
    )

    def __post_init__(self):
        n, p = self.num_processes, self.process_id
        _need(self, n is None or n >= 1, "num_processes", "must be >= 1", "use null to auto-detect")
        _need(self, p is None or p >= 0, "process_id", "must be >= 0", "use null to auto-detect")
        _need(self, p is None or n is None or p < n, "process_id", f"must be < distributed.num_processes={n}",
              "number processes 0..num_processes-1")
        _need(self, self.initialization_timeout > 0, "initialization_timeout", "must be > 0", "use e.g. 300")
        _need(self, self.heartbeat_timeout > 0, "heartbeat_timeout", "must be > 0", "use e.g. 100")


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
