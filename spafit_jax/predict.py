"""`python -m spafit_jax.predict --workdir RUN --input FILE`: label new text with a trained run.

Input: csv / tsv / json / jsonl / parquet with the run's text column(s) (no label column needed),
a .txt file with one text per line, or `-` for lines on stdin. Output: one JSON line per input
row, in input order (csv when --output ends in .csv): `label` (the class name where known, else
the id), `label_id` and `probabilities`, or `score` for a regression task.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Sequence

from spafit_jax.errors import DataError

PROGRESS_ABOVE = 1000  # rows: show a progress bar on longer inputs


def read_texts(path: str, text_column: str, pair_column: str | None) -> tuple[list[str], list[str] | None]:
    """(texts, pairs) of an input file; a missing column, empty file or blank text is a one-line DataError."""
    if path == "-" or path.endswith(".txt"):
        if pair_column:
            raise DataError(f"{path}: a .txt file or stdin holds one text per line, but this run's task takes text "
                            f"pairs ({text_column!r}, {pair_column!r}); give a csv/jsonl file with both columns")
        where = "stdin" if path == "-" else path
        try:
            raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: cannot read it ({e}); pass a UTF-8 text file") from None
        texts = raw.splitlines()
        columns = {text_column: texts}
    else:
        import datasets

        from spafit_jax.sources import read_file

        datasets.disable_progress_bars()
        table = read_file(path)
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
            if v is None or not str(v).strip():
                raise DataError(f"{where} row {i + 1}: empty text in column {col!r}; fix or drop the row")
    return [str(v) for v in columns[text_column]], (None if pair_column is None else
                                                     [str(v) for v in columns[pair_column]])


def rows(run, outputs) -> list[dict]:
    """One output record per input: label, label_id and probabilities, or score (regression)."""
    if run.spec.is_regression:
        return [{"score": float(s)} for s in outputs]
    names = run.label_names
    out = []
    for p in outputs:
        i = int(p.argmax())
        out.append({"label": names[i] if names else i, "label_id": i, "probabilities": [float(x) for x in p]})
    return out


def write(records: list[dict], output: str | None) -> None:
    """JSON lines (stdout without `output`), or csv when `output` ends in .csv."""
    if output and output.endswith(".csv"):
        with open(output, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        return
    text = "".join(json.dumps(r) + "\n" for r in records)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spafit_jax.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--input", required=True, help="csv/tsv/json/jsonl/parquet/txt file, or - for stdin")
    p.add_argument("--output", help="output file: .jsonl (default, stdout without it) or .csv")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number (default: best)")
    p.add_argument("--text-column", help="column of the first text (default: the run's)")
    p.add_argument("--text-pair-column", help="column of the second text (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: train.eval_batch_size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli
    from spafit_jax.run import load_run

    parser = build_parser()
    parser.prog = cli.program("predict")
    args = parser.parse_args(argv)

    def work():
        run = load_run(args.workdir, args.checkpoint)
        texts, pairs = read_texts(args.input, args.text_column or run.spec.text_a,
                                  args.text_pair_column or run.spec.text_b)
        batch = args.batch_size or run.config.train.eval_batch_size
        outputs = run.predict(texts, pairs, batch_size=batch, progress=len(texts) > PROGRESS_ABOVE)
        write(rows(run, outputs), args.output)

    return cli.run_command(work)

if __name__ == "__main__":
    sys.exit(main())
