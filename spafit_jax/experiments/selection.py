"""An experiment's `select:` section: each method's value chosen per task on a dev split, then its seeds scored on test.

    select:
      grid: {train.lr: [1.0e-3, 3.0e-3, 1.0e-2]}             # searched for every method
      methods: {full: {train.lr: [3.0e-5, 1.0e-4, 3.0e-4]}}  # a method's own grid (key by key over grid)
      dev: {fraction: 0.2, seed: 0}      # carved from the train split; or {size: 300, seed: 0}; or {split: NAME};
                                         # tasks: {tweets: {size: 300}} gives a task its own
      seed: 0                            # the search cells' train.seed (default: the experiment's first seed)
      metric: accuracy                   # what the choice maximises (default: the task's main metric)
      extend: 2                          # extensions past a grid edge the choice sits on, per key (0: none)

The dev split is carved once per task from the task's whole train split (`devsplit`: stratified by
class for classification, seeded, sharing no text with what trains or the test split) and written as files, so every cell of a task
reads the same examples; the test split is the task's first eval split and no choice ever sees it.
Every cell trains on `data/<task>/train.jsonl` (`data.limit_train` still draws each seed's subset
from it) and the trainer scores it on `dev.jsonl`. In the experiment folder EXP:

    data/<task>/{train,dev,test}.jsonl, split.json   the splits (a rerun checks it would carve the same)
    search/runs/<task>/<method>@lr=<v>/seed<k>      the search cells
    choices/<task>/<method>.json                    the choice (`choices`): made when no search cell of the
                                                    method waits, from its complete cells (it names them); a
                                                    rerun reads it, or remakes it when a failed cell succeeded
    experiment.yaml, experiment.json                the experiment file and what the results rest on (`expstate`)
    runs/<task>/<method>/seed<k>                    the seeds at the chosen value; after training each
                                                    predicts test.jsonl: test.json, test_predictions.npz
    report/                                         the protocol report (`protocol`)

The choice is the best dev score of the task's main metric (`select.metric` names another); a tie is
broken by the task's other metrics in order, then by grid order, and recorded. A failed search cell
(error.txt, or a non-finite dev score) is left out and recorded; a method whose every search cell
failed gets no choice file and no seeds (a rerun retries its cells; the run exits 1 saying so). A choice on
the edge of a numeric grid key is extended one step past that edge (`choices.extend`). Grid points that
are no valid config (n1 > n2 in a SPAFIT strata grid) are dropped with a note. A rerun that would change
what was computed (grid, metric, budget, methods) is refused; seeds may be added (`expstate`). A seed whose config equals a search cell's (select.seed is one
of the seeds) is that cell: it is not trained twice. The search runs method by method (each on every task);
once a method's search is complete its choice is made and its first seed scored, then the other seeds run seed by seed;
--only, --shard and --dry-run apply to both; a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spafit_jax.experiments import choices as choices_lib
from spafit_jax.config import files as config_lib
from spafit_jax.experiments import expstate
from spafit_jax.experiments import grid as grid_lib
from spafit_jax.training import rundir
from spafit_jax.experiments.seedruns import TEST_JSON, TEST_PREDICTIONS, check_seeds, run_seeds, score_test, write_index  # noqa: F401
from spafit_jax.experiments.choices import CHOICES, TIE, choose  # noqa: F401  (the choice, re-exported)
from spafit_jax.experiments.devsplit import Dev, SelectError, Split, parse_dev, splits  # noqa: F401
from spafit_jax.errors import ConfigError, SpafitError

SELECT_KEYS = ("grid", "methods", "dev", "seed", "metric", "extend")
SEARCH = "search"


@dataclasses.dataclass(frozen=True)
class Search:
    """The parsed `select:` section."""

    grid: dict[str, list]
    methods: dict[str, dict[str, list]]
    dev: dict[str, Dev]  # by task; "" for tasks not named in select.dev.tasks
    seed: int
    metric: str | None
    extend: int = choices_lib.EXTEND

    def declared(self, method: str, family: str = "") -> dict[str, list]:
        """The grid a method searches: its own (by its label, its experiment name, or its name before '@') over the
        common one, key by key."""
        own = self.methods.get(method, self.methods.get(family or method.split("@")[0],
                                                        self.methods.get(method.split("@")[0], {})))
        return {**self.grid, **own}

    def points(self, method: str, family: str = "") -> list[dict[str, Any]]:
        """The grid points of a method (`declared`), in grid order."""
        grid = self.declared(method, family)
        out = [{}]
        for key in grid:
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
    extend = raw.get("extend", choices_lib.EXTEND)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise SelectError(f"{where}.extend: must be a count >= 0 of extensions past a grid edge, got {extend!r}")
    return Search(grid, own, parse_dev(raw.get("dev"), tasks, f"{where}.dev"), seed, metric, extend)


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[list[grid_lib.Cell], Search, list[str]]:
    """(the experiment's cells, its Search, notes) of an experiment file with a `select:` section."""
    cells, notes = grid_lib.load_experiment(path, overrides)
    data = yaml.safe_load(grid_lib.experiment_file(path).read_text(encoding="utf-8"))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells)) + list(dict.fromkeys(c.family for c in cells if c.family))
    search = parse(data.get("select"), list(dict.fromkeys(c.task for c in cells)), methods, seeds, f"{path}: select")
    return cells, search, notes


def check_metric(search: Search, split_of: dict[str, Split], cells: Sequence[grid_lib.Cell]) -> None:
    """Refuses a select.metric that a task does not compute, before anything trains."""
    if search.metric is None:
        return
    from spafit_jax.data import pipeline as data_lib

    for task in split_of:
        spec = data_lib.task_from_config(next(c for c in cells if c.task == task).config().data)
        computed = [m for m in spec.metrics if m != "combined"] + (["combined"] if "combined" in spec.metrics else [])
        if search.metric not in computed:
            raise SelectError(f"select.metric={search.metric!r} is not a metric of task {task}; it computes "
                              f"{', '.join(computed)}: name one of those")


# ----------------------------------------------------------------------------------------------
# Cells


def _label(method: str, point: dict[str, Any]) -> str:
    shorts = [k.rsplit(".", 1)[-1] for k in point]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, point)]
    return method + ("," if "@" in method else "@") + ",".join(f"{n}={json.dumps(v)}" for n, v in zip(names, point.values()))


def _with(cell: grid_lib.Cell, split: Split, point: dict, seed: int, at: str, method: str) -> Placed:
    """`cell` reading the carved splits, at grid `point` and `seed`, run in EXP/`at` (the point wins over every key)."""
    base = [o for o in cell.overrides if not o.startswith("train.seed=")]
    keys = [*base, *split.overrides(), *(grid_lib.override(k, v) for k, v in point.items()), f"train.seed={seed}"]
    return Placed(cell.task, method, seed, cell.paths, tuple(keys), cell.family, cell.budget, at=at, base=cell.method,
                  point=tuple(point.items()))


def _search_cell(cell: grid_lib.Cell, split: Split, point: dict, seed: int) -> Placed:
    """The search cell of `cell` at `point`; ConfigError when the point is no valid config."""
    label = _label(cell.method, point)
    placed = _with(cell, split, point, seed, f"{SEARCH}/runs/{cell.task}/{label}/seed{seed}", label)
    placed.config()
    return placed


def search_cells(cells: Sequence[grid_lib.Cell], search: Search, split_of: dict[str, Split]) -> tuple[list[Placed], list[str]]:
    """(the search cells, notes): per method, task and grid point (method by method, so that a grid cut short has
    whole methods on every task), one cell at `search.seed` scored on dev; points that are no valid config (n1 > n2)
    are dropped with a note."""
    first = {(c.task, c.method): c for c in reversed(cells)}
    methods, tasks = list(dict.fromkeys(c.method for c in cells)), list(dict.fromkeys(c.task for c in cells))
    out, notes = [], []
    for (task, method), cell in sorted(first.items(), key=lambda kv: (methods.index(kv[0][1]), tasks.index(kv[0][0]))):
        kept = []
        for point in search.points(method, cell.family):
            try:
                kept.append(_search_cell(cell, split_of[task], point, search.seed))
            except ConfigError as e:
                notes.append(f"dropped search point {task}/{_label(method, point)}: {e}")
        if not kept:
            raise SelectError(f"every search point of {task}/{method} is no valid config ({notes[-1]}); fix its grid")
        out += kept
    return out, notes


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


def definition(cells: Sequence[grid_lib.Cell], search: Search, base: Sequence[Placed]) -> dict:
    """What an experiment's results rest on (`expstate`): each task/method's config (every key but train.seed) and
    searched points, the budgets, select.metric, seed, extend and each task's dev split."""
    methods = {}
    for cell in cells:
        if f"{cell.task}/{cell.method}" not in methods:
            cfg = config_lib.to_dict(cell.config())
            cfg["train"].pop("seed", None)
            methods[f"{cell.task}/{cell.method}"] = {"config": cfg, "budget": cell.budget or None, "search": [
                c.method for c in base if (c.task, c.base) == (cell.task, cell.method)]}
    return {"methods": methods, "select": {"metric": search.metric, "seed": search.seed, "extend": search.extend,
                                           "dev": {t: d.describe() for t, d in search.dev.items()}}}


# ----------------------------------------------------------------------------------------------
# Choices


def _groups(base: Sequence[Placed]) -> dict[tuple[str, str], list[Placed]]:
    out: dict[tuple[str, str], list[Placed]] = {}
    for cell in base:
        out.setdefault((cell.task, cell.base), []).append(cell)
    return out


def plan(cells: Sequence[grid_lib.Cell], search: Search, base: Sequence[Placed], split_of: dict[str, Split],
         workdir: Path) -> dict:
    """{(task, method): (its search cells with extensions, extensions, choice or None, why extending stopped)}: what
    the search cells on disk decide now (`choices.expand`)."""
    out, first_of = {}, {(c.task, c.method): c for c in reversed(cells)}
    for (task, method), group in _groups(base).items():
        first, proto = group[0], first_of[(task, method)]

        def state(cell: Placed) -> dict:
            return {"point": dict(cell.point), "label": cell.method,
                    **choices_lib.outcome(cell.folder(workdir), search.metric)}

        out[(task, method)] = choices_lib.expand(
            search.declared(method, first.family), list(group),
            lambda point, proto=proto, task=task: _search_cell(proto, split_of[task], point, search.seed),
            state, search.metric, search.extend)
    return out


def decide(search: Search, planned: dict, workdir: Path, *, write: bool) -> tuple[dict, list[str]]:
    """({(task, method): choice}, notes): each (task, method) with no waiting cell and a complete one is chosen (or
    its recorded choice read back, `choices.settle`), written when `write`; the others have no choice yet."""
    out, notes = {}, []
    for (task, method), (cells, made, choice, stopped) in planned.items():
        if choice is None or choice["chosen"] is None:
            continue
        commits = sorted({expstate.version_name(c) for c in (expstate.code_of(x.folder(workdir)) for x in cells
                                                              if x.method in choice["rests_on"]) if c and c.get("commit")})
        extras = {"extensions": made, "bracketed": stopped is None, "extension_stopped": stopped, "commits": commits,
                  "mixed_commits": len(commits) > 1}
        out[(task, method)], note = choices_lib.settle(workdir, task, method, choice, extras, write)
        if note:
            notes.append(note)
    return out, notes


# ----------------------------------------------------------------------------------------------
# The driver


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


def _dry_run(search_mine, planned, choices, seeds_mine, workdir: Path) -> int:
    for i, cell in enumerate(search_mine, 1):
        print(f"search [{i}/{len(search_mine)}] {cell.name}: {_state(cell.folder(workdir))} -> {cell.folder(workdir)}")
    for (task, method), (cells, made, choice, stopped) in planned.items():
        if (task, method) in choices:
            c = choices[(task, method)]
            print(f"choice {task}/{method}: {c['label']} (dev {c['metric']} {c['dev']:.4f})"
                  + (f"; extended past its grid: {', '.join(e['label'] for e in made)}" if made else "")
                  + (f"; {stopped}" if stopped else ""))
        elif choice is not None:
            print(f"choice {task}/{method}: none (every search cell failed; a rerun retries them)")
        else:
            print(f"choice {task}/{method}: waits for its search cells")
    for i, cell in enumerate(seeds_mine, 1):
        folder = cell.folder(workdir)
        tested = " (test scored)" if (folder / TEST_JSON).exists() else ""
        print(f"seed [{i}/{len(seeds_mine)}] {cell.name}: {_state(folder)}{tested} -> {folder}")
    return 0


def _all_search(planned: dict) -> list[Placed]:
    return [c for cells, *_ in planned.values() for c in cells]


def search_then_test(args) -> int:
    """Runs an experiment with a `select:` section (the arguments of `experiment.build_parser`): the search cells,
    the choices, then the seeds at the chosen values with their test scores, then the protocol report.
    0 when every selected cell finished, 1 when some failed or stopped or a method could not be chosen, 2 for bad
    input (one line; nothing is trained or written)."""
    from spafit_jax.training.results import code_version

    workdir = Path(args.workdir)  # errors are one line through experiment.main's `cli.run_command`
    cells, search, notes = load(args.config, args.overrides)
    text = grid_lib.experiment_file(args.config).read_text(encoding="utf-8")
    manifest = expstate.check_folder(workdir, text)
    split_of = splits(cells, search.dev, workdir, write=False)
    check_metric(search, split_of, cells)
    base, dropped = search_cells(cells, search, split_of)
    seeds_list, defined = list(dict.fromkeys(c.seed for c in cells)), definition(cells, search, base)
    changes = expstate.check_definition(manifest, defined, seeds_list, workdir)
    allow = bool(args.allow_mixed_commits or (manifest or {}).get("allow_mixed_commits"))
    commits = expstate.check_commits(expstate.finished_folders(workdir) if workdir.is_dir() else [], code_version(), allow)
    if (workdir / "selection.json").exists():
        expstate.read_json(workdir / "selection.json", "delete it: the next run writes it again")
    planned = plan(cells, search, base, split_of, workdir)
    choices, more = decide(search, planned, workdir, write=False)
    search_all = _all_search(planned)
    seeds = seed_cells(cells, choices, split_of, search_all)
    check_seeds(seeds, choices, workdir, split_of)
    search_mine, seeds_mine = _pick(search_all, args), _pick(seeds, args)
    if args.only and not search_mine and not seeds_mine and not _pick(list(cells), args):
        raise grid_lib.ExperimentError(f"no cell matches --only {' '.join(args.only)}; cells are named like "
                                       f"{search_all[0].name} and {cells[0].name}")
    for note in notes + dropped + more + [f"{'to record' if args.dry_run else 'recorded'}: {c}" for c in changes]:
        print(note)
    if args.dry_run:
        return _dry_run(search_mine, planned, choices, seeds_mine, workdir)
    expstate.write(workdir, text, manifest, defined, seeds_list, changes, args.allow_mixed_commits)
    split_of = splits(cells, search.dev, workdir, write=True)
    from spafit_jax.training.compiling import use_compile_cache

    use_compile_cache(workdir / "jax_cache")
    try:
        status, stopped, choices, more = _search_then_choose(cells, search, split_of, base, workdir, args)
        planned = plan(cells, search, base, split_of, workdir)
        seeds = seed_cells(cells, choices, split_of, _all_search(planned))
        if not stopped:
            status.update(run_seeds(_pick(seeds, args), split_of, workdir, args.fail_fast))
        commits = expstate.check_commits(expstate.finished_folders(workdir), {}, True)
        write_index(workdir, split_of, _all_search(planned), choices, seeds, commits)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume (finished cells and choices are kept)", file=sys.stderr)
        return 130
    return _finish(status, planned, choices, more, commits, workdir, args)


def _search_then_choose(cells, search: Search, split_of, base, workdir: Path, args):
    """The search cells method by method (extensions past a grid edge as they are called for); as soon as a method's
    search is complete it is chosen and the seed that is its search cell is scored on test (so an interrupted grid
    has test scores of every method searched). Returns (status, stopped, choices, notes)."""
    status, stopped, count = {}, False, 0
    picked_base = {c.name for c in _pick(list(base), args)}
    total = len(picked_base)
    planned = plan(cells, search, base, split_of, workdir)
    choices, notes = {}, []
    for group in list(planned):
        ran: set[str] = set()
        while not stopped:
            group_cells = planned[group][0]
            extra = [c for c in group_cells if c not in base]
            mine = [c for c in group_cells if c.name in picked_base] + [c for c in _pick(extra, args)]
            todo = [c for c in mine if c.name not in ran]
            if not todo:
                break
            total += sum(c in extra for c in todo)

            def echo(line: str, offset=count, n=len(todo), total=total) -> None:
                for i in range(n, 0, -1):
                    line = line.replace(f"[{i}/{n}]", f"[search {offset + i}/{total}]", 1)
                print(line, flush=True)

            later = sum(c.name in picked_base and c.name not in ran and c not in todo  # unfinished search cells
                        and not (c.folder(workdir) / rundir.RESULTS).exists() for c in base)  # of later methods
            status.update(grid_lib.run_cells(todo, workdir, fail_fast=args.fail_fast, echo=echo, later=later))
            ran |= {c.name for c in todo}
            count += len(todo)
            stopped = "stopped" in status.values() or (args.fail_fast and any(s.startswith("failed") for s in status.values()))
            planned = plan(cells, search, base, split_of, workdir)
        choices, notes = decide(search, planned, workdir, write=False)
        seeds = seed_cells(cells, choices, split_of, _all_search(planned))
        check_seeds(seeds, choices, workdir, split_of)
        choices, notes = decide(search, planned, workdir, write=True)
        if not stopped:
            first = [c for c in _pick(seeds, args) if (c.task, c.base) == group and c.at.startswith(SEARCH)]
            status.update(run_seeds(first, split_of, workdir, args.fail_fast))
        write_index(workdir, split_of, _all_search(planned), choices, seeds,
                    expstate.check_commits(expstate.finished_folders(workdir), {}, True))
        if stopped:
            break
    return status, stopped, choices, notes


def _finish(status: dict, planned: dict, choices: dict, notes: list, commits: dict, workdir: Path, args) -> int:
    for note in notes:
        print(note)
    counts, failed = grid_lib.tally(status)
    waiting = [f"{t}/{m}" for (t, m), (_, _, choice, _) in planned.items() if choice is None]
    unchosen = [(f"{t}/{m}", choice["failed"]) for (t, m), (_, _, choice, _) in planned.items()
                if choice is not None and choice["chosen"] is None]
    print(f"{counts['done']} trained, {counts['skipped']} finished before, {counts['failed']} failed, "
          f"{counts['stopped']} stopped; {len(choices)} choices made" + (f", {len(waiting)} wait for their search "
                                                                           f"cells ({', '.join(waiting)})" if waiting else "")
          + ("; failures:\n" + "\n".join(failed) if failed else ""))
    for name, fails in unchosen:
        print(f"no choice for {name}: every search cell failed (first: {fails[0]['error'] if fails else '?'}); fix the "
              "cause and re-run the same command: the failed cells are retried")
    if len(commits) > 1:
        print(f"mixed commits (--allow-mixed-commits): {', '.join(f'{k} ({len(v)} cells)' for k, v in commits.items())}")
    if not args.no_report:
        from spafit_jax.experiments import protocol_report

        try:
            out = protocol_report.write_report(workdir)
            print(f"report: {out['table.md']}")
        except SpafitError as e:
            print(f"report: {e}", file=sys.stderr)
    return 1 if failed or counts["stopped"] or unchosen else 0
