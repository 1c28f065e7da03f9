"""An experiment's `select:` section: each method's value chosen per task on a dev split, then its seeds scored on test.

    select:
      grid: {train.lr: [1.0e-3, 3.0e-3, 1.0e-2]}             # searched for every method
      methods: {full: {train.lr: [3.0e-5, 1.0e-4, 3.0e-4]}}  # a method's own grid (key by key over grid)
      dev: {fraction: 0.2, seed: 0}      # carved from the train split; or {size: 300, seed: 0}; or {split: NAME};
                                         # tasks: {tweets: {size: 300}} gives a task its own
      seed: 0                            # the search cells' train.seed (default: the experiment's first seed)

The dev split is carved once per task from the task's whole train split (`devsplit`: stratified by
class for classification, seeded, sharing no text with what trains or the test split) and written as files, so every cell of a task
reads the same examples; the test split is the task's first eval split and no choice ever sees it.
Every cell trains on `data/<task>/train.jsonl` (`data.limit_train` still draws each seed's subset
from it) and the trainer scores it on `dev.jsonl`. In the experiment folder EXP:

    data/<task>/{train,dev,test}.jsonl, split.json   the splits (a rerun checks it would carve the same)
    search/runs/<task>/<method>@lr=<v>/seed<k>      the search cells
    choices/<task>/<method>.json                    the choice: written once, when every search cell of the
                                                    method has finished or failed; a rerun reads it
    runs/<task>/<method>/seed<k>                    the seeds at the chosen value; after training each
                                                    predicts test.jsonl: test.json, test_predictions.npz
    report/                                         the protocol report (`protocol`)

The choice is the best dev score of the task's main metric (`select.metric` names another); a tie is
broken by the task's other metrics in order, then by grid order, and recorded. A failed search cell
(error.txt, or a non-finite dev score) is left out and recorded; a method whose every search cell
failed gets no choice and no seeds. A seed whose config equals a search cell's (select.seed is one
of the seeds) is that cell: it is not trained twice. The search runs method by method (each on every task);
once a method's search is complete its choice is made and its first seed scored, then the other seeds run seed by seed;
--only, --shard and --dry-run apply to both; a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spafit_jax import config as config_lib
from spafit_jax import grid as grid_lib
from spafit_jax import rundir
from spafit_jax.devsplit import Dev, SelectError, Split, parse_dev, splits
from spafit_jax.errors import SpafitError

SELECT_KEYS = ("grid", "methods", "dev", "seed", "metric")
SEARCH, CHOICES = "search", "choices"
TEST_JSON, TEST_PREDICTIONS = "test.json", "test_predictions.npz"
TIE = 1e-12  # dev scores closer than this are a tie


@dataclasses.dataclass(frozen=True)
class Search:
    """The parsed `select:` section."""

    grid: dict[str, list]
    methods: dict[str, dict[str, list]]
    dev: dict[str, Dev]  # by task; "" for tasks not named in select.dev.tasks
    seed: int
    metric: str | None

    def points(self, method: str) -> list[dict[str, Any]]:
        """The grid points of a method (its own grid by its label, else by its name before '@', over the common one)."""
        own = self.methods.get(method, self.methods.get(method.split("@")[0], {}))
        grid = {**self.grid, **own}
        keys = list(grid)
        out = [{}]
        for key in keys:
            out = [{**p, key: v} for p in out for v in grid[key]]
        return out


@dataclasses.dataclass(frozen=True)
class Placed(grid_lib.Cell):
    """A cell whose run folder is `EXP/<at>` (search cells, and seeds that are a search cell)."""

    at: str = ""
    base: str = ""  # the experiment's method label (without the searched values)
    point: tuple = ()  # the searched (key, value) pairs

    def folder(self, workdir: str | os.PathLike) -> Path:
        return Path(workdir) / self.at


def wanted(path: str | os.PathLike) -> bool:
    """Whether the experiment file has a `select:` section (False when it cannot be read: the runner says why)."""
    try:
        data = yaml.safe_load(grid_lib.experiment_file(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("select") is not None


# ----------------------------------------------------------------------------------------------
# The section


def parse(raw: Any, tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], where: str) -> Search:
    """The `select:` section as a Search; `tasks` and `methods` are the experiment's names (for `select.methods`
    and `select.dev.tasks`)."""
    if not isinstance(raw, dict) or not raw:
        raise SelectError(f"{where}: must be a mapping, e.g. {{grid: {{train.lr: [1.0e-3, 3.0e-3]}}, dev: {{fraction: 0.2}}}}")
    unknown = [k for k in raw if k not in SELECT_KEYS]
    if unknown:
        raise SelectError(f"{where}: unknown key '{unknown[0]}'; keys are: {', '.join(SELECT_KEYS)}")
    grid = grid_lib.parse_grid(raw.get("grid"), f"{where}.grid")
    own = raw.get("methods") or {}
    if not isinstance(own, dict):
        raise SelectError(f"{where}.methods: must map method names to grids, e.g. {{full: {{train.lr: [1.0e-4]}}}}")
    names = set(methods) | {m.split("@")[0] for m in methods}
    for name in own:
        if name not in names:
            raise SelectError(f"{where}.methods: '{name}' is not a method of this experiment ({', '.join(methods)})")
    own = {name: grid_lib.parse_grid(g, f"{where}.methods.{name}") for name, g in own.items()}
    if not grid and not any(own.values()):
        raise SelectError(f"{where}: nothing to search; give grid: {{train.lr: [...]}} or a grid per method")
    seed = raw.get("seed", seeds[0])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SelectError(f"{where}.seed: must be an integer, got {seed!r}")
    metric = raw.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise SelectError(f"{where}.metric: must name a metric, e.g. accuracy, got {metric!r}")
    return Search(grid, own, parse_dev(raw.get("dev"), tasks, f"{where}.dev"), seed, metric)


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[list[grid_lib.Cell], Search, list[str]]:
    """(the experiment's cells, its Search, notes) of an experiment file with a `select:` section."""
    cells, notes = grid_lib.load_experiment(path, overrides)
    data = yaml.safe_load(grid_lib.experiment_file(path).read_text(encoding="utf-8"))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    search = parse(data.get("select"), list(dict.fromkeys(c.task for c in cells)),
                   list(dict.fromkeys(c.method for c in cells)), seeds, f"{path}: select")
    return cells, search, notes


# ----------------------------------------------------------------------------------------------
# Cells and choices


def _label(method: str, point: dict[str, Any]) -> str:
    shorts = [k.rsplit(".", 1)[-1] for k in point]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, point)]
    return method + ("," if "@" in method else "@") + ",".join(f"{n}={json.dumps(v)}" for n, v in zip(names, point.values()))


def _with(cell: grid_lib.Cell, split: Split, point: dict, seed: int, at: str, method: str) -> Placed:
    """`cell` reading the carved splits, at grid `point` and `seed`, run in EXP/`at` (the point wins over every key)."""
    base = [o for o in cell.overrides if not o.startswith("train.seed=")]
    keys = [*base, *split.overrides(), *(grid_lib.override(k, v) for k, v in point.items()), f"train.seed={seed}"]
    return Placed(cell.task, method, seed, cell.paths, tuple(keys), at=at, base=cell.method, point=tuple(point.items()))


def search_cells(cells: Sequence[grid_lib.Cell], search: Search, split_of: dict[str, Split]) -> list[Placed]:
    """The search cells: per method, task and grid point (method by method, so that a grid cut short has whole
    methods on every task), one cell at `search.seed` scored on dev."""
    first = {(c.task, c.method): c for c in reversed(cells)}
    methods, tasks = list(dict.fromkeys(c.method for c in cells)), list(dict.fromkeys(c.task for c in cells))
    out = []
    for (task, method), cell in sorted(first.items(), key=lambda kv: (methods.index(kv[0][1]), tasks.index(kv[0][0]))):
        for point in search.points(method):
            label = _label(method, point)
            out.append(_with(cell, split_of[task], point, search.seed, f"{SEARCH}/runs/{task}/{label}/seed{search.seed}", label))
    return out


def seed_cells(cells: Sequence[grid_lib.Cell], choices: dict, split_of: dict[str, Split],
               search: Sequence[Placed]) -> list[Placed]:
    """The seeds of every chosen (task, method) at its chosen value; one equal to a search cell runs there."""
    same = {_key(c): c.at for c in search}
    out = []
    for cell in cells:
        choice = choices.get((cell.task, cell.method))
        if not choice or choice.get("chosen") is None:
            continue
        placed = _with(cell, split_of[cell.task], choice["chosen"], cell.seed,
                       f"runs/{cell.task}/{cell.method}/seed{cell.seed}", cell.method)
        out.append(dataclasses.replace(placed, at=same.get(_key(placed), placed.at)))
    return out


@functools.lru_cache(maxsize=None)
def _key(cell: grid_lib.Cell) -> str:
    """The cell's whole config as text (two cells with the same key train the same run)."""
    return json.dumps(config_lib.to_dict(cell.config()), sort_keys=True)


def _outcome(folder: Path, metric: str | None) -> dict:
    """A search cell's state: done (with its dev metrics), failed (with the error) or todo."""
    results = folder / rundir.RESULTS
    if results.is_file():
        res = json.loads(results.read_text())
        dev, name = res["eval"], metric or res["best"]["metric"]
        if name not in dev:
            raise SelectError(f"select.metric={name!r} is not among the dev metrics of {folder} ({', '.join(dev)})")
        if not math.isfinite(dev[name]):
            return {"status": "failed", "error": f"dev {name} is {dev[name]}"}
        return {"status": "done", "dev": dev, "metric": name}
    if (folder / rundir.ERROR).is_file():
        return {"status": "failed", "error": (folder / rundir.ERROR).read_text().strip()}
    return {"status": "todo"}


def choose(candidates: Sequence[dict], metric: str, order: Sequence[str]) -> dict:
    """The choice among `candidates` ({point, label, status, dev}): the best dev `metric`, ties broken by the
    metrics in `order`, then by grid order; failed ones are left out and listed. None chosen when all failed."""
    done = [c for c in candidates if c["status"] == "done"]
    best, ties, broken_by = None, [], None
    if done:
        top = max(c["dev"][metric] for c in done)
        tied = [c for c in done if top - c["dev"][metric] <= TIE]
        ties = [c["label"] for c in tied] if len(tied) > 1 else []
        for other in [m for m in order if m != metric]:
            if len(tied) == 1:
                break
            second = max(c["dev"].get(other, -math.inf) for c in tied)
            narrowed = [c for c in tied if second - c["dev"].get(other, -math.inf) <= TIE]
            broken_by = other if len(narrowed) < len(tied) else broken_by
            tied = narrowed
        if len(tied) > 1:
            broken_by = broken_by or "grid order"
        best = tied[0]
    return {"chosen": None if best is None else best["point"], "label": None if best is None else best["label"],
            "metric": metric, "dev": None if best is None else best["dev"][metric], "ties": ties,
            "tie_broken_by": broken_by if ties else None,
            "failed": [{"label": c["label"], "error": c["error"]} for c in candidates if c["status"] == "failed"],
            "candidates": [{"label": c["label"], "point": c["point"], "status": c["status"],
                            "dev": c.get("dev")} for c in candidates]}


def decide(search: Search, placed: Sequence[Placed], workdir: Path, *, write: bool) -> tuple[dict, list[str]]:
    """({(task, method): choice}, notes): recorded choices are read back, never made again; a (task, method) whose
    search cells have all finished or failed is chosen now (and recorded when `write`); others are pending."""
    groups: dict[tuple[str, str], list] = {}
    for cell in placed:
        groups.setdefault((cell.task, cell.base), []).append(
            {"point": dict(cell.point), "label": cell.method, **_outcome(cell.folder(workdir), search.metric)})
    choices, notes = {}, []
    for (task, method), cands in groups.items():
        path = workdir / CHOICES / task / f"{method}.json"
        if path.is_file():
            choices[(task, method)] = json.loads(path.read_text())
            recorded = [c["label"] for c in choices[(task, method)]["candidates"]]
            if recorded != [c["label"] for c in cands]:
                notes.append(f"{task}/{method}: chosen before among {', '.join(recorded)}; delete {path} to choose again")
            continue
        if any(c["status"] == "todo" for c in cands):
            continue
        done = [c for c in cands if c["status"] == "done"]
        order = list(done[0]["dev"]) if done else []
        choice = choose(cands, done[0]["metric"] if done else (search.metric or "-"), order)
        choices[(task, method)] = choice
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_atomic(path, json.dumps(choice, indent=2) + "\n", per_process=True)
    return choices, notes


# ----------------------------------------------------------------------------------------------
# Test scores and the driver


def score_test(folder: Path, split: Split) -> dict:
    """Predicts the task's test.jsonl with the run in `folder` (its best checkpoint by the dev metric), writes
    `test.json` (metrics, size, step) and `test_predictions.npz` (logits, labels) there; returns test.json's record."""
    import numpy as np

    from spafit_jax import metrics, run as run_lib
    from spafit_jax.sources import check_rows, read_file

    loaded = run_lib.load_run(folder, "best")
    path = split.folder / "test.jsonl"
    ex = check_rows(read_file(path), loaded.spec, str(path))
    logits = loaded.logits(ex.texts_a, ex.texts_b, batch_size=loaded.config.train.eval_batch_size)
    record = {"split": split.info["test"], "examples": len(ex), "step": loaded.step,
              "metrics": metrics.compute_metrics(loaded.spec, logits, ex.labels),
              "sha256": split.info["sha256"]["test"]}
    tmp = folder / f".{TEST_PREDICTIONS}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, logits=logits, labels=ex.labels)
    tmp.replace(folder / TEST_PREDICTIONS)
    rundir.write_atomic(folder / TEST_JSON, json.dumps(record, indent=2) + "\n")
    return record


def _pick(cells: list, args) -> list:
    """--only / --shard over one list of cells; no match is an empty list here (main checks both lists)."""
    try:
        return grid_lib.select(cells, args.only, args.shard) if cells else []
    except grid_lib.ExperimentError as e:
        if args.shard and "--shard" in str(e):
            raise
        return []


def _state(folder: Path) -> str:
    return ("finished" if (folder / rundir.RESULTS).exists() else "failed before" if (folder / rundir.ERROR).exists()
            else "unfinished" if folder.exists() else "to do")


def write_index(workdir: Path, split_of: dict[str, Split], search: Sequence[Placed], choices: dict,
                seeds: Sequence[Placed]) -> Path:
    """EXP/selection.json: the splits, the search cells, the choices and the seed cells with their folders
    (what `protocol` reads)."""
    index = {"splits": {t: s.info for t, s in split_of.items()},
             "search": [{"task": c.task, "method": c.base, "label": c.method, "point": dict(c.point), "seed": c.seed,
                         "folder": c.at} for c in search],
             "choices": {f"{t}/{m}": ch for (t, m), ch in choices.items()},
             "seeds": [{"task": c.task, "method": c.base, "seed": c.seed, "folder": c.at} for c in seeds]}
    path = workdir / "selection.json"
    rundir.write_atomic(path, json.dumps(index, indent=1) + "\n", per_process=True)
    return path


def _dry_run(search_all, search_mine, choices, seeds_mine, pending, workdir: Path) -> int:
    for i, cell in enumerate(search_mine, 1):
        print(f"search [{i}/{len(search_mine)}] {cell.name}: {_state(cell.folder(workdir))} -> {cell.folder(workdir)}")
    for (task, method), choice in choices.items():
        print(f"choice {task}/{method}: " + (f"{choice['label']} (dev {choice['metric']} {choice['dev']:.4f})"
                                             if choice["chosen"] is not None else "none (every search cell failed)"))
    for task, method in pending:
        print(f"choice {task}/{method}: waits for its search cells")
    for i, cell in enumerate(seeds_mine, 1):
        folder = cell.folder(workdir)
        tested = " (test scored)" if (folder / TEST_JSON).exists() else ""
        print(f"seed [{i}/{len(seeds_mine)}] {cell.name}: {_state(folder)}{tested} -> {folder}")
    return 0


def search_then_test(args) -> int:
    """Runs an experiment with a `select:` section (the arguments of `experiment.build_parser`): the search cells,
    the choices, then the seeds at the chosen values with their test scores, then the protocol report.
    0 when every selected cell finished, 1 when some failed or stopped, 2 for bad input."""
    workdir = Path(args.workdir)  # errors are one line through experiment.main's `cli.run_command`
    cells, search, notes = load(args.config, args.overrides)
    split_of = splits(cells, search.dev, workdir, write=False)
    search_all = search_cells(cells, search, split_of)
    search_mine = _pick(search_all, args)
    choices, more = decide(search, search_all, workdir, write=False)
    seeds_mine = _pick(seed_cells(cells, choices, split_of, search_all), args)
    if args.only and not search_mine and not seeds_mine and not _pick(list(cells), args):
        raise grid_lib.ExperimentError(f"no cell matches --only {' '.join(args.only)}; cells are named like "
                                         f"{search_all[0].name} and {cells[0].name}")
    for note in notes + more:
        print(note)
    pending = [(c.task, c.base) for c in search_all if (c.task, c.base) not in choices]
    if args.dry_run:
        return _dry_run(search_all, search_mine, choices, seeds_mine, list(dict.fromkeys(pending)), workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(workdir / "experiment.yaml", grid_lib.experiment_file(args.config).read_text(encoding="utf-8"),
                        per_process=True)
    split_of = splits(cells, search.dev, workdir, write=True)
    from spafit_jax.compiling import use_compile_cache

    use_compile_cache(workdir / "jax_cache")
    try:
        status, stopped, choices, more = _search_then_choose(cells, search, split_of, search_all, search_mine, workdir, args)
        if not stopped:
            seeds = seed_cells(cells, choices, split_of, search_all)
            status.update(_run_seeds(_pick(seeds, args), split_of, workdir, args.fail_fast))
            write_index(workdir, split_of, search_all, choices, seeds)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume (finished cells and choices are kept)", file=sys.stderr)
        return 130
    return _finish(status, search_all, choices, more, workdir, args)


def _search_then_choose(cells, search: Search, split_of, search_all, search_mine, workdir: Path, args):
    """The search cells method by method; as soon as a method's search is complete it is chosen and the seed that is
    its search cell is scored on test (so an interrupted grid has test scores of every method searched).
    Returns (status, stopped, choices, notes)."""
    status, stopped, done = {}, False, 0
    choices, notes = decide(search, search_all, workdir, write=True)
    for group in dict.fromkeys((c.task, c.base) for c in search_all):
        mine = [c for c in search_mine if (c.task, c.base) == group]

        def echo(line: str, offset=done, n=len(mine)) -> None:
            for i in range(n, 0, -1):
                line = line.replace(f"[{i}/{n}]", f"[search {offset + i}/{len(search_mine)}]", 1)
            print(line, flush=True)

        status.update(grid_lib.run_cells(mine, workdir, fail_fast=args.fail_fast, echo=echo))
        done += len(mine)
        stopped = "stopped" in status.values() or (args.fail_fast and any(s.startswith("failed") for s in status.values()))
        choices, notes = decide(search, search_all, workdir, write=True)
        seeds = seed_cells(cells, choices, split_of, search_all)
        if not stopped:
            first = [c for c in _pick(seeds, args) if (c.task, c.base) == group and c.at.startswith(SEARCH)]
            status.update(_run_seeds(first, split_of, workdir, args.fail_fast))
        write_index(workdir, split_of, search_all, choices, seeds)
        if stopped:
            break
    return status, stopped, choices, notes


def _run_seeds(cells: Sequence[Placed], split_of: dict[str, Split], workdir: Path, fail_fast: bool) -> dict[str, str]:
    """Trains each seed cell (a finished one is skipped) and scores it on test once it has finished."""
    status = {}
    for i, cell in enumerate(cells, 1):
        def echo(line: str, i=i) -> None:
            print(line.replace("[1/1]", f"[seed {i}/{len(cells)}]", 1), flush=True)

        status.update(grid_lib.run_cells([cell], workdir, fail_fast=fail_fast, echo=echo))
        folder = cell.folder(workdir)
        if (folder / rundir.RESULTS).exists() and not (folder / TEST_JSON).exists():
            try:
                record = score_test(folder, split_of[cell.task])
                echo(f"[1/1] {cell.name}: test " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()))
            except SpafitError as e:
                status[cell.name] = f"failed: scoring test: {e}"
                echo(f"[1/1] {cell.name}: test scoring FAILED ({e})")
        if status.get(cell.name) == "stopped" or (fail_fast and status[cell.name].startswith("failed")):
            break
    return status


def _finish(status: dict, search_all, choices: dict, notes: list, workdir: Path, args) -> int:
    for note in notes:
        print(note)
    counts, failed = grid_lib.tally(status)
    waiting = sorted({f"{c.task}/{c.base}" for c in search_all if (c.task, c.base) not in choices})
    print(f"{counts['done']} trained, {counts['skipped']} finished before, {counts['failed']} failed, "
          f"{counts['stopped']} stopped; {len(choices)} choices made" + (f", {len(waiting)} wait for their search "
                                                                           f"cells ({', '.join(waiting)})" if waiting else "")
          + ("; failures:\n" + "\n".join(failed) if failed else ""))
    if not args.no_report:
        from spafit_jax import protocol

        try:
            out = protocol.write_report(workdir)
            print(f"report: {out['table.md']}")
        except SpafitError as e:
            print(f"report: {e}", file=sys.stderr)
    return 1 if failed or counts["stopped"] else 0
