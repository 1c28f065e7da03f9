"""What an experiment folder records about itself: `experiment.json`, written and checked by the experiment runner.

    {"format": 1,
     "experiment_yaml_sha256": "...",        the copy of the experiment file the runner wrote (experiment.yaml)
     "definition": {...},                    what the results rest on: tasks, methods with their configs (every key
                                             but train.seed) and searched grids, budgets, select.metric/seed/dev
     "seeds": [0, 1, 2],
     "history": [{"time": ..., "change": "seeds added: 3, 4"}],   safe changes, in the order they were made
     "allow_mixed_commits": false}

A rerun on the same folder compares the experiment with the recorded one: a change to what was already
computed (a grid, select.metric, a budget or other config key, the tasks or methods, seeds taken away) is
refused in one line naming the fix (a new --workdir); adding seeds is safe and recorded in `history`.
The runner never writes over an `experiment.yaml` (or `selection.json`, `choices/`...) it did not write.
The code each finished cell ran on (`results.json`'s `code`) must be one commit unless
--allow-mixed-commits, which is recorded here. `read_json` reads every JSON file of the folder with a
one-line error naming the file and the fix.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spafit_jax.training import rundir
from spafit_jax.experiments.grid import ExperimentError

MANIFEST, COPY = "experiment.json", "experiment.yaml"
OURS = ("selection.json", "choices", "search", "data", "runs")  # what an experiment writes besides its copy


def read_json(path: Path, fix: str, kind: type = dict) -> Any:
    """The JSON value in `path` (of type `kind`); ExperimentError, one line naming the file and `fix`, when it is
    unreadable, truncated or not a `kind`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExperimentError(f"{path}: not valid JSON ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}); "
                              f"{fix}") from None
    if not isinstance(value, kind):
        raise ExperimentError(f"{path}: holds a JSON {type(value).__name__}, not a {kind.__name__}; {fix}")
    return value


def sha(text: str) -> str:
    """The SHA-256 of a text's UTF-8 bytes, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _difference(old: Any, new: Any, where: str = "") -> str | None:
    """The first place where two definitions differ, in words; None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            name = f"{where}.{key}" if where else str(key)
            if key not in new:
                return f"{name} was taken away"
            if key not in old:
                if ".config." in f".{name}":  # a config field newer code added: its default computed nothing else
                    continue
                return f"{name} was added"
            found = _difference(old[key], new[key], name)
            if found:
                return found
        return None
    return None if old == new else f"{where} changed (was {json.dumps(old)}, now {json.dumps(new)})"


def check_folder(workdir: Path, text: str) -> dict | None:
    """The folder's recorded manifest (None for a new folder); refuses, in one line, a folder whose experiment.yaml or
    experiment files this runner did not write (a user's own folder, or an edited copy). Writes nothing."""
    manifest_path, copy = workdir / MANIFEST, workdir / COPY
    if manifest_path.exists():
        manifest = read_json(manifest_path, "it is the experiment's record: restore it, or use a new --workdir")
        on_disk = copy.read_text(encoding="utf-8") if copy.is_file() else None
        if on_disk is not None and sha(on_disk) != manifest.get("experiment_yaml_sha256"):
            raise ExperimentError(f"{copy} is not the copy this experiment wrote (edited since?); it is left as it is: "
                                  "put the copy back, or use a new --workdir")
        return manifest
    if copy.exists():
        if not copy.is_file() or copy.read_text(encoding="utf-8", errors="replace") != text:
            raise ExperimentError(f"{copy} exists and is not this experiment's file; it is left as it is: use a new "
                                  "--workdir (one folder holds one experiment)")
        return None  # a folder written before experiment.json: the same file, adopted
    found = [name for name in OURS if (workdir / name).exists()]
    if found:
        raise ExperimentError(f"{workdir / found[0]} exists but this folder holds no experiment.yaml: it was not "
                              "written by an experiment; use a new --workdir")
    return None


def check_definition(manifest: dict | None, definition: dict, seeds: Sequence[int], workdir: Path) -> list[str]:
    """The safe changes (seeds added) against the recorded experiment, as history lines; refuses any other change
    in one line naming it and the fix."""
    if manifest is None or "definition" not in manifest:
        return []
    change = _difference(manifest["definition"], definition)
    if change:
        raise ExperimentError(f"{workdir} holds an experiment whose {change}; its results rest on the old one: use a "
                              "new --workdir for the changed experiment (or restore the file)")
    old = list(manifest.get("seeds") or [])
    gone = [s for s in old if s not in seeds]
    if gone:
        raise ExperimentError(f"{workdir} holds an experiment with seeds {', '.join(map(str, old))}; seed "
                              f"{gone[0]} was taken away: list it again, or use a new --workdir")
    added = [s for s in seeds if s not in old]
    return [f"seeds added: {', '.join(map(str, added))}"] if added else []


def write(workdir: Path, text: str, manifest: dict | None, definition: dict, seeds: Sequence[int],
          changes: Sequence[str], allow_mixed: bool) -> None:
    """Writes experiment.yaml (the experiment file's text) and experiment.json, with `changes` added to history."""
    history = list((manifest or {}).get("history") or [])
    history += [{"time": _now(), "change": c} for c in changes]
    if allow_mixed and not (manifest or {}).get("allow_mixed_commits"):
        history.append({"time": _now(), "change": "--allow-mixed-commits"})
    record = {"format": 1, "experiment_yaml_sha256": sha(text), "definition": definition, "seeds": list(seeds),
              "history": history, "allow_mixed_commits": bool(allow_mixed or (manifest or {}).get("allow_mixed_commits"))}
    workdir.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(workdir / COPY, text, per_process=True)
    rundir.write_atomic(workdir / MANIFEST, json.dumps(record, indent=1) + "\n", per_process=True)


def code_of(folder: Path) -> dict | None:
    """The `code` record of a finished run folder's results.json (None when it has none or is unfinished)."""
    path = folder / rundir.RESULTS
    if not path.is_file():
        return None
    raw = read_json(path, "the run did not finish cleanly: move its folder away and re-run to train it again")
    code = raw.get("code")
    return code if isinstance(code, dict) else None


def version_name(code: dict) -> str:
    """A code record in words: the commit's first 12 digits, '+dirty' for a changed tree."""
    return f"{str(code.get('commit'))[:12]}{'+dirty' if code.get('dirty') else ''}"


def check_commits(folders: Sequence[Path], current: dict, allow: bool) -> dict[str, list[str]]:
    """{code version: the finished folders that ran on it} with this process's version for what it will train; refuses
    a second commit in one line unless `allow`. Runs without a recorded commit are left out."""
    seen: dict[str, list[str]] = {}
    for folder in folders:
        code = code_of(folder)
        if code and code.get("commit"):
            seen.setdefault(version_name(code), []).append(str(folder))
    if current.get("commit"):
        seen.setdefault(version_name(current), [])
    if len(seen) > 1 and not allow:
        mine = version_name(current) if current.get("commit") else None
        other = next(k for k in seen if k != mine)
        raise ExperimentError(f"cells of this experiment ran on commit {other} ({seen[other][0]}, ...) and this code is "
                              f"{mine or 'another commit'}; check out {other} to go on, or pass --allow-mixed-commits "
                              "(recorded in the experiment's files)")
    return seen


def finished_folders(workdir: Path) -> list[Path]:
    """Every run folder with a results.json under the experiment folder (search cells and seeds)."""
    return sorted(p.parent for p in workdir.rglob(rundir.RESULTS) if "report" not in p.relative_to(workdir).parts)

