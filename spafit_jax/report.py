"""`python -m spafit_jax.report EXP [RUN_FOLDERS...] [--out DIR]`: finished runs as a table and pictures.

Reads every run folder's results.json, config.yaml and metrics.jsonl: the experiment's cells
`EXP/runs/<task>/<method>/seed<k>` (named by their path), and any other run folders given (named
by their results: task, method, `@n1=..,n2=..` for spafit, `train.seed`). Writes to DIR (default
EXP/report): summary.csv (a row per run), table.md (the paper's layout), pictures as PNG and SVG
(matplotlib, no global backend state) and index.html showing them together.

The score of a run is its task's main metric (results' best.metric) on the first eval split at the
end of training, shown x100 as mean ± sample std over seeds.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import csv
import dataclasses
import html
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spafit_jax import metricslog, results, rundir
from spafit_jax.config import Config, load_config
from spafit_jax.errors import SpafitError
from spafit_jax.plan import LAYER_KINDS

#: the colour of each of the plan's layer kinds (`plan.LAYER_KINDS`) in the strata picture.
KINDS = dict(zip(LAYER_KINDS, ("#d9d9d9", "#9ecae1", "#fdd0a2", "#e6550d", "#31a354", "#c6dbef", "#fd8d3c")))


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


def _mean_std(values: list) -> tuple[float | None, float | None]:
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
        return _mean_std([r.value for r in self.by.get((task, method), [])])

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


def _caption(groups: Groups) -> str:
    seeds = sorted({len(v) for v in groups.by.values()})
    return (f"Main metric x100 on the first eval split at the end of training, mean ± sample std over "
            f"{'/'.join(map(str, seeds))} seed(s); best per column in bold; trainable parameters include the head.")


def table_markdown(groups: Groups, left_out: dict[str, str] | None = None) -> str:
    """table.md: the paper's table as Markdown, with its caption, then the cells left out and why."""
    header, rows = table(groups)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(f"**{t}**" if best else t for t, best in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n\n" + _caption(groups) + "\n"
    if left_out:
        text += f"\nLeft out of this table ({len(left_out)}):\n\n" + "".join(
            f"- {cell}: {why}\n" for cell, why in left_out.items())
    return text


# ----------------------------------------------------------------------------------------------- pictures
def _figure(n: int, title: str, width: float = 4.5, height: float = 3.6):
    from matplotlib.figure import Figure  # the object API: no pyplot, no backend switch

    cols = min(n, 3)
    fig = Figure(figsize=(width * cols, height * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes


def _save(fig, out: Path, name: str) -> list[str]:
    fig.savefig(out / f"{name}.png", dpi=110)
    fig.savefig(out / f"{name}.svg", metadata={"Date": None})
    return [f"{name}.png", f"{name}.svg"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or equal) parameters and a higher score, by parameters."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


MARKERS = "osD^vP*X<>"


def plot_params_vs_metric(groups: Groups, out: Path) -> list[str]:
    """Main metric vs trainable parameters (log x) per task, error bars over seeds, the Pareto front dashed."""
    fig, axes = _figure(len(groups.tasks), "Main metric vs trainable parameters")
    legend = {}  # method -> handle: one legend for the figure (labels beside the points overlap)
    for ax, task in zip(axes, groups.tasks):
        points = []
        for i, m in enumerate(groups.methods):
            mean, std = groups.score(task, m)
            if mean is None:
                continue
            x = groups.params(task, m)
            points.append((x, 100 * mean))
            legend[m] = ax.errorbar(x, 100 * mean, yerr=None if std is None else 100 * std, fmt=MARKERS[i % len(MARKERS)],
                                    capsize=3, color=f"C{i % 10}", label=m)
        front = pareto_front(points)
        legend["Pareto front"] = ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--",
                                         color="0.5", label="Pareto front")[0]
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=f"{groups.metric(task)} x100", title=task)
    fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    return _save(fig, out, "params_vs_metric")


def _curves(ax, runs: list[RunRecord], label: str, color: str, pick) -> None:
    """Mean over runs of the series `pick(run)` {step: value} on their common steps, with a ±std band."""
    import numpy as np

    series = [pick(r) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return
    ys = np.array([[s[k] for k in steps] for s in series], dtype=float)
    mean = np.nanmean(ys, axis=0)
    ax.plot(steps, mean, color=color, label=label)
    if len(series) > 1:
        std = np.nanstd(ys, axis=0, ddof=1)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _per_method_curves(groups: Groups, out: Path, name: str, title: str, ylabel, pick) -> list[str]:
    fig, axes = _figure(len(groups.tasks), title)
    for ax, task in zip(axes, groups.tasks):
        for i, m in enumerate(groups.methods):
            if (task, m) in groups.by:
                _curves(ax, groups.by[(task, m)], m, f"C{i % 10}", pick)
        ax.set(xlabel="step", ylabel=ylabel(task), title=task)
        ax.legend(fontsize=8)
    return _save(fig, out, name)


def _eval_series(r: RunRecord) -> dict[int, float]:
    split = next(iter(r.results.eval_splits or {None: None}))
    return {e["step"]: e.get(r.metric) for e in r.records
            if e.get("kind") == "eval" and e.get("split", split) == split and e.get(r.metric) is not None}


def plot_loss(groups: Groups, out: Path) -> list[str]:
    """Training loss vs step per task: mean over seeds per method, a ±std band."""
    def pick(r: RunRecord):
        return {e["step"]: e["loss"] for e in r.records if e.get("kind", "train") == "train" and "loss" in e}
    if not any(pick(r) for r in groups.runs):
        return []
    return _per_method_curves(groups, out, "loss_curves", "Training loss", lambda t: "training loss", pick)


def plot_eval(groups: Groups, out: Path) -> list[str]:
    """The main metric vs step, where runs evaluated during training (two evaluations or more)."""
    if not any(len(_eval_series(r)) > 1 for r in groups.runs):
        return []
    return _per_method_curves(groups, out, "eval_curves", "Evaluation during training",
                              groups.metric, _eval_series)


def plot_heatmap(groups: Groups, out: Path) -> list[str]:
    """The main metric x100 over (N1, N2), averaged over the spafit runs at each split: a panel per
    task and group-3 variant (LoRA + bias, LoRA only)."""
    import numpy as np

    strata = [r for r in groups.runs if r.results.n1 is not None and r.value is not None]
    if len({(r.results.n1, r.results.n2) for r in strata}) < 2:
        return []
    panels = sorted({(r.task, r.stratum3) for r in strata})
    fig, axes = _figure(len(panels), "SPAFIT: main metric x100 over (N1, N2)", 4.5, 4.0)
    for ax, (task, variant) in zip(axes, panels):
        runs = [r for r in strata if (r.task, r.stratum3) == (task, variant)]
        n1s, n2s = sorted({r.results.n1 for r in runs}), sorted({r.results.n2 for r in runs})
        grid = np.full((len(n1s), len(n2s)), np.nan)
        for a, n1 in enumerate(n1s):
            for b, n2 in enumerate(n2s):
                mean = _mean_std([r.value for r in runs if (r.results.n1, r.results.n2) == (n1, n2)])[0]
                grid[a, b] = np.nan if mean is None else mean
        image = ax.imshow(100 * grid, cmap="viridis", origin="lower", aspect="auto")
        middle = 50 * (np.nanmin(grid) + np.nanmax(grid))
        for (a, b), v in np.ndenumerate(100 * grid):
            if np.isfinite(v):
                ax.text(b, a, f"{v:.1f}", ha="center", va="center", color="k" if v > middle else "w", fontsize=9)
        ax.set(xticks=range(len(n2s)), xticklabels=n2s, yticks=range(len(n1s)), yticklabels=n1s,
               xlabel=f"N2 ({variant} from layer)", ylabel="N1 (bias only from layer)",
               title=task if len({v for _, v in panels}) == 1 else f"{task}: group 3 {variant}")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, out, "heatmap_n1_n2")


def layer_kinds(run: RunRecord) -> list[str] | None:
    """What each encoder layer of a run trains, one of `plan.LAYER_KINDS` per layer: from its results.json
    (`Plan.layer_kinds`), or for results written before it held them, from the plan of its config.yaml
    (`loading.plan_of_shapes`). None when neither is available."""
    if run.results.layer_kinds:
        return list(run.results.layer_kinds)
    from spafit_jax import loading

    return None if run.config is None else loading.plan_of_shapes(run.config).layer_kinds()


def plot_strata(groups: Groups, out: Path) -> list[str]:
    """Layers x methods, each cell coloured by what that layer trains (frozen, bias only, LoRA (+ bias), all)."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = {}
    for m in groups.methods:
        run = next((r for r in groups.runs if r.method == m and (r.results.layer_kinds or r.config)), None)
        try:
            rows[m] = layer_kinds(run) if run is not None else None
        except SpafitError:  # an older run whose model cannot be resolved here (a hub model not in the cache)
            rows[m] = None
    rows = {m: k for m, k in rows.items() if k}
    if not rows:
        return []
    names, width = list(KINDS), max(len(k) for k in rows.values())
    grid = np.full((len(rows), width), np.nan)
    for i, kinds in enumerate(rows.values()):
        grid[i, :len(kinds)] = [names.index(k) for k in kinds]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 3.4 + 0.35 * width), 1.2 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap(list(KINDS.values())), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    ax.set(xticks=range(width), yticks=range(len(rows)), yticklabels=list(rows), title="What each encoder layer trains",
           xlabel="encoder layer (embeddings: frozen but in full; the head always trains)")
    ax.set_xticks(np.arange(-0.5, width), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="w", linewidth=2)
    ax.tick_params(which="minor", length=0)
    used = sorted({k for kinds in rows.values() for k in kinds}, key=names.index)
    ax.legend(handles=[Patch(color=KINDS[k], label=k) for k in used], loc="center left", bbox_to_anchor=(1.01, 0.5),
              fontsize=8, frameon=False)
    return _save(fig, out, "strata")


PICTURES = {"params_vs_metric": plot_params_vs_metric, "loss_curves": plot_loss, "eval_curves": plot_eval,
            "heatmap_n1_n2": plot_heatmap, "strata": plot_strata}


_STYLE = ("<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} td:first-child{text-align:left} "
          "img{max-width:100%}</style>")


def write_html(groups: Groups, left_out: dict[str, str], pictures: list[str], path: Path, title: str) -> None:
    """index.html: the table, the cells left out (failed, unfinished, damaged) and every picture (SVG, linking to the PNG)."""
    header, rows = table(groups)
    esc = html.escape
    cells = "".join("<tr>" + "".join(f"<td>{'<b>' + esc(t) + '</b>' if best else esc(t)}</td>" for t, best in row)
                    + "</tr>\n" for row in rows)
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>{_STYLE}</head>",
             f"<body><h1>{esc(title)}</h1><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n"
             + cells + f"</table><p>{esc(_caption(groups))}</p>",
             "<p><a href='summary.csv'>summary.csv</a> · <a href='table.md'>table.md</a></p>"]
    if left_out:
        parts.append("<h2>Left out of the report</h2><ul>" + "".join(f"<li>{esc(k)}: {esc(v)}</li>"
                                                                     for k, v in left_out.items()) + "</ul>")
    for svg in (p for p in pictures if p.endswith(".svg")):
        png = svg[:-4] + ".png"
        parts.append(f"<h2>{esc(svg[:-4].replace('_', ' '))}</h2><a href='{png}'><img src='{svg}' alt='{esc(svg)}'></a>")
    path.write_text("\n".join(parts) + "\n</body></html>\n", encoding="utf-8")


def write_report(exp: str | Path | None, folders: Sequence[str | Path] = (), out: str | Path | None = None) -> dict[str, Path]:
    """Writes summary.csv, table.md, the pictures and index.html to `out` (default EXP/report); returns {file name: path}."""
    out = Path(out) if out is not None else Path(exp if exp is not None else folders[0]) / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; name a folder for the report (it is created if missing)")
    runs, left_out = collect(exp, folders)
    for cell, why in left_out.items():
        print(f"left out {cell}: {why}", file=sys.stderr)
    if not runs:
        raise ReportError(f"no finished runs (results.json) in {exp}/runs or the folders given; run the experiment first")
    out.mkdir(parents=True, exist_ok=True)
    groups = Groups(runs)
    write_csv(summary_rows(runs), out / "summary.csv")
    (out / "table.md").write_text(table_markdown(groups, left_out), encoding="utf-8")
    pictures = [name for plot in PICTURES.values() for name in plot(groups, out)]
    write_html(groups, left_out, pictures, out / "index.html", f"spafit_jax report: {Path(exp or out).name}")
    return {name: out / name for name in ["summary.csv", "table.md", *pictures, "index.html"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli

    p = argparse.ArgumentParser(prog=cli.program("report"), description=__doc__.split("\n\n")[0])
    p.add_argument("exp", metavar="EXP", help="experiment folder (its runs/), or a run folder")
    p.add_argument("folders", nargs="*", metavar="RUN_FOLDER", help="more run folders to compare")
    p.add_argument("--out", metavar="DIR", help="where to write (default EXP/report)")
    args = p.parse_args(argv)

    def work() -> None:
        if not Path(args.exp).is_dir():
            raise ReportError(f"{args.exp} is not a folder; pass an experiment folder (--workdir of the experiment)")
        files = write_report(args.exp, args.folders, args.out)
        print(f"report: {files['index.html']} ({', '.join(files)})")

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
