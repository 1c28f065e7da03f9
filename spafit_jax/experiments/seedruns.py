"""The seeds of a `select:` experiment once chosen: checks that a finished seed still fits its choice and test split,
each seed trained and scored on the task's test split (`test.json`, `test_predictions.npz`), and the index
`selection.json` that `protocol` reads.

test.json: {"split", "examples", "step", "metrics": {...}, "sha256": checksum of the test.jsonl bytes read}.
selection.json: {"splits", "search": [{task, method, label, point, seed, folder, budget}], "choices": {"task/method":
choice file}, "seeds": [{task, method, seed, folder, budget}], "commits": {code version: finished cells},
"mixed_commits": bool}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spafit_jax.config import files as config_lib
from spafit_jax.experiments import expstate
from spafit_jax.training import rundir
from spafit_jax.experiments import grid as grid_lib
from spafit_jax.experiments.devsplit import SelectError, Split
from spafit_jax.errors import SpafitError

TEST_JSON, TEST_PREDICTIONS = "test.json", "test_predictions.npz"


def check_seeds(seeds: Sequence[Any], choices: dict, workdir: Path, split_of: dict[str, Split]) -> None:
    """Refuses a finished seed trained at another value than its (remade) choice, and a damaged or stale test.json."""
    for cell in seeds:
        folder = cell.folder(workdir)
        if (folder / rundir.RESULTS).is_file() and cell.at.startswith("runs/"):
            try:
                old = config_lib.to_dict(config_lib.load_config([folder / rundir.CONFIG]))
            except SpafitError as e:
                raise SelectError(f"{folder / rundir.CONFIG}: {e}") from None
            now = config_lib.to_dict(cell.config())
            moved = [f"{k}={old[k.split('.')[0]].get(k.split('.', 1)[1])}" for k, v in cell.point
                     if old[k.split(".")[0]].get(k.split(".", 1)[1]) != now[k.split(".")[0]][k.split(".", 1)[1]]]
            if moved:
                choice = choices[(cell.task, cell.base)]
                raise SelectError(f"{folder} was trained at {', '.join(moved)} but the choice of {cell.task}/{cell.base} "
                                  f"is now {choice['label']} (remade from its complete cells); move that folder away to "
                                  "train the seed at the new choice, or use a new --workdir")
        test = folder / TEST_JSON
        if test.exists():
            record = expstate.read_json(test, f"delete it (and {TEST_PREDICTIONS}): the next run scores the seed again")
            if record.get("sha256") != split_of[cell.task].info["sha256"]["test"]:
                raise SelectError(f"{test} scored another test.jsonl than {split_of[cell.task].folder / 'test.jsonl'} "
                                  "holds now (checksums differ); restore the test file, or use a new --workdir")


def score_test(folder: Path, split: Split) -> dict:
    """Predicts the task's test.jsonl with the run in `folder` (its best checkpoint by the dev metric), writes
    `test.json` (metrics, size, step, the checksum of the file read) and `test_predictions.npz` (logits, labels)
    there; returns test.json's record. A test file that differs from the one carved is refused."""
    import numpy as np

    from spafit_jax.data import metrics
    from spafit_jax.after_training import run as run_lib
    from spafit_jax.data.sources import check_rows, read_file

    path = split.folder / "test.jsonl"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != split.info["sha256"]["test"]:
        raise SelectError(f"{path} differs from the test split carved into split.json (checksums differ: edited "
                          "since?); restore it, or use a new --workdir")
    loaded = run_lib.load_run(folder, "best")
    ex = check_rows(read_file(path), loaded.spec, str(path))
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        raise SelectError(f"{path} changed while it was read; leave it as carved and re-run")
    logits = loaded.logits(ex.texts_a, ex.texts_b, batch_size=loaded.config.train.eval_batch_size)
    record = {"split": split.info["test"], "examples": len(ex), "step": loaded.step,
              "metrics": metrics.compute_metrics(loaded.spec, logits, ex.labels), "sha256": sha}
    rundir.write_atomic(folder / TEST_PREDICTIONS, lambda f: np.savez(f, logits=logits, labels=ex.labels),
                        per_process=True, binary=True)
    rundir.write_atomic(folder / TEST_JSON, json.dumps(record, indent=2) + "\n")
    return record


def write_index(workdir: Path, split_of: dict[str, Split], search: Sequence[Any], choices: dict,
                seeds: Sequence[Any], commits: dict[str, list[str]]) -> Path:
    """EXP/selection.json: the splits, the search cells (extensions included), the choices, the seed cells with their
    folders and the code versions the finished cells ran on (what `protocol` reads)."""
    index = {"splits": {t: s.info for t, s in split_of.items()},
             "search": [{"task": c.task, "method": c.base, "label": c.method, "point": dict(c.point), "seed": c.seed,
                         "folder": c.at, "budget": c.budget or None} for c in search],
             "choices": {f"{t}/{m}": ch for (t, m), ch in choices.items()},
             "seeds": [{"task": c.task, "method": c.base, "seed": c.seed, "folder": c.at, "budget": c.budget or None}
                       for c in seeds],
             "commits": {k: len(v) for k, v in commits.items()}, "mixed_commits": len(commits) > 1}
    path = workdir / "selection.json"
    rundir.write_atomic(path, json.dumps(index, indent=1) + "\n", per_process=True)
    return path


def run_seeds(cells: Sequence[Any], split_of: dict[str, Split], workdir: Path, fail_fast: bool) -> dict[str, str]:
    """Trains each seed cell (a finished one is skipped) and scores it on test once it has finished."""
    status = {}
    for i, cell in enumerate(cells, 1):
        def echo(line: str, i=i) -> None:
            print(line.replace("[1/1]", f"[seed {i}/{len(cells)}]", 1), flush=True)

        status.update(grid_lib.run_cells([cell], workdir, fail_fast=fail_fast, echo=echo, later=len(cells) - i))
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
