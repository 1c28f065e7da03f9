"""`python -m spafit_jax.protocol EXP [--out DIR]`: the report of an experiment run with a `select:` section.

Reads EXP/selection.json (written by `selection`): per task and method the chosen value and its dev
score, and each seed's test scores (test.json) and test predictions (test_predictions.npz). Writes
to DIR (default EXP/report): table.md and protocol.csv (chosen value, dev score, test mean ± sample
std over seeds, the difference to the task's best method with its 95 % paired-bootstrap interval,
trainable parameters), the dev curves (dev score vs the searched value, per method) and the search
cells' training losses as PNG and SVG.

The interval: the test examples are resampled with replacement (the same draw for both methods: the
comparison is paired); on each draw the statistic is the method's score minus the best method's, each
averaged over its seeds (the seeds' predictions of one example stay together). scipy.stats.bootstrap
(BCa) gives the interval from 2,000 draws; a difference is marked significant (*) when its interval
excludes 0. The best method is the one with the highest test mean: the marks say which methods are
distinguishable from it, not a ranking of the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax import metricslog, rundir
from spafit_jax.errors import SpafitError

RESAMPLES, CONFIDENCE = 2000, 0.95


class ProtocolError(SpafitError):
    """Nothing to report: no selection.json, or no seed scored on test yet."""


def _per_example(metric: str) -> Callable | None:
    """A per-example score whose mean is `metric` (None when the metric does not decompose, e.g. F1)."""
    if metric == "accuracy":
        return lambda logits, labels: (logits.argmax(-1) == labels).astype(np.float64)
    return None


def _metric_fn(metric: str) -> Callable:
    from spafit_jax import metrics

    table = {**metrics.CLASSIFICATION, **metrics.REGRESSION}
    if metric not in table:
        raise ProtocolError(f"metric {metric!r} has no bootstrap here; use one of {', '.join(sorted(table))}")
    return lambda logits, labels: table[metric](logits.argmax(-1) if logits.ndim == 2 and logits.shape[1] > 1
                                                else logits.reshape(-1), labels)


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray, metric: str, *,
                     resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The difference mean_seeds metric(a) - mean_seeds metric(b) on the test examples, and its paired-bootstrap
    interval over examples: `a`, `b` are each method's per-seed logits [N, C] (or scores [N]) on the same
    examples, `labels` [N]. Returns {difference, low, high, significant}."""
    from scipy import stats

    labels = np.asarray(labels)
    per_example = _per_example(metric)
    if per_example is not None:  # the difference of means is the mean of per-example differences
        d = np.mean([per_example(x, labels) for x in a], axis=0) - np.mean([per_example(x, labels) for x in b], axis=0)
        data, statistic, vectorized = (d,), lambda x, axis=-1: np.mean(x, axis=axis), True
        point = float(d.mean())
    else:
        fn = _metric_fn(metric)

        def statistic(idx):
            idx = idx.astype(int)
            return (np.mean([fn(x[idx], labels[idx]) for x in a]) - np.mean([fn(x[idx], labels[idx]) for x in b]))

        data, vectorized = (np.arange(len(labels)),), False
        point = float(statistic(data[0]))
    if np.ptp(data[0]) == 0 and per_example is not None:  # every resample gives the same difference
        return {"difference": point, "low": point, "high": point, "significant": point != 0}
    res = stats.bootstrap(data, statistic, vectorized=vectorized, n_resamples=resamples, confidence_level=confidence,
                          method="BCa", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"difference": point, "low": low, "high": high, "significant": not (low <= 0 <= high)}


# ----------------------------------------------------------------------------------------------
# Reading the experiment


def _read_seed(exp: Path, entry: dict) -> dict | None:
    folder = exp / entry["folder"]
    if not (folder / "test.json").is_file() or not (folder / rundir.RESULTS).is_file():
        return None
    test = json.loads((folder / "test.json").read_text())
    results = json.loads((folder / rundir.RESULTS).read_text())
    with np.load(folder / "test_predictions.npz") as f:
        logits, labels = f["logits"], f["labels"]
    return {**entry, "test": test["metrics"], "dev": results["eval"], "logits": logits, "labels": labels,
            "params": results.get("trainable_params"), "train_seconds": results.get("train_seconds")}


def collect(exp: str | Path) -> dict:
    """{"index": selection.json, "runs": {(task, method): [seed records]}}; seeds not scored on test yet are left out."""
    exp = Path(exp)
    path = exp / "selection.json"
    if not path.is_file():
        raise ProtocolError(f"{path} not found; run the experiment (python -m spafit_jax.experiment with a select: "
                            "section) first")
    index = json.loads(path.read_text())
    runs: dict[tuple[str, str], list] = {}
    for entry in index["seeds"]:
        record = _read_seed(exp, entry)
        if record is not None:
            runs.setdefault((entry["task"], entry["method"]), []).append(record)
    if not runs:
        raise ProtocolError(f"no seed of {exp} has been scored on test yet; let the experiment run on")
    return {"index": index, "runs": runs}


def _value(point: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in point.items())


def rows(data: dict, *, resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """One row per task and method: choice, dev score, test mean/std over seeds, difference to the best with its CI."""
    index, runs = data["index"], data["runs"]
    out = []
    for task in dict.fromkeys(t for t, _ in runs):
        choices = {m.split("/", 1)[1]: c for m, c in index["choices"].items() if m.split("/", 1)[0] == task}
        metric = next(iter(choices.values()))["metric"]
        methods = [m for (t, m) in runs if t == task]
        means = {m: statistics.fmean(r["test"][metric] for r in runs[(task, m)]) for m in methods}
        best = max(methods, key=lambda m: means[m])
        labels = runs[(task, best)][0]["labels"]
        for m in methods:
            seeds, choice = runs[(task, m)], choices[m]
            values = [r["test"][metric] for r in seeds]
            ci = None if m == best else paired_bootstrap([r["logits"] for r in seeds],
                                                         [r["logits"] for r in runs[(task, best)]], labels, metric,
                                                         resamples=resamples)
            out.append({"task": task, "method": m, "metric": metric, "chosen": _value(choice["chosen"]),
                        "dev": choice["dev"], "ties": ", ".join(choice["ties"]),
                        "failed_search": len(choice["failed"]), "seeds": len(values), "test_mean": means[m],
                        "test_std": statistics.stdev(values) if len(values) > 1 else None,
                        "best": m == best, "diff": None if ci is None else ci["difference"],
                        "low": None if ci is None else ci["low"], "high": None if ci is None else ci["high"],
                        "significant": None if ci is None else ci["significant"],
                        "params": seeds[0]["params"],
                        "train_seconds": statistics.fmean(r["train_seconds"] or 0.0 for r in seeds)})
    return out


# ----------------------------------------------------------------------------------------------
# Writing


def _x100(v: float | None, sign: bool = False) -> str:
    return "–" if v is None else f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def _params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table_markdown(table: Sequence[dict]) -> str:
    """table.md: one section per task; the best test mean in bold, * where the interval excludes 0."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in table):
        mine = sorted((r for r in table if r["task"] == task), key=lambda r: -r["test_mean"])
        metric = mine[0]["metric"]
        lines += [f"### {task} ({metric} x100)", "",
                  "| Method | Trainable | Chosen | Dev | Test mean ± std (seeds) | Δ to best [95% CI] | |",
                  "|---|---:|---|---:|---:|---:|---|"]
        for r in mine:
            std = "" if r["test_std"] is None else f" ± {_x100(r['test_std'])}"
            test = f"{_x100(r['test_mean'])}{std} ({r['seeds']})"
            diff = "best" if r["best"] else f"{_x100(r['diff'], True)} [{_x100(r['low'], True)}, {_x100(r['high'], True)}]"
            lines.append(f"| {r['method']} | {_params(r['params'])} | {r['chosen']} | {_x100(r['dev'])} | "
                         f"{'**' + test + '**' if r['best'] else test} | {diff} | {'*' if r['significant'] else ''} |")
        notes = [f"{r['method']}: dev tie among {r['ties']}" for r in mine if r["ties"]]
        notes += [f"{r['method']}: {r['failed_search']} search cell(s) failed" for r in mine if r["failed_search"]]
        lines += ["", *(f"- {n}" for n in notes), ""] if notes else [""]
    lines.append("Chosen: the searched value with the best dev score (a dev split carved from the training data); "
                 "Test: the untouched test split, mean ± sample std over seeds; Δ: the method's test score minus the "
                 "best method's, averaged over seeds, with a 95% paired-bootstrap interval over test examples "
                 f"({RESAMPLES} resamples, BCa); * the interval excludes 0.")
    return "\n".join(lines) + "\n"


def write_csv(table: Sequence[dict], path: Path) -> None:
    """protocol.csv: the rows of `rows`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def _dev_points(exp: Path, index: dict) -> dict:
    """{task: {method: [(value, dev score)]}} of the finished search cells, by the first searched key."""
    out: dict = {}
    for e in index["search"]:
        folder = exp / e["folder"]
        if not (folder / rundir.RESULTS).is_file():
            continue
        res = json.loads((folder / rundir.RESULTS).read_text())
        value = next(iter(e["point"].values()))
        score = res["eval"][res["best"]["metric"]]
        if isinstance(value, (int, float)) and math.isfinite(score):
            out.setdefault(e["task"], {}).setdefault(e["method"], []).append((value, score, res["best"]["metric"]))
    return out


def plot_dev_curves(exp: Path, index: dict, out: Path) -> list[str]:
    """dev_curves.png/svg: dev score vs the searched value (log x) per method, one panel per task; chosen values ringed."""
    from spafit_jax.pictures import MARKERS, figure, save

    points = _dev_points(exp, index)
    if not points:
        return []
    key = next(iter(index["search"][0]["point"]))
    fig, axes = figure(len(points), f"Dev score vs {key} (chosen value ringed)")
    for ax, (task, methods) in zip(axes, points.items()):
        for i, (m, pts) in enumerate(methods.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}",
                    label=m)
            chosen = index["choices"].get(f"{task}/{m}")
            if chosen and chosen["chosen"] is not None:
                ax.plot([next(iter(chosen["chosen"].values()))], [100 * chosen["dev"]], "o", ms=12, mfc="none",
                        color=f"C{i % 10}")
        ax.set(xscale="log", xlabel=key, ylabel=f"dev {pts[0][2]} x100", title=task)
        ax.legend(fontsize=7)
    return save(fig, out, "dev_curves")


def _losses(folder: Path) -> dict[int, float]:
    path = folder / rundir.METRICS
    if not path.is_file():
        return {}
    return {r["step"]: r["loss"] for _, r in metricslog.read_metrics(path) if r.get("kind", "train") == "train" and "loss" in r}


def plot_train_loss(exp: Path, index: dict, out: Path) -> list[str]:
    """train_loss.png/svg: training loss vs step of every searched value per method (the chosen one solid), one
    panel per task and method: whether the budget let each method converge at its chosen value."""
    from spafit_jax.pictures import figure, save

    panels: dict = {}
    for e in index["search"]:
        losses = _losses(exp / e["folder"])
        if losses:
            panels.setdefault((e["task"], e["method"]), []).append((e, losses))
    if not panels:
        return []
    fig, axes = figure(len(panels), "Training loss (chosen value solid)", width=3.4, height=2.6)
    for ax, ((task, method), runs) in zip(axes, panels.items()):
        chosen = (index["choices"].get(f"{task}/{method}") or {}).get("label")
        for i, (e, losses) in enumerate(runs):
            steps = sorted(losses)
            ax.plot(steps, [losses[k] for k in steps], color=f"C{i % 10}", ls="-" if e["label"] == chosen else ":",
                    label=_value(e["point"]))
        ax.set(title=f"{task} / {method}", xlabel="step", ylabel="training loss")
        ax.legend(fontsize=6)
    return save(fig, out, "train_loss")


def write_report(exp: str | Path, out: str | Path | None = None, *, resamples: int = RESAMPLES) -> dict[str, Path]:
    """Writes table.md, protocol.csv, dev_curves.png/svg and train_loss.png/svg to `out` (default EXP/report); returns {name: path}."""
    exp = Path(exp)
    data = collect(exp)
    out = Path(out) if out is not None else exp / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = rows(data, resamples=resamples)
    (out / "table.md").write_text(table_markdown(table), encoding="utf-8")
    write_csv(table, out / "protocol.csv")
    pictures = plot_dev_curves(exp, data["index"], out) + plot_train_loss(exp, data["index"], out)
    return {name: out / name for name in ["table.md", "protocol.csv", *pictures]}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli

    p = argparse.ArgumentParser(prog=cli.program("protocol"), description=__doc__.split("\n\n")[0])
    p.add_argument("exp", metavar="EXP", help="the experiment folder (--workdir of an experiment with select:)")
    p.add_argument("--out", metavar="DIR", help="where to write (default EXP/report)")
    args = p.parse_args(argv)

    def work() -> None:
        files = write_report(args.exp, args.out)
        print(f"report: {', '.join(str(f) for f in files.values())}")

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
