"""The finished runs that `report` compares, read and tabled: `collect` (the runs of an experiment folder and
any other run folders, and the cells left out with why), `Groups` (by task and method), the rows of
summary.csv and the paper's table (table.md). The score of a run is its task's main metric (results'
best.metric) on the first eval split at the end of training, shown x100 as mean ± sample std over seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spafit_jax.training import metricslog, results, rundir
from spafit_jax.config.files import Config, load_config
from spafit_jax.errors import SpafitError


class ReportError(SpafitError):
    """Nothing to report, or a run folder that is not one."""


@dataclasses.dataclass
class RunRecord:
    """One finished run: its names, results.json, config (None when unreadable) and metrics.jsonl records."""

    folder: Path
    task: str
    method: str
    seed: int
    results: results.Results
    config: Config | None
    records: list[dict]

    @property
    def metric(self) -> str:
        return self.results.best.metric

    @property
    def value(self) -> float | None:
        return self.results.eval.get(self.metric)

    @property
    def stratum3(self) -> str:
        """What SPAFIT's group 3 trains: "LoRA + bias" or "LoRA only" (from results.json, else config.yaml)."""
        bias = self.results.stratum3_bias
        bias = bias if bias is not None or self.config is None else self.config.method.stratum3_bias
        return "LoRA only" if bias is False else "LoRA + bias"


def _read_run(folder: Path, names: tuple[str, str, int] | None = None) -> RunRecord:
    try:
        record = results.read(folder / rundir.RESULTS)
    except results.ResultsError as e:
        raise ReportError(f"{e} (or leave {folder} out of the report)") from None
    if record.best is None:
        raise ReportError(f"{folder / rundir.RESULTS} ranks no evaluation (best is null); re-run the training "
                          "command with --overwrite, or leave the folder out")
    try:
        cfg = load_config([folder / rundir.CONFIG])
    except SpafitError:
        cfg = None  # an older schema: the strata diagram leaves this run out
    metrics = folder / rundir.METRICS
    records = [r for _, r in metricslog.read_metrics(metrics)] if metrics.exists() else []
    if names is None:
        method = record.method + (f"@n1={record.n1},n2={record.n2}" if record.n1 is not None else "")
        names = (record.task, method, cfg.train.seed if cfg else 0)
    return RunRecord(folder, *names, record, cfg, records)


def collect(exp: str | Path | None, folders: Sequence[str | Path] = ()) -> tuple[list[RunRecord], dict[str, str]]:
    """(finished runs, {cell: why it is left out}) of experiment folder `exp` and extra run `folders`.

    A cell of `exp` is left out, with its reason, when it failed (its error file), is unfinished (no
    results.json yet) or its results.json is damaged; a run folder named in `folders` that is not a
    finished run is an error (one line)."""
    runs, left_out = [], {}
    if exp is not None and (Path(exp) / rundir.RESULTS).exists():
        folders, exp = [exp, *folders], None
    if exp is not None:
        for path in sorted((Path(exp) / "runs").glob("*/*/seed*")):
            seed = path.name[len("seed"):]
            if not seed.isdigit():
                continue
            names = (path.parent.parent.name, path.parent.name, int(seed))
            cell = f"{names[0]}/{names[1]}/seed{seed}"
            if (path / rundir.RESULTS).exists():
                try:
                    runs.append(_read_run(path, names))
                except ReportError as e:
                    left_out[cell] = f"damaged results: {e}"
            elif (path / rundir.ERROR).exists():
                left_out[cell] = "failed: " + (path / rundir.ERROR).read_text(errors="replace").strip()
            else:
                left_out[cell] = f"unfinished: no {rundir.RESULTS} yet (re-run the experiment to finish it)"
    for folder in folders:
        if not Path(folder).is_dir():
            raise ReportError(f"{folder} is not a folder; pass run folders (the --workdir of a training run)")
        runs.append(_read_run(Path(folder)))
    return runs, left_out


def mean_std(values: list) -> tuple[float | None, float | None]:
    """(mean, sample std) of the finite values (None where there are none; std None for one value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


class Groups:
    """Runs grouped by (task, method): tasks sorted by name, methods by trainable parameters (most first)."""

    def __init__(self, runs: Sequence[RunRecord]):
        self.runs = list(runs)
        self.by: dict[tuple[str, str], list[RunRecord]] = {}
        for r in self.runs:
            self.by.setdefault((r.task, r.method), []).append(r)
        self.tasks = sorted({r.task for r in self.runs})
        size = {m: statistics.fmean(r.results.trainable_params for r in self.runs if r.method == m)
                for m in {r.method for r in self.runs}}
        self.methods = sorted(size, key=lambda m: (-size[m], m))

    def score(self, task: str, method: str) -> tuple[float | None, float | None]:
        """(mean, std) of the runs' scores (std None for one seed)."""
        return mean_std([r.value for r in self.by.get((task, method), [])])

    def params(self, task: str, method: str) -> float:
        return statistics.fmean(r.results.trainable_params for r in self.by[(task, method)])

    def metric(self, task: str) -> str:
        return next(r.metric for r in self.runs if r.task == task)


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """A row per run: names, strata, parameter counts, main metric, every metric of every split, timings."""
    rows = []
    for r in runs:
        res = r.results
        row = {"task": r.task, "method": r.method, "seed": r.seed, "n1": res.n1, "n2": res.n2,
               "stratum3": r.stratum3 if res.n1 is not None else None,
               "trainable_params": res.trainable_params, "total_params": res.total_params,
               "trainable_percent": res.trainable_percent, "main_metric": r.metric, "main_value": r.value,
               "best_step": res.best.step, "best_value": res.best.value}
        for split, values in res.splits.items():
            row.update({f"{split}/{k}": v for k, v in values.items()})
        row.update({k: getattr(res, k) for k in ("steps", "train_seconds", "eval_seconds", "examples_per_second")})
        rows.append({**row, "folder": str(r.folder)})
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """summary.csv: the union of the rows' columns, in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def count_text(n: float) -> str:
    """A parameter count as 950, 12.3K or 1.23M."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _spread(values: list[float], fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


def table(groups: Groups) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """(header, rows of (text, best?)): a row per method with trainable params (count, %), a column per
    task (mean ± std x100), the average over tasks; the best mean of each column is marked."""
    header = ["Method", "Trainable params", "%"] + [f"{t} ({groups.metric(t)})" for t in groups.tasks] + ["Avg."]
    cols: dict[str, list[str]] = {}
    for m in groups.methods:
        runs = [r for r in groups.runs if r.method == m]
        scores = [groups.score(t, m) for t in groups.tasks]
        means = [mean for mean, _ in scores]
        cells = ["–" if mean is None else f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")
                 for mean, std in scores]
        avg = "–" if None in means else f"{100 * statistics.fmean(means):.1f}"
        cols[m] = [m, _spread([r.results.trainable_params for r in runs], count_text),
                   _spread([r.results.trainable_percent for r in runs], lambda p: f"{p:.2f}"), *cells, avg]
    rows = [[(text, False) for text in cols[m]] for m in groups.methods]
    for j in range(3, len(header)):
        shown = [float(row[j][0].split(" ")[0]) for row in rows if row[j][0] != "–"]
        for row in rows:
            if shown and row[j][0] != "–" and float(row[j][0].split(" ")[0]) == max(shown):
                row[j] = (row[j][0], True)
    return header, rows


def caption(groups: Groups) -> str:
    """What the table's numbers are (the seeds counted), under table.md and index.html's table."""
    seeds = sorted({len(v) for v in groups.by.values()})
    return (f"Main metric x100 on the first eval split at the end of training, mean ± sample std over "
            f"{'/'.join(map(str, seeds))} seed(s); best per column in bold; trainable parameters include the head.")


def table_markdown(groups: Groups, left_out: dict[str, str] | None = None) -> str:
    """table.md: the paper's table as Markdown, with its caption, then the cells left out and why."""
    header, rows = table(groups)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(f"**{t}**" if best else t for t, best in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n\n" + caption(groups) + "\n"
    if left_out:
        text += f"\nLeft out of this table ({len(left_out)}):\n\n" + "".join(
            f"- {cell}: {why}\n" for cell, why in left_out.items())
    return text
