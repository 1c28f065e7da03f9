"""The work behind `python -m spafit_jax.protocol` (its command line and --help: `spafit_jax/protocol.py`).

Reads EXP/selection.json (written by `selection`): per task and method the chosen value and its dev score (with
what the choice rests on, its extensions past a grid edge and whether it is bracketed), each entry's `budget`, the
commits the cells ran on, and each seed's test scores (test.json) and test predictions (test_predictions.npz).
Writes to DIR (default EXP/report): table.md, protocol.csv and differences.csv, the dev curves (dev score vs the
searched value, per method) and the search cells' training losses as PNG and SVG. With `budgets:` (methods
labelled `<method>-<budget>`) methods are compared only at the same budget, one table per task and budget, and
each method at a later budget is compared with itself at the first ("does the longer budget help"). `--publish
DIR` writes the same plus the evidence (`evidence.py`: every scored cell's predictions, every cell's results.json
and config.yaml, the counts).

The intervals (`intervals.py`): each method's test score and its difference to the task's best method with a
95 % two-stage bootstrap interval, seeds resampled per method and test examples resampled (one draw shared by
both methods: paired), 2,000 draws, percentile; a difference is marked significant (*) only when that interval
excludes 0. The examples-only interval (seeds held fixed; BCa for accuracy) is the second column: it leaves
out how much the trained models vary between seeds. differences.csv holds every pair of methods of a task,
both intervals. The best method is the one with the highest test mean: the marks say which methods are
distinguishable from it, not a ranking of the others.

Every file read is checked: a damaged or missing one (selection.json, test.json, results.json, predictions
that do not fit their labels or their test.json) is one `error:` line and exit status 2, and nothing is written;
the output folder may hold only files that protocol wrote there itself and nobody changed since
(`.spafit-protocol.json` records their sha256: `outputs.write_files`, the rule report follows too).
"""

from __future__ import annotations

import csv
import io
import statistics
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax.experiments import evidence, intervals
from spafit_jax.training import rundir
from spafit_jax.experiments.intervals import RESAMPLES, examples_only
from spafit_jax.experiments.protocol_files import (
    ProtocolError, check_index, check_labels, check_score, read_json, write_outputs,
)

TABLES = ("table.md", "protocol.csv", "differences.csv")
PICTURES = ("dev_curves.png", "dev_curves.svg", "train_loss.png", "train_loss.svg")


# ----------------------------------------------------------------------------------------------
# Reading the experiment


def _predictions(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(predictions [N], labels [N]) from a seed's test_predictions.npz, checked."""
    path = folder / "test_predictions.npz"
    if not path.is_file():
        raise ProtocolError(f"{path} is missing but test.json says the seed was scored; delete {folder / 'test.json'} "
                            "and rerun the experiment to score it again")
    try:
        with np.load(path, allow_pickle=False) as f:
            logits, labels = f["logits"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ProtocolError(f"{path} is not readable predictions ({type(e).__name__}: {' '.join(str(e).split())[:80]}); delete it and "
                            f"{folder / 'test.json'} and rerun the experiment to score the seed again") from None
    if logits.ndim not in (1, 2) or labels.ndim != 1 or len(logits) != len(labels):
        raise ProtocolError(f"{path}: logits {logits.shape} do not fit labels {labels.shape}; delete it and "
                            f"{folder / 'test.json'} and rerun the experiment to score the seed again")
    return intervals.predictions(logits), labels


def _read_seed(exp: Path, entry: dict, metric: str) -> dict | None:
    folder = exp / entry["folder"]
    if not (folder / "test.json").is_file():
        return None
    fix = "rerun the experiment to score the seed again"
    test = read_json(folder / "test.json", f"delete it and {fix}")
    results = read_json(folder / rundir.RESULTS, "the run is damaged: delete its folder and rerun the experiment")
    if not isinstance(test.get("metrics"), dict) or not isinstance(results.get("eval"), dict):
        raise ProtocolError(f"{folder}: test.json or results.json lacks its metrics; delete test.json and {fix}")
    pred, labels = _predictions(folder)
    if "examples" in test and test["examples"] != len(labels):
        raise ProtocolError(f"{folder}: test_predictions.npz holds {len(labels)} examples, test.json says "
                            f"{test['examples']}; delete both and {fix}")
    check_score(test["metrics"], pred, labels, metric, f"{folder}: test.json's", "test_predictions.npz",
                f"delete both and {fix}")
    return {**entry, "test": test["metrics"], "dev": results["eval"], "pred": pred, "labels": labels,
            "params": results.get("trainable_params"), "train_seconds": results.get("train_seconds"),
            "version": evidence.version_of(results, test)}


def _choice(index: dict, task: str, method: str, path: Path) -> dict:
    choice = index["choices"].get(f"{task}/{method}")
    if choice is None:
        raise ProtocolError(f"{path}: seeds of {task}/{method} but no choice for it; rerun the experiment")
    return choice


def collect(exp: str | Path) -> dict:
    """{"index": selection.json, "runs": {(task, method): [seed records]}}; seeds not scored on test yet are left out."""
    exp = Path(exp)
    path = exp / "selection.json"
    if not exp.is_dir():
        raise ProtocolError(f"{exp} is not a folder; name the experiment's --workdir")
    if not path.is_file():
        raise ProtocolError(f"{path} not found; run the experiment (python -m spafit_jax.experiment with a select: "
                            "section) first")
    index = check_index(read_json(path, "rerun the experiment to write it again"), path)
    runs: dict[tuple[str, str], list] = {}
    for entry in index["seeds"]:
        metric = _choice(index, entry["task"], entry["method"], path)["metric"]
        record = _read_seed(exp, entry, metric)
        if record is not None:
            runs.setdefault((entry["task"], entry["method"]), []).append(record)
    if not runs:
        raise ProtocolError(f"no seed of {exp} has been scored on test yet; let the experiment run on")
    check_labels(runs)
    return {"index": index, "runs": runs}


# ----------------------------------------------------------------------------------------------
# The tables


def _value(point: dict | None) -> str:
    if point is None:
        return "–"
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in point.items())


def family(method: str, budget: str | None) -> str:
    """A method's name before its budget: `lora` of `lora-long` at budget `long` (the name itself without a budget)."""
    return method[:-len(budget) - 1] if budget and method.endswith(f"-{budget}") else method


def groups(runs: dict) -> dict[tuple[str, str | None], list[str]]:
    """{(task, budget): its methods}, tasks and budgets in the order they first appear; budget None when the
    experiment declares no `budgets:`. Methods are compared only within a group."""
    out: dict[tuple[str, str | None], list[str]] = {}
    for (task, method), seeds in runs.items():
        out.setdefault((task, seeds[0].get("budget") or None), []).append(method)
    tasks, budgets = list(dict.fromkeys(t for t, _ in out)), list(dict.fromkeys(b for _, b in out))
    return dict(sorted(out.items(), key=lambda kv: (tasks.index(kv[0][0]), budgets.index(kv[0][1]))))


def _scores(runs: dict, task: str, methods: Sequence[str], metric: str) -> tuple[dict, dict, np.ndarray]:
    """({method: [per-seed predictions]}, {method: [per-seed test score]}, labels) of some methods of one task."""
    preds = {m: [r["pred"] for r in runs[(task, m)]] for m in methods}
    labels = runs[(task, methods[0])][0]["labels"]
    fn = intervals.metric_fn(metric)
    return preds, {m: [fn(p, labels) for p in ps] for m, ps in preds.items()}, labels


def _metric_of(index: dict, task: str) -> str:
    return next(c["metric"] for k, c in index["choices"].items() if k.split("/", 1)[0] == task)


def _search_notes(choice: dict, seeds: Sequence[dict]) -> dict[str, Any]:
    """What a row says of its choice's search (`choices`' fields; None where an older choice file lacks them) and of
    the code its cells ran on (the search cells' `commits` and each seed's results.json `code`)."""
    rests, made = choice.get("rests_on"), choice.get("extensions") or []
    commits = {*(choice.get("commits") or []), *(r["version"] for r in seeds if r.get("version"))}
    return {"rests_on": None if rests is None else len(rests),
            "extensions": ", ".join(_value({e["key"]: e["value"]}) for e in made),
            "bracketed": choice.get("bracketed"), "extension_stopped": choice.get("extension_stopped") or "",
            "commits": ", ".join(sorted(commits))}


def rows(data: dict, *, resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """One row per task, budget and method: choice, dev score, what the choice rests on and whether its grid
    brackets it, test mean/std over seeds with its two-stage interval, the difference to the best method of the same
    task and budget with its two-stage interval (low, high, significant) and its examples-only one, the commits."""
    index, runs = data["index"], data["runs"]
    out = []
    for (task, budget), methods in groups(runs).items():
        metric = _metric_of(index, task)
        preds, scores, labels = _scores(runs, task, methods, metric)
        means = {m: statistics.fmean(v) for m, v in scores.items()}
        best = max(means, key=lambda m: means[m])
        for m in preds:
            seeds, choice = runs[(task, m)], index["choices"][f"{task}/{m}"]
            score = intervals.two_stage(preds[m], None, labels, metric, resamples=resamples)
            # differences.csv's best - m (the same draws) turned round: one interval per pair in both files
            pair = None if m == best else _pair(task, budget or "", best, m, metric, preds, labels, "methods",
                                                resamples)
            out.append({"task": task, "method": m, "budget": budget or "", "metric": metric,
                        "chosen": _value(choice.get("chosen")),
                        "dev": choice.get("dev"), "ties": ", ".join(choice.get("ties") or []),
                        "failed_search": len(choice.get("failed") or []), "seeds": len(seeds), "test_mean": means[m],
                        "test_std": statistics.stdev(scores[m]) if len(seeds) > 1 else None,
                        "test_low": score["low"], "test_high": score["high"],
                        "best": m == best, "diff": None if pair is None else -pair["diff"],
                        "low": None if pair is None else -pair["high"], "high": None if pair is None else -pair["low"],
                        "significant": None if pair is None else pair["significant"],
                        "examples_low": None if pair is None else -pair["examples_high"],
                        "examples_high": None if pair is None else -pair["examples_low"],
                        "params": seeds[0]["params"],
                        "train_seconds": statistics.fmean(r["train_seconds"] or 0.0 for r in seeds),
                        **_search_notes(choice, seeds)})
    return out


def _pair(task: str, budget: str, a: str, b: str, metric: str, preds: dict, labels: np.ndarray, compared: str,
          resamples: int) -> dict[str, Any]:
    hier = intervals.two_stage(preds[a], preds[b], labels, metric, resamples=resamples)
    ex = examples_only(preds[a], preds[b], labels, metric, resamples=resamples)
    return {"task": task, "a": a, "b": b, "metric": metric, "diff": hier["estimate"],
            "low": hier["low"], "high": hier["high"], "significant": hier["significant"],
            "examples_low": ex["low"], "examples_high": ex["high"],
            "examples_significant": ex["significant"], "budget": budget, "compared": compared}


def differences(data: dict, *, resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Every pair of methods of a task and budget (a before b in the order of the table; `compared` "methods"): a - b
    with both intervals; then, with `budgets:`, each method at each later budget minus the same method at the first
    (`compared` "budgets", `budget` "long - base"): whether the longer budget helps."""
    index, runs = data["index"], data["runs"]
    out = []
    for (task, budget), methods in groups(runs).items():
        metric = _metric_of(index, task)
        preds, scores, labels = _scores(runs, task, methods, metric)
        order = sorted(preds, key=lambda m: -statistics.fmean(scores[m]))
        out += [_pair(task, budget or "", a, b, metric, preds, labels, "methods", resamples)
                for i, a in enumerate(order) for b in order[i + 1:]]
    for task in dict.fromkeys(t for t, _ in groups(runs)):
        by_family: dict[str, list[tuple[str, str]]] = {}
        for (t, budget), methods in groups(runs).items():
            for m in methods if t == task and budget else ():
                by_family.setdefault(family(m, budget), []).append((budget, m))
        metric = _metric_of(index, task)
        for pairs in by_family.values():
            (first, b), rest = pairs[0], pairs[1:]
            for later, a in rest:
                preds, _, labels = _scores(runs, task, [a, b], metric)
                out.append(_pair(task, f"{later} - {first}", a, b, metric, preds, labels, "budgets", resamples))
    return out


def _x100(v: float | None, sign: bool = False) -> str:
    return "–" if v is None else f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def _params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _ci(low: float | None, high: float | None, sign: bool = True) -> str:
    return f"[{_x100(low, sign)}, {_x100(high, sign)}]"


def _notes(mine: Sequence[dict]) -> list[str]:
    """The notes under a task's table: ties, failed cells, extensions, choices left on a grid edge, single seeds."""
    notes = [f"{r['method']}: dev tie among {r['ties']}" for r in mine if r["ties"]]
    notes += [f"{r['method']}: {r['failed_search']} search cell(s) failed" for r in mine if r["failed_search"]]
    notes += [f"{r['method']}: grid extended past its edge ({r['extensions']}); the choice rests on "
              f"{r['rests_on']} complete search cells" for r in mine if r["extensions"]]
    notes += [f"{r['method']}: {r['chosen']} (†) sits on the edge of its grid, not bracketed: "
              f"{r['extension_stopped'] or 'no extension was made'}" for r in mine if r["bracketed"] is False]
    notes += [f"{r['method']}: one seed, so its intervals cannot show seed noise" for r in mine if r["seeds"] < 2]
    return notes


def _budget_table(pairs: Sequence[dict]) -> list[str]:
    """The section on whether a longer budget helps: each method at a later budget minus itself at the first."""
    if not pairs:
        return []
    lines = ["### Does the longer budget help? (x100)", "",
             "| Task | Method | Budgets | Δ [95% CI] | | Δ [95% CI, examples only] |", "|---|---|---|---:|---|---:|"]
    for d in pairs:
        lines.append(f"| {d['task']} ({d['metric']}) | {family(d['b'], d['budget'].rsplit(' - ', 1)[-1])} | "
                     f"{d['a']} − {d['b']} | {_x100(d['diff'], True)} {_ci(d['low'], d['high'])} | "
                     f"{'*' if d['significant'] else ''} | {_ci(d['examples_low'], d['examples_high'])} |")
    return [*lines, ""]


def commits_note(index: dict, table: Sequence[dict]) -> str:
    """The line on the code the experiment ran on: selection.json's `commits` (finished cells per commit) and
    `mixed_commits`, else the commits the table's rows recorded."""
    counts = index.get("commits")
    if isinstance(counts, dict) and counts:
        named = ", ".join(f"{k} ({v} cells)" for k, v in counts.items())
        if index.get("mixed_commits") or len(counts) > 1:
            return (f"Code: MIXED COMMITS (the experiment ran with --allow-mixed-commits): {named}; each row's "
                    "commits are in protocol.csv, each cell's in the evidence's cells.json.")
        return f"Code: every finished cell ran on commit {named}."
    seen = sorted({c for r in table for c in r["commits"].split(", ") if c})
    if len(seen) > 1:
        return f"Code: MIXED COMMITS: {', '.join(seen)}; each row's commits are in protocol.csv."
    return f"Code: commit {seen[0]}." if seen else "Code: the cells recorded no commit."


def table_markdown(table: Sequence[dict], budget_pairs: Sequence[dict] = (), index: dict | None = None) -> str:
    """table.md: one section per task (and budget); the best test mean in bold, * where the seeds-and-examples
    interval excludes 0, † on a choice left on its grid's edge; then whether the longer budget helps
    (`budget_pairs`, `differences`' "budgets" rows) and, with `index`, the commits the cells ran on."""
    lines = []
    for task, budget in dict.fromkeys((r["task"], r.get("budget", "")) for r in table):
        mine = sorted((r for r in table if (r["task"], r.get("budget", "")) == (task, budget)),
                      key=lambda r: -r["test_mean"])
        metric = mine[0]["metric"]
        lines += [f"### {task}{f', budget {budget}' if budget else ''} ({metric} x100)", "",
                  "| Method | Trainable | Chosen | Dev | Test mean ± std (seeds) [95% CI] | Δ to best [95% CI] | | "
                  "Δ [95% CI, examples only] |",
                  "|---|---:|---|---:|---:|---:|---|---:|"]
        for r in mine:
            std = "" if r["test_std"] is None else f" ± {_x100(r['test_std'])}"
            test = f"{_x100(r['test_mean'])}{std} ({r['seeds']})"
            test = f"{'**' + test + '**' if r['best'] else test} {_ci(r['test_low'], r['test_high'], False)}"
            diff = "best" if r["best"] else f"{_x100(r['diff'], True)} {_ci(r['low'], r['high'])}"
            ex = "" if r["best"] else _ci(r["examples_low"], r["examples_high"])
            chosen = f"{r['chosen']} †" if r.get("bracketed") is False else r["chosen"]
            lines.append(f"| {r['method']} | {_params(r['params'])} | {chosen} | {_x100(r['dev'])} | {test} | "
                         f"{diff} | {'*' if r['significant'] else ''} | {ex} |")
        notes = _notes(mine)
        lines += ["", *(f"- {n}" for n in notes), ""] if notes else [""]
    lines += _budget_table(budget_pairs)
    lines.append("Chosen: the searched value with the best dev score (a dev split carved from the training data); "
                 "Test: the untouched test split, mean ± sample std over seeds, with a 95% interval; Δ: the method's "
                 "test score minus the best method's, averaged over seeds. Intervals: two-stage bootstrap, seeds "
                 "resampled per method, then test examples (paired between methods), "
                 f"{RESAMPLES} draws, percentile; * that interval excludes 0. Examples only: the seeds held fixed, "
                 "test examples resampled (BCa for accuracy), which leaves seed noise out. Every pair: differences.csv.")
    if any(r.get("budget") for r in table):
        lines.append("Budgets (`budgets:`): every method trained at every budget of the experiment file (a rerun that "
                     "changes them is refused); methods are compared only at the same budget.")
    if index is not None:
        lines.append(commits_note(index, table))
    return "\n".join(lines) + "\n"


def csv_text(table: Sequence[dict]) -> str:
    """The rows of `rows` or `differences` as CSV text (protocol.csv, differences.csv)."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["task"])
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def tables(data: dict, *, resamples: int = RESAMPLES) -> dict[str, str]:
    """{file name: text} of table.md, protocol.csv and differences.csv."""
    table, pairs = rows(data, resamples=resamples), differences(data, resamples=resamples)
    budget_pairs = [d for d in pairs if d["compared"] == "budgets"]
    return {"table.md": table_markdown(table, budget_pairs, data["index"]), "protocol.csv": csv_text(table),
            "differences.csv": csv_text(pairs)}


# ----------------------------------------------------------------------------------------------
# Writing and the command


def write_report(exp: str | Path, out: str | Path | None = None, *, resamples: int = RESAMPLES,
                 publish: bool = False) -> dict[str, Path]:
    """Writes table.md, protocol.csv, differences.csv, dev_curves.png/svg and train_loss.png/svg to `out` (default
    EXP/report), plus the evidence when `publish`; returns {name: path}. Nothing is written when anything fails."""
    from spafit_jax.experiments.protocol_plots import plot_dev_curves, plot_train_loss

    exp = Path(exp)
    data = collect(exp)
    out = Path(out) if out is not None else exp / "report"
    texts = tables(data, resamples=resamples)
    extra = evidence.build(exp, data) if publish else {}

    def pictures(folder: Path) -> list[str]:
        return plot_dev_curves(exp, data["index"], folder) + plot_train_loss(exp, data["index"], folder)

    names = [*TABLES, *PICTURES, *extra]
    written = write_outputs(out, {**texts, **extra}, pictures, names, flag="--publish" if publish else "--out")
    return {name: out / name for name in written}


def recompute(published: str | Path, out: str | Path | None = None, *, resamples: int = RESAMPLES) -> list[str]:
    """Recomputes table.md, protocol.csv and differences.csv from a published folder's evidence. With `out`, writes
    them there and returns []; else compares them with the published ones and returns the names that differ."""
    published = Path(published)
    texts = tables(evidence.read(published), resamples=resamples)
    if out is not None:
        write_outputs(Path(out), texts, None, list(TABLES), flag="--out")
        return []
    differ = []
    for name, text in texts.items():
        path = published / name
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            differ.append(name)
    return differ
