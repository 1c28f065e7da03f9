"""The work behind `python -m spafit_jax.predict` (its command line and --help: `spafit_jax/predict.py`).

Input: csv / tsv / json / jsonl / parquet with the run's text column(s) (no label column needed),
a .txt file with one text per line, or `-` for lines on stdin. Output: one JSON line per input
row, in input order (csv / tsv when --output ends in .csv / .tsv): `label` (the class name where
known, else the id), `label_id` and `probabilities`, or `score` for a regression task. --output is
written atomically and never replaces the --input file, a file of the run (config.yaml, results.json,
metrics.jsonl, task.json, ...), anything in its checkpoints/ or its base model, nor an existing file
without --overwrite.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import csv
import json
import logging
import os
import sys
from pathlib import Path

from spafit_jax.after_training import outputs
from spafit_jax.errors import DataError

PROGRESS_ABOVE = 1000  # rows: show a progress bar on longer inputs


TXT = ".txt"
TABLES = (".csv", ".tsv")  # --output suffixes written as tables; JSON lines for JSON_LINES
JSON_LINES = (".jsonl", ".json", ".ndjson")


def check_input(path: str, encoding: str) -> None:
    """Refuses (one line) an --input that cannot be read: missing, a folder, an unknown file type, a
    closed stdin, or an --encoding Python does not know."""
    import codecs

    from spafit_jax.data.sources import FILE_BUILDERS

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"--encoding {encoding!r} is not an encoding Python knows; use e.g. utf-8, latin-1 or "
                        "cp1252") from None
    if path == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise DataError("--input - reads stdin, but stdin is closed; pipe text in, or pass --input FILE")
        return
    p = Path(path)
    if p.is_dir():
        raise DataError(f"--input {path} is a folder; pass a file (csv/tsv/json/jsonl/parquet/txt) or - for stdin")
    if not p.is_file():
        raise DataError(f"--input {path} does not exist; pass an existing file or - for stdin")
    if not os.access(p, os.R_OK):
        raise DataError(f"--input {path} is not readable (permission denied); make it readable or pass another file")
    known = (*FILE_BUILDERS, TXT)
    if p.suffix.lower() not in known:
        raise DataError(f"--input {path}: unsupported file type {p.suffix.lower() or '(none)'!r}; use one of "
                        f"{', '.join(known)}, or - for stdin")


def _read_lines(path: str, encoding: str) -> list[str]:
    """The lines of a text file or of stdin, decoded with `encoding`."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            buffer = getattr(sys.stdin, "buffer", None)
            raw = sys.stdin.read() if buffer is None else buffer.read().decode(encoding)
        else:
            raw = Path(path).read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes {e.object[e.start:e.end]!r} at byte {e.start} are not valid {encoding}; pass "
                        "--encoding with the file's encoding (e.g. latin-1, cp1252) or save it as UTF-8") from None
    except (OSError, ValueError) as e:  # ValueError: a closed stream
        raise DataError(f"{where}: cannot read it ({e}); pass a readable file or pipe text in") from None
    return raw.removeprefix("\ufeff").splitlines()


def read_texts(path: str, text_column: str, pair_column: str | None,
               encoding: str = "utf-8") -> tuple[list[str], list[str] | None]:
    """(texts, pairs) of an input file; a missing column, empty file or blank / non-text value is a one-line
    DataError."""
    check_input(path, encoding)
    if path == "-" or Path(path).suffix.lower() == TXT:
        if pair_column:
            raise DataError(f"{path}: a .txt file or stdin holds one text per line, but this run's task takes text "
                            f"pairs ({text_column!r}, {pair_column!r}); give a csv/jsonl file with both columns")
        where = "stdin" if path == "-" else path
        columns = {text_column: _read_lines(path, encoding)}
    else:
        import datasets

        from spafit_jax.data.sources import read_file

        datasets.disable_progress_bars()
        quiet = logging.getLogger("datasets")  # its loaders log the error we report in one line
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            table = read_file(path, encoding, option="--encoding", names="--input")
        finally:
            quiet.setLevel(level)
        where = path
        for col, flag in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
            if col is not None and col not in table.column_names:
                raise DataError(f"{path}: no column {col!r} (columns: {', '.join(table.column_names) or '-'}); "
                                f"pass {flag}")
        columns = {c: table[c][:] for c in (text_column, pair_column) if c}
    n = len(columns[text_column])
    if n == 0:
        raise DataError(f"{where}: no rows to predict; give a file with at least one text")
    for col, values in columns.items():
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                raise DataError(f"{where} row {i + 1}: column {col!r} holds a {type(v).__name__} ({v!r:.40}), not "
                                "text; write it as a string or fix the row")
            if v is None or not v.strip():
                raise DataError(f"{where} row {i + 1}: empty text in column {col!r}; fix or drop the row")
    return list(columns[text_column]), (None if pair_column is None else list(columns[pair_column]))


def rows(run, predictions) -> list[dict]:
    """One output record per input: label, label_id and probabilities, or score (regression)."""
    if run.spec.is_regression:
        return [{"score": float(s)} for s in predictions]
    names = run.label_names
    out = []
    for p in predictions:
        i = int(p.argmax())
        out.append({"label": names[i] if names else i, "label_id": i, "probabilities": [float(x) for x in p]})
    return out


def check_output(output: str | None, input_path: str, overwrite: bool,
                 workdir: str | os.PathLike | None = None) -> Path | None:
    """The --output path, refused (one line) before any work: an unknown suffix, the --input file, a file or
    folder of the run in `workdir` or of its base model (`outputs.run_places`), a folder, a pseudo-file, or an
    existing file without --overwrite. None (no --output, or -): stdout."""
    if output is None or output == "-":
        return None
    suffixes = {**{s: "a table" for s in TABLES}, **{s: "JSON lines" for s in JSON_LINES}}
    runs = [] if workdir is None else [outputs.run_places(workdir)]
    return outputs.check_file(output, inputs={"--input": input_path}, overwrite=overwrite, suffixes=suffixes,
                              runs=runs)


def write(records: list[dict], output: str | os.PathLike | None) -> None:
    """JSON lines (stdout without `output`), or csv / tsv by the suffix of `output`; a file is written
    atomically (a temporary file beside it, then renamed)."""
    suffix = Path(output).suffix.lower() if output else ""

    def fill(f) -> None:
        if suffix in TABLES:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        else:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    if output:
        outputs.write_file(Path(output), fill, newline="" if suffix in TABLES else None)
    else:
        fill(sys.stdout)


def run_spec(workdir: str):
    """The task spec of the run folder `workdir`, read without loading the model (so that a bad input is
    refused before that work); None where the folder is no run, which `load_run` then reports."""
    from spafit_jax.training import rundir
    from spafit_jax.config.files import load_config
    from spafit_jax.after_training.run import load_spec

    config = Path(workdir) / rundir.CONFIG
    return load_spec(Path(workdir), load_config([str(config)])) if config.is_file() else None
