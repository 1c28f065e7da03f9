"""The grid of runs of an experiment file: the file read into cells (tasks x methods x grid points x seeds),
and the cells trained in turn, each in its own run folder.

`load_experiment` reads and checks the file (the format: `python -m spafit_jax.experiment --help`, the
docstring of `experiment`; `budgets:` crosses every method with every budget, and a grid lists each value
once) and validates every cell's config; `select` picks cells for --only and
--shard; `run_cells` trains the unfinished ones (`trainer.train_and_evaluate`), skipping finished cells
and writing a failing cell's one-line error to `<cell>/error.txt`. `experiment` (the plain grid) and
`selection` (a `select:` section's dev-split search) both build on these.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spafit_jax.config import files as config_lib
from spafit_jax.errors import ConfigError, SpafitError

FILE_KEYS = ("configs", "overrides", "tasks", "methods", "grid", "seeds", "budgets", "description",
             "select")  # select: read by spafit_jax.experiments.selection (issue 25)
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
    family: str = ""  # the experiment's method name (before any budget or grid label); "" means `method`
    budget: str = ""  # the budget's name (`budgets:`), "" when the experiment declares none

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


def override(key: str, value: Any) -> str:
    """The override `key=value` that sets config key `key` to `value` (`load_config` reads it back as given)."""
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


def parse_grid(raw: Any, where: str) -> dict[str, list]:
    """{config key: its values} of a `grid:` mapping (keys checked, one value made a list); `where` names it in errors."""
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
        twice = next((v for i, v in enumerate(values) if any(_same(v, w) for w in values[:i])), None)
        if twice is not None:
            raise ExperimentError(f"{where}: {key} lists the value {twice!r} twice (two cells would train the same "
                                  "run); list each value once")
        out[key] = values
    return out


def _same(a: Any, b: Any) -> bool:
    """Whether two grid values give the same config (1 and 1.0 do; True and 1 do not)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def parse_budgets(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """{budget name: {config key: value}} of a `budgets:` mapping, e.g. {short: {train.epochs: 2}, long:
    {train.epochs: 4}}: every method trains at every budget; every budget sets the same keys."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ExperimentError(f"{where}: must map budget names to config keys, e.g. {{short: {{train.epochs: 2}}, "
                              "long: {train.epochs: 4}}")
    out = {}
    for name, keys in raw.items():
        if not isinstance(name, str) or not name or any(c in name for c in "/@,=") or name.startswith("."):
            raise ExperimentError(f"{where}: budget names must be non-empty strings without '/', '@', ',' or '=', "
                                  f"got {name!r}")
        if not isinstance(keys, dict) or not keys:
            raise ExperimentError(f"{where}.{name}: must map config keys to values, e.g. {{train.epochs: 2}}")
        out[name] = {_check_key(k, f"{where}.{name}"): v for k, v in keys.items()}
    first = next(iter(out.values()))
    odd = next((n for n, keys in out.items() if set(keys) != set(first)), None)
    if odd is not None:
        raise ExperimentError(f"{where}: budget {odd} sets {', '.join(sorted(out[odd]))} but {next(iter(out))} sets "
                              f"{', '.join(sorted(first))}; every budget sets the same keys")
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
    grid = parse_grid(raw.get("grid"), f"{where}.grid")
    keys = [override(_check_key(k, where), v) for k, v in raw.items() if k not in ("config", "configs", "grid")]
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


def experiment_file(path: str | os.PathLike) -> Path:
    """The experiment file `path` names: as given, else the shipped one (`experiments/smoke.yaml` or
    `configs/experiments/smoke.yaml`), as `train --config glue/mrpc.yaml` resolves."""
    return Path(path) if Path(path).is_file() else config_lib.shipped_config(str(path)) or Path(path)


def _read(path: str | os.PathLike) -> dict:
    p = experiment_file(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file '{path}' not found; the shipped ones are in {ROOT / 'configs' / 'experiments'}")
    try:
        data = config_lib.parse_yaml(p.read_text(encoding="utf-8"), str(path), ExperimentError)
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
    common = [override(_check_key(k, f"{path}: overrides"), v) for k, v in common.items()]
    tasks = _entries(data.get("tasks"), "data.task", base, path, "task")
    methods = _entries(data.get("methods"), "method.name", base, path, "method")
    top_grid, seeds = parse_grid(data.get("grid"), f"{path}: grid"), _seeds(data.get("seeds", [0]), f"{path}: seeds")
    budgets = parse_budgets(data.get("budgets"), f"{path}: budgets")
    _check_budget_keys(budgets, tasks, methods, top_grid, path)
    cells, notes = [], []
    for seed, (task, (t_paths, t_keys, _)) in itertools.product(seeds, tasks.items()):
        for (method, (m_paths, m_keys, m_grid)), budget in itertools.product(methods.items(), budgets or [""]):
            grid = {**top_grid, **m_grid}
            varying = [k for k, v in grid.items() if len(v) > 1]
            b_keys = [override(k, v) for k, v in budgets.get(budget, {}).items()]
            kept = 0
            for values in itertools.product(*grid.values()):
                point = dict(zip(grid, values))
                cell = Cell(task, _label(f"{method}-{budget}" if budget else method, point, varying), seed,
                            tuple(paths + t_paths + m_paths),
                            tuple(common + t_keys + m_keys + b_keys + [override(k, v) for k, v in point.items()]
                                  + [f"train.seed={seed}", *overrides]), family=method, budget=budget)
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


def _check_budget_keys(budgets: dict, tasks: dict, methods: dict, top_grid: dict, path: Any) -> None:
    """Refuses a task, method or grid that sets a key the budgets declare (the budget would silently replace it)."""
    if not budgets:
        return
    keys = set(next(iter(budgets.values())))
    for kind, entries in (("task", tasks), ("method", methods)):
        for name, (_, entry_keys, entry_grid) in entries.items():
            clash = sorted(keys & ({k.split("=", 1)[0] for k in entry_keys} | set(entry_grid)))
            if clash:
                raise ExperimentError(f"{path}: {kind} {name} sets {clash[0]}, which budgets: declares for every "
                                      f"method; drop it from the {kind} (each method trains at each budget)")
    clash = sorted(keys & set(top_grid))
    if clash:
        raise ExperimentError(f"{path}: grid varies {clash[0]}, which budgets: declares; drop it from the grid")


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


def tally(status: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """`run_cells`' statuses counted by kind (done, skipped, failed, stopped) and one indented line per failure."""
    counts = {k: sum(s.split(":")[0] == k for s in status.values()) for k in ("done", "skipped", "failed", "stopped")}
    return counts, [f"  {name}: {s[len('failed: '):]}" for name, s in status.items() if s.startswith("failed")]


def run_cells(cells: Sequence[Cell], workdir: str | os.PathLike, *, fail_fast: bool = False,
              echo=_echo, later: int = 0) -> dict[str, str]:
    """Trains each unfinished cell in turn; returns {cell name: "done" | "skipped" | "failed: ..." | "stopped"}.

    A SpafitError fails only its cell (written to <cell>/error.txt) unless `fail_fast`; a SIGTERM
    (the run saves a checkpoint and returns) stops the grid. One progress line per cell, its time estimate
    counting `later` more cells that the caller runs after these.
    """
    from spafit_jax.training import rundir
    from spafit_jax.training import trainer

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
            run = trainer.train_and_evaluate(cell.config(), folder)
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
        eta = f"about {_clock((left + later) * sum(spent) / len(spent))} left" if left + later else "last cell"
        echo(f"{head}: {outcome} in {_clock(spent[-1])} · elapsed {_clock(time.perf_counter() - start)} · {eta}")
        if fail_fast and status[cell.name].startswith("failed"):
            echo("stopping: --fail-fast")
            break
    return status
