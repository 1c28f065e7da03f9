"""The choices of a `select:` search: each (task, method)'s value chosen from its complete search cells, the grid
extended past an edge it chose, and the choice file `choices/<task>/<method>.json`.

A choice file:

    {"chosen": {"train.lr": 0.003}, "label": "lora@lr=0.003", "metric": "accuracy", "dev": 0.81,
     "ties": [], "tie_broken_by": null,
     "rests_on": ["lora@lr=0.001", "lora@lr=0.003", ...],   the complete cells the choice was made from
     "failed": [{"label": ..., "error": ...}],             cells left out (error.txt, or a non-finite dev score)
     "candidates": [{"label", "point", "status", "dev"}],   every cell, the extensions included
     "extensions": [{"key", "value", "side", "label", "after"}],  cells added past an edge the choice sat on
     "bracketed": true | false,  "extension_stopped": null | "why the choice still sits on an edge",
     "commits": ["<commit>[+dirty]", ...],                  the code the cells it rests on ran on
     "remade": null | {"previous": label, "previous_rests_on": [...]}}

A choice is made only when no cell of its (task, method) waits to train; a (task, method) whose every cell
failed gets no choice file (a rerun retries the cells). A rerun remakes a choice when the complete cells
differ from those it rests on (a failed cell that now succeeded), and says so in `remade`.
A choice on the lowest or highest value of a numeric grid key (two values or more) adds a cell one step
past that edge, in the key's own progression (x ratio for a positive geometric grid such as learning rates,
+ step otherwise), until the choice is interior or `select.extend` (default 2) extensions of that key are made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spafit_jax.experiments import expstate
from spafit_jax.training import rundir
from spafit_jax.errors import ConfigError
from spafit_jax.experiments.grid import ExperimentError

CHOICES = "choices"
TIE = 1e-12  # dev scores closer than this are a tie
EXTEND = 2  # default select.extend


def outcome(folder: Path, metric: str | None) -> dict:
    """A search cell's state: done (with its dev metrics), failed (with the error) or todo."""
    results = folder / rundir.RESULTS
    if results.is_file():
        res = expstate.read_json(results, f"the search cell did not finish cleanly: move {folder} away and re-run "
                                          "to train it again")
        dev, best = res.get("eval"), res.get("best")
        if not isinstance(dev, dict) or not dev or not (metric or isinstance(best, dict) and best.get("metric")):
            raise ExperimentError(f"{results}: lacks its dev metrics (eval, best); move {folder} away and re-run to "
                                  "train it again")
        name = metric or best["metric"]
        if name not in dev:
            raise ExperimentError(f"select.metric={name!r} is not among the dev metrics of {folder} ({', '.join(dev)})")
        if not isinstance(dev[name], (int, float)) or not math.isfinite(dev[name]):
            return {"status": "failed", "error": f"dev {name} is {dev[name]}"}
        return {"status": "done", "dev": dev, "metric": name}
    if (folder / rundir.ERROR).is_file():
        return {"status": "failed", "error": (folder / rundir.ERROR).read_text(errors="replace").strip()}
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
            "tie_broken_by": broken_by if ties else None, "rests_on": [c["label"] for c in done],
            "failed": [{"label": c["label"], "error": c["error"]} for c in candidates if c["status"] == "failed"],
            "candidates": [{"label": c["label"], "point": c["point"], "status": c["status"],
                            "dev": c.get("dev")} for c in candidates]}


def _numeric(values: Sequence) -> bool:
    return len(values) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def next_value(declared: Sequence, current: float, side: str) -> float | int:
    """The value one step past `current` (the lowest or highest tried, `side` "low" or "high") in the progression of the
    `declared` grid values: x or / the ratio of the two values at that edge for a positive geometric grid (ratios equal
    within 25%), else + or - their difference; integers stay integers; floats keep 4 significant digits."""
    v = sorted(declared)
    pair = (v[0], v[1]) if side == "low" else (v[-2], v[-1])
    ratios = [b / a for a, b in zip(v, v[1:])] if v[0] > 0 else []
    geometric = bool(ratios) and max(ratios) <= 1.25 * min(ratios) and not all(isinstance(x, int) for x in v)
    if geometric:
        ratio = pair[1] / pair[0]
        out = current * ratio if side == "high" else current / ratio
    else:
        step = pair[1] - pair[0]
        out = current + step if side == "high" else current - step
    return int(out) if all(isinstance(x, int) for x in v) else float(f"{out:.4g}")


def extend(declared: dict[str, list], choice: dict, tried: Sequence[dict], made: Sequence[dict], limit: int) -> tuple[
        dict | None, str | None]:
    """(the next extension {key, value, side, point}, or None; why it stops while on an edge, or None): the choice's
    first numeric grid key whose chosen value is the lowest or highest of the complete cells' values (`tried`) gets one
    more value past it; `made` are the extensions so far, at most `limit` per key."""
    for key, values in declared.items():
        if not _numeric(values):
            continue
        seen = sorted({p[key] for p in tried})
        value = choice["chosen"][key]
        side = "high" if value == seen[-1] else "low" if value == seen[0] else None
        if side is None:
            continue
        if sum(e["key"] == key for e in made) >= limit:
            return None, (f"{key}={value} is the {'highest' if side == 'high' else 'lowest'} value tried after "
                          f"{limit} extensions (select.extend={limit}); the best value may lie further out")
        new = next_value(values, value, side)
        return {"key": key, "value": new, "side": side, "point": {**choice["chosen"], key: new}}, None
    return None, None


def expand(declared: dict[str, list], cells: list, make: Callable[[dict], Any], state: Callable[[Any], dict],
           metric: str | None, limit: int) -> tuple[list, list[dict], dict | None, str | None]:
    """(cells with their extensions, the extensions, the choice or None while cells wait, why extending stopped on an
    edge): the choice is remade after each extension; `make(point)` gives an extension's cell (raises ConfigError for
    a point that is no valid config), `state(cell)` its outcome with point and label."""
    made: list[dict] = []
    while True:
        cands = [state(c) for c in cells]
        if any(c["status"] == "todo" for c in cands):
            return cells, made, None, None
        done = [c for c in cands if c["status"] == "done"]
        if not done:
            return cells, made, choose(cands, metric or "-", []), None
        choice = choose(cands, done[0]["metric"], list(done[0]["dev"]))
        ext, stopped = extend(declared, choice, [c["point"] for c in done], made, limit)
        if ext is None:
            return cells, made, choice, stopped
        try:
            cell = make(ext["point"])
        except ConfigError as e:
            return cells, made, choice, f"{ext['key']}={ext['value']} past the edge is no valid config ({e})"
        failed = next((c for c in cands if c["label"] == cell.method), None)
        if failed is not None:  # tried and failed: the edge stays
            return cells, made, choice, f"{ext['key']}={ext['value']} past the edge failed ({failed.get('error')})"
        made.append({"key": ext["key"], "value": ext["value"], "side": ext["side"], "label": cell.method,
                     "after": choice["label"]})
        cells = [*cells, cell]


def path_of(workdir: Path, task: str, method: str) -> Path:
    """The choice file of a (task, method)."""
    return workdir / CHOICES / task / f"{method}.json"


def recorded(workdir: Path, task: str, method: str) -> dict | None:
    """The choice file of a (task, method), checked (None when there is none, or it records no choice)."""
    path = path_of(workdir, task, method)
    if not path.exists():
        return None
    fix = "delete it: the next run makes the choice again from the search cells"
    choice = expstate.read_json(path, fix)
    if not {"chosen", "label", "candidates"} <= set(choice) or not isinstance(choice["candidates"], list):
        raise ExperimentError(f"{path}: lacks chosen, label or candidates; {fix}")
    return choice if choice["chosen"] is not None else None  # an old `chosen: null` is not a choice


def settle(workdir: Path, task: str, method: str, choice: dict, extras: dict, write: bool) -> tuple[dict, str | None]:
    """(the choice to use, a note when it was remade): the recorded choice when it rests on the same complete cells,
    else `choice` with `extras` (extensions, commits) and what it replaced, written when `write`."""
    old = recorded(workdir, task, method)
    rests = old.get("rests_on", [c["label"] for c in old["candidates"] if c.get("status") == "done"]) if old else None
    if old is not None and rests == choice["rests_on"]:
        return old, None
    new = {**choice, **extras, "remade": None if old is None else {"previous": old["label"], "previous_rests_on": rests}}
    note = None if old is None else (f"{task}/{method}: choice remade from {len(new['rests_on'])} complete cells "
                                     f"(was {old['label']}, now {new['label']})")
    if write:
        path = path_of(workdir, task, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_atomic(path, json.dumps(new, indent=2) + "\n", per_process=True)
    return new, note
