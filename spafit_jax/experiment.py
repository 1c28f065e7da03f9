"""`python -m spafit_jax.experiment`: a grid of runs (tasks x methods x grid points x seeds), then a report.

An experiment file (YAML) names what every cell shares and what varies:

    configs: [configs/default.yaml]            # base config files, in order
    overrides: {data.limit_train: 512}         # dotted config keys for every cell
    tasks:                                     # name -> config files and/or keys
      bbc_news: {data.task: bbc_news}
    methods:                                   # name -> config files and/or keys (and an own grid)
      bitfit: {config: configs/methods/bitfit.yaml}
      spafit: {method.name: spafit, grid: {method.n1: [1, 2], method.n2: [3, 4]}}
    grid: {}                                   # key -> values, for every method
    seeds: [0, 1, 2]                           # or a count: 3

Each cell is an ordinary run folder `EXP/runs/<task>/<method>/seed<k>` trained in this process
by `train.train_and_evaluate`, so resume, checkpoints and logs hold per cell. A cell's config is
`load_config(base + task + method files, base + task + method + grid keys, train.seed, command
line overrides)`. A bare name (`tasks: [bbc_news]`, `methods: [bitfit]`) sets data.task or
method.name; a file name (`tasks: [configs/glue/rte.yaml]`) is a config file. A grid point's
values become part of its method name (`spafit@n1=1,n2=3`); grid points that are not valid
configs (n1 > n2) are dropped with a note. Re-running skips finished cells (results.json; a
note names the keys in which their config.yaml differs from the cell's config now), resumes
unfinished ones and retries failed ones; a failing cell writes its one-line error to
`<cell>/error.txt` and the grid goes on (`--fail-fast` stops).
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import dataclasses
import difflib
import fnmatch
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spafit_jax import config as config_lib
from spafit_jax import rundir
from spafit_jax.errors import ConfigError, SpafitError

FILE_KEYS = ("configs", "overrides", "tasks", "methods", "grid", "seeds", "description",
             "select")  # select: read by spafit_jax.selection (issue 25)
ROOT = config_lib.CONFIGS_DIR.parent


class ExperimentError(ConfigError):
    """The experiment file or the command line is unusable (one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: its names, seed and the config files and overrides that make its config."""

    task: str
    method: str
    seed: int
    paths: tuple[str, ...]
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"

    def folder(self, workdir: str | os.PathLike) -> Path:
        """The cell's run folder under the experiment folder."""
        return Path(workdir) / "runs" / self.task / self.method / f"seed{self.seed}"

    def config(self) -> config_lib.Config:
        """The cell's validated config."""
        return config_lib.load_config(self.paths, self.overrides)


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in config_lib.SECTIONS.items() for f in dataclasses.fields(cls)]


def _check_key(key: Any, where: str) -> str:
    """`key` when it names a config field (`train.lr_by_label.head` names an entry of one)."""
    if not isinstance(key, str) or ".".join(key.split(".")[:2]) not in _all_keys():
        close = difflib.get_close_matches(str(key), _all_keys(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "keys are section.key, e.g. method.n1 or train.lr"
        raise ExperimentError(f"{where}: unknown config key '{key}'; {hint}")
    return key


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: load_config parses it back to the same value


def _find(path: Any, base: Path, where: str) -> str:
    """A config file named in the experiment: as given, else beside the experiment file, else in the repository."""
    if not isinstance(path, str):
        raise ExperimentError(f"{where}: config file names must be strings, got {path!r}")
    for candidate in (Path(path), base / path, ROOT / path, config_lib.shipped_config(path)):
        if candidate is not None and candidate.is_file():
            return str(candidate.resolve())
    raise ExperimentError(f"{where}: config file '{path}' not found (looked in {os.getcwd()}, {base} and {ROOT})")


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _grid(raw: Any, where: str) -> dict[str, list]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: must map config keys to lists of values, e.g. {{method.n1: [1, 2]}}")
    out = {}
    for key, values in raw.items():
        _check_key(key, where)
        values = _as_list(values)
        if not values:
            raise ExperimentError(f"{where}: {key} has no values; give a non-empty list or drop the key")
        out[key] = values
    return out


def _entry(name: Any, raw: Any, default_key: str, base: Path, where: str) -> tuple[list, list, dict]:
    """(config paths, overrides, grid) of one task or method entry."""
    where = f"{where}.{name}"
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ExperimentError(f"{where}: names must be non-empty strings without '/'")
    if raw is None:
        raw = {default_key: name}  # a bare name: data.task=name, method.name=name
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: must be a mapping of config keys (and optional config:, grid:), got {raw!r}")
    paths = [_find(p, base, where) for p in _as_list(raw.get("config", raw.get("configs")))]
    grid = _grid(raw.get("grid"), f"{where}.grid")
    keys = [_override(_check_key(k, where), v) for k, v in raw.items() if k not in ("config", "configs", "grid")]
    return paths, keys, grid


def _entries(raw: Any, default_key: str, base: Path, path: Any, kind: str) -> dict[str, tuple]:
    """A task or method list: {name: entry} or [name | file.yaml, ...]; two entries of one name are refused."""
    where = f"{path}: {kind}s"
    if isinstance(raw, list):
        names = [Path(x).stem if str(x).endswith((".yaml", ".yml")) else x for x in raw]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ExperimentError(f"{where}: two {kind}s are named {twice!r} (a file's name is its stem); "
                                  f"give each {kind} its own name: {kind}s: {{{twice}_a: ..., {twice}_b: ...}}")
        raw = {Path(x).stem if str(x).endswith((".yaml", ".yml")) else x: (
            {"config": x} if str(x).endswith((".yaml", ".yml")) else None) for x in raw}
    if not isinstance(raw, dict) or not raw:
        raise ExperimentError(f"{where}: list at least one {kind} (a mapping name -> config keys); the grid is empty")
    return {name: _entry(name, value, default_key, base, where) for name, value in raw.items()}


def _label(method: str, point: dict[str, Any], varying: list[str]) -> str:
    if not varying:
        return method
    shorts = [k.rsplit(".", 1)[-1] for k in varying]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, varying)]
    return method + "@" + ",".join(f"{n}={point[k]}" for n, k in zip(names, varying))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base loader reports unhashable keys itself
            if key in seen:
                raise ExperimentError(f"{self.name}: line {key_node.start_mark.line + 1}: key {key!r} appears twice in "
                                      f"one mapping (first on line {seen[key] + 1}); the second would silently replace "
                                      "the first: rename or remove one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def experiment_file(path: str | os.PathLike) -> Path:
    """The experiment file `path` names: as given, else the shipped one (`experiments/smoke.yaml` or
    `configs/experiments/smoke.yaml`), as `train --config glue/mrpc.yaml` resolves."""
    return Path(path) if Path(path).is_file() else config_lib.shipped_config(str(path)) or Path(path)


def _read(path: str | os.PathLike) -> dict:
    p = experiment_file(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file '{path}' not found; the shipped ones are in {ROOT / 'configs' / 'experiments'}")
    try:
        loader = _UniqueKeyLoader(p.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ExperimentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: must hold a mapping with tasks:, methods: and seeds:")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), FILE_KEYS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"keys are: {', '.join(FILE_KEYS)}"
        raise ExperimentError(f"{path}: unknown key '{unknown[0]}'; {hint}")
    return data


def _seeds(raw: Any, where: str) -> list[int]:
    seeds = list(range(raw)) if isinstance(raw, int) and not isinstance(raw, bool) else _as_list(raw)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ExperimentError(f"{where}: seeds must be a count > 0 or a non-empty list of integers, got {raw!r}")
    twice = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if twice is not None:
        raise ExperimentError(f"{where}: seed {twice} is listed twice (both cells would share one run folder); list "
                              "each seed once")
    return seeds


def _check_folders(cells: Sequence[Cell], path: Any) -> None:
    """Refuses two cells that would share one run folder (the second would be skipped as finished), also
    where names differ only in case (one folder on a case-insensitive disk)."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        key = cell.name.lower()
        if key in seen:
            first = seen[key]
            raise ExperimentError(f"{path}: cells {first.name} and {cell.name} would share the run folder "
                                  f"{cell.folder('EXP')} (a method named like a grid label?); rename the method")
        seen[key] = cell


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[list[Cell], list[str]]:
    """(cells, notes) of an experiment file; `overrides` (section.key=value) apply to every cell last.

    Cells come seed by seed, then task, then method, so a grid cut short has every method of the
    first seeds. Every cell's config is validated here; raises ExperimentError or ConfigError.
    """
    data, base = _read(path), Path(path).resolve().parent
    paths = [_find(p, base, f"{path}: configs") for p in _as_list(data.get("configs"))]
    common = data.get("overrides") or {}
    if not isinstance(common, dict):
        raise ExperimentError(f"{path}: overrides must map config keys to values, e.g. {{train.max_steps: 100}}")
    common = [_override(_check_key(k, f"{path}: overrides"), v) for k, v in common.items()]
    tasks = _entries(data.get("tasks"), "data.task", base, path, "task")
    methods = _entries(data.get("methods"), "method.name", base, path, "method")
    top_grid, seeds = _grid(data.get("grid"), f"{path}: grid"), _seeds(data.get("seeds", [0]), f"{path}: seeds")
    cells, notes = [], []
    for seed, (task, (t_paths, t_keys, _)) in itertools.product(seeds, tasks.items()):
        for method, (m_paths, m_keys, m_grid) in methods.items():
            grid = {**top_grid, **m_grid}
            varying = [k for k, v in grid.items() if len(v) > 1]
            kept = 0
            for values in itertools.product(*grid.values()):
                point = dict(zip(grid, values))
                cell = Cell(task, _label(method, point, varying), seed, tuple(paths + t_paths + m_paths),
                            tuple(common + t_keys + m_keys + [_override(k, v) for k, v in point.items()]
                                  + [f"train.seed={seed}", *overrides]))
                try:
                    cell.config()
                except ConfigError as e:
                    if not varying:
                        raise ConfigError(f"{cell.name}: {e}") from None
                    if seed == seeds[0]:
                        notes.append(f"dropped grid point {task}/{cell.method}: {e}")
                    continue
                cells.append(cell)
                kept += 1
            if not kept:
                raise ExperimentError(f"{path}: every grid point of method {method} is invalid ({notes[-1]})")
    _check_folders(cells, path)
    return cells, notes


def select(cells: Sequence[Cell], only: Sequence[str] = (), shard: str | None = None) -> list[Cell]:
    """The cells matching any `only` pattern (a glob over task/method/seed<k>; a plain word matches
    as a substring), then every n-th from the i-th for `shard` "i/n" (i in 0..n-1)."""
    def match(cell: Cell, pattern: str) -> bool:
        return fnmatch.fnmatchcase(cell.name, pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")

    chosen = [c for c in cells if not only or any(match(c, p) for p in only)]
    if not chosen:
        raise ExperimentError(f"no cell matches --only {' '.join(only)}; cells are named like {cells[0].name}")
    if shard is None:
        return chosen
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not (n > 0 and 0 <= i < n):
            raise ValueError
    except ValueError:
        raise ExperimentError(f"--shard {shard}: write i/n with 0 <= i < n, e.g. --shard 0/2 and --shard 1/2") from None
    return chosen[i::n]


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _changed(cell: Cell, saved: Path) -> list[str]:
    """The config keys in which a finished cell's config.yaml differs from the cell's config now."""
    try:
        old = config_lib.to_dict(config_lib.load_config([saved]))
    except SpafitError:
        return ["everything (its config.yaml is missing or unreadable)"]
    new = config_lib.to_dict(cell.config())
    return [f"{s}.{k}" for s in new for k in new[s] if old[s].get(k) != new[s][k]]


def _echo(line: str) -> None:
    print(line, flush=True)


def run_cells(cells: Sequence[Cell], workdir: str | os.PathLike, *, fail_fast: bool = False,
              echo=_echo) -> dict[str, str]:
    """Trains each unfinished cell in turn; returns {cell name: "done" | "skipped" | "failed: ..." | "stopped"}.

    A SpafitError fails only its cell (written to <cell>/error.txt) unless `fail_fast`; a SIGTERM
    (the run saves a checkpoint and returns) stops the grid. One progress line per cell.
    """
    from spafit_jax import rundir, train

    status: dict[str, str] = {}
    start, spent = time.perf_counter(), []
    left = sum(not (c.folder(workdir) / rundir.RESULTS).exists() for c in cells)
    for i, cell in enumerate(cells, 1):
        folder, head = cell.folder(workdir), f"[{i}/{len(cells)}] {cell.name}"
        if (folder / rundir.RESULTS).exists():
            status[cell.name] = "skipped"
            changed = _changed(cell, folder / rundir.CONFIG)
            echo(f"{head}: finished before, skipped" + (f" (its config.yaml differs in {', '.join(changed)}; delete "
                                                        f"{folder} to run it again)" if changed else ""))
            continue
        echo(f"{head}: {'resuming' if (folder / rundir.CHECKPOINTS).exists() else 'starting'}")
        t0 = time.perf_counter()
        try:
            run = train.train_and_evaluate(cell.config(), folder)
        except SpafitError as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            folder.mkdir(parents=True, exist_ok=True)
            (folder / rundir.ERROR).write_text(f"{type(e).__name__}: {message}\n")
            status[cell.name], outcome = f"failed: {message}", f"FAILED ({type(e).__name__}: {message})"
        else:
            (folder / rundir.ERROR).unlink(missing_ok=True)
            if run.results is None:
                status[cell.name] = "stopped"
                echo(f"{head}: stopped at step {run.step}; re-run the same command to resume")
                break
            best = run.results.best
            status[cell.name], outcome = "done", f"{best.metric} {run.results.eval[best.metric]:.4f}"
        spent.append(time.perf_counter() - t0)
        left -= 1
        eta = f"about {_clock(left * sum(spent) / len(spent))} left" if left else "last cell"
        echo(f"{head}: {outcome} in {_clock(spent[-1])} · elapsed {_clock(time.perf_counter() - start)} · {eta}")
        if fail_fast and status[cell.name].startswith("failed"):
            echo("stopping: --fail-fast")
            break
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.experiment`."""
    p = argparse.ArgumentParser(prog="python -m spafit_jax.experiment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="the experiment file:\n\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, metavar="FILE", help="experiment file (configs/experiments/*.yaml)")
    p.add_argument("--workdir", required=True, metavar="EXP", help="experiment folder: runs/, report/, experiment.yaml")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only cells whose task/method/seed<k> matches (glob, or a substring); repeatable")
    p.add_argument("--shard", metavar="i/n", help="run every n-th selected cell from the i-th (0 <= i < n)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, train nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing cell")
    p.add_argument("--no-report", action="store_true", help="do not write EXP/report at the end")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every cell")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`): 0 when every selected cell finished, 1 when some failed,
    2 for bad input, 130 on Ctrl-C."""
    from spafit_jax import cli

    parser = build_parser()
    parser.prog = cli.program("experiment")
    args = parser.parse_intermixed_args(None if argv is None else list(argv))

    def work() -> int:
        from spafit_jax import selection  # a `select:` section runs the dev-split protocol there

        if selection.wanted(args.config):
            return selection.run(args)
        cells, notes = load_experiment(args.config, args.overrides)
        cells = select(cells, args.only, args.shard)
        workdir = Path(args.workdir)
        for note in notes:
            print(note)
        if args.dry_run:
            for i, cell in enumerate(cells, 1):
                folder = cell.folder(workdir)
                state = ("finished" if (folder / rundir.RESULTS).exists() else "failed before"
                         if (folder / rundir.ERROR).exists() else "unfinished" if folder.exists() else "to do")
                print(f"[{i}/{len(cells)}] {cell.name}: {state} -> {folder}")
            return 0
        try:  # a copy of the experiment file; shards sharing EXP write it at once (they all hold the same text)
            workdir.mkdir(parents=True, exist_ok=True)
            rundir.write_atomic(workdir / "experiment.yaml", experiment_file(args.config).read_text(encoding="utf-8"),
                                per_process=True)
        except OSError as e:
            raise ConfigError(f"cannot write {workdir / 'experiment.yaml'} ({e.strerror or e}); choose a writable "
                              "--workdir") from None
        from spafit_jax.compiling import use_compile_cache

        use_compile_cache(workdir / "jax_cache")  # the seeds of a method compile once
        status = run_cells(cells, workdir, fail_fast=args.fail_fast)
        failed = [f"  {name}: {s[len('failed: '):]}" for name, s in status.items() if s.startswith("failed")]
        counts = {k: sum(s.split(":")[0] == k for s in status.values()) for k in ("done", "skipped", "failed")}
        print(f"{counts['done']} trained, {counts['skipped']} finished before, {counts['failed']} failed, "
              f"{len(cells) - len(status)} not run" + ("; failures:\n" + "\n".join(failed) if failed else ""))
        if not args.no_report:
            from spafit_jax import report

            try:
                out = report.write_report(workdir)
                print(f"report: {out['index.html']}")
            except SpafitError as e:
                print(f"report: {e}", file=sys.stderr)
        return 1 if failed else 0

    return cli.run_command(work, compile_cache=False,
                           interrupted="interrupted; re-run the same command to resume (finished cells are kept)")


if __name__ == "__main__":
    sys.exit(main())
