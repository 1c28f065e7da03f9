"""The evidence `protocol --publish DIR` writes beside its tables, and the reader `protocol --from-published DIR` uses.

DIR/evidence/ holds:

- `selection.json`: the experiment's index (splits, search cells, choices, seeds), as the experiment wrote it.
- `cells.json`: {"counts", "cells"}: one entry per distinct run folder of the experiment (a seed-0 cell that is
  also its method's search cell counts once) with its roles (search, seed), task, method, seed, searched point,
  `results.json`, `config.yaml` (as a mapping), `test.json` when the cell was scored on test, and the code
  commit it ran on where the run recorded one, and the one-line error of a cell that failed. `counts`: the
  distinct trainings, search cells, seed runs, seeds that reused their search cell, cells scored on test,
  cells failed or unfinished, and runs per commit.
- `predictions-<task>.npz`: the test `labels` and, per scored seed, its predicted classes (or regression scores)
  under `<method>@seed<k>`: everything the protocol's tables are computed from.

Machine paths are dropped: a path inside the experiment folder becomes relative to it; any other absolute
path keeps only its last part, after `<local>/`.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import yaml

from spafit_jax.training import rundir
from spafit_jax.experiments.protocol_files import ProtocolError, check_index, check_labels, check_score, read_json

FOLDER = "evidence"
COMMIT_KEYS = ("code_version", "commit", "git_commit", "code")  # what a run may record its code version under
_ABSOLUTE = re.compile(r"(?<![\w.~-])~?/[^\s'\"/:,;()]+(?:/[^\s'\"/:,;()]+)*/?")


def scrub(obj, root: Path):
    """`obj` (JSON-like) with every absolute path in its strings made relative to `root` when under it, else
    replaced by `<local>/<last part>`."""
    base = str(Path(root).resolve())

    def one(m: re.Match) -> str:
        path = m.group(0)
        if path.startswith(base + "/") or path == base:
            return path[len(base):].lstrip("/") or "."
        return "<local>/" + (Path(path).name or "")

    if isinstance(obj, str):
        return _ABSOLUTE.sub(one, obj)
    if isinstance(obj, dict):
        return {scrub(k, root): scrub(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, root) for v in obj]
    return obj


def commit_of(*records: dict | None) -> str | None:
    """The code commit a run recorded (the first of COMMIT_KEYS found in its results.json or test.json), or None;
    results.json's `code` ({"version", "commit", "dirty"}, `results.code_version`) gives "<commit>+dirty" when its
    tree differed from the commit."""
    for record in records:
        for key in COMMIT_KEYS:
            value = (record or {}).get(key)
            dirty = isinstance(value, dict) and value.get("dirty") is True
            if isinstance(value, dict):
                value = value.get("commit") or value.get("sha")
            if isinstance(value, str) and value:
                return value + ("+dirty" if dirty else "")
    return None


def version_of(*records: dict | None) -> str | None:
    """`commit_of` as the experiment names code versions (`expstate.version_name`: the commit's first 12 digits,
    '+dirty' for a changed tree), or None when no commit was recorded."""
    commit = commit_of(*records)
    if commit is None:
        return None
    dirty = commit.endswith("+dirty")
    return commit.removesuffix("+dirty")[:12] + ("+dirty" if dirty else "")


def _config(folder: Path) -> dict | None:
    path = folder / rundir.CONFIG
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ProtocolError(f"{path} is not readable YAML ({str(e).splitlines()[0][:80]}); delete the cell's folder "
                            "and rerun the experiment") from None
    return raw if isinstance(raw, dict) else None


def _cells(exp: Path, index: dict) -> list[dict]:
    """One entry per distinct run folder of the index (search cells first, then seeds), in the index's order."""
    cells: dict[str, dict] = {}
    for role, entries in (("search", index.get("search", [])), ("seed", index["seeds"])):
        for e in entries:
            cell = cells.setdefault(e["folder"], {"folder": e["folder"], "roles": [], "task": e["task"],
                                                  "method": e["method"], "seed": e.get("seed", 0),
                                                  "point": e.get("point")})
            if role not in cell["roles"]:
                cell["roles"].append(role)
    for cell in cells.values():
        folder = exp / cell["folder"]
        fix = "the run is damaged: delete its folder and rerun the experiment"
        results = read_json(folder / rundir.RESULTS, fix) if (folder / rundir.RESULTS).is_file() else None
        test = read_json(folder / "test.json", fix) if (folder / "test.json").is_file() else None
        error = folder / rundir.ERROR
        cell.update(results=results, config=_config(folder), test=test, commit=commit_of(results, test),
                    error=error.read_text(encoding="utf-8", errors="replace").strip() if error.is_file() else None)
    return list(cells.values())


def counts(cells: list[dict]) -> dict:
    """The exact counts of the experiment's runs: distinct trainings (finished run folders), search cells, seed
    runs, seed runs that are their search cell, cells scored on test, cells failed or unfinished, runs per commit,
    and `mixed_commits`: whether the finished runs recorded more than one commit."""
    done = [c for c in cells if c["results"] is not None]
    commits: dict[str, int] = {}
    for c in done:
        commits[c["commit"] or "not recorded"] = commits.get(c["commit"] or "not recorded", 0) + 1
    return {"trainings": len(done), "search_cells": sum("search" in c["roles"] for c in cells),
            "seed_runs": sum("seed" in c["roles"] for c in cells),
            "seed_runs_that_are_search_cells": sum(c["roles"] == ["search", "seed"] for c in cells),
            "scored_on_test": sum(c["test"] is not None for c in cells),
            "failed_or_unfinished": len(cells) - len(done), "commits": commits,
            "mixed_commits": len([k for k in commits if k != "not recorded"]) > 1}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _compact(pred: np.ndarray) -> np.ndarray:
    """Class ids as the smallest integer type that holds them; scores as they are."""
    if np.issubdtype(pred.dtype, np.integer) and len(pred) and -32768 <= pred.min() and pred.max() < 32768:
        return pred.astype(np.int16)
    return pred


def build(exp: Path, data: dict) -> dict[str, str | bytes]:
    """{name under the published folder: content} of the evidence of the experiment `exp` (`protocol.collect`'s
    `data`)."""
    cells = scrub(_cells(exp, data["index"]), exp)
    out: dict[str, str | bytes] = {
        f"{FOLDER}/selection.json": json.dumps(scrub(data["index"], exp), indent=1) + "\n",
        f"{FOLDER}/cells.json": json.dumps({"counts": counts(cells), "cells": cells}, indent=1) + "\n"}
    for task in dict.fromkeys(t for t, _ in data["runs"]):
        arrays = {}
        for (t, method), seeds in data["runs"].items():
            if t == task:
                arrays["labels"] = seeds[0]["labels"]
                arrays.update({f"{method}@seed{r['seed']}": _compact(r["pred"]) for r in seeds})
        out[f"{FOLDER}/predictions-{task}.npz"] = _npz(arrays)
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "publish the folder again with protocol --publish"
    if not path.is_file():
        raise ProtocolError(f"{path} not found; {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ProtocolError(f"{path} is not readable ({type(e).__name__}); {fix}") from None


def read(published: Path) -> dict:
    """`protocol.collect`'s data rebuilt from a published folder's evidence (predictions, tests, results)."""
    root = Path(published) / FOLDER
    fix = "publish the folder again with protocol --publish"
    if not root.is_dir():
        raise ProtocolError(f"{root} not found: {published} holds no published evidence; {fix}")
    index = check_index(read_json(root / "selection.json", fix), root / "selection.json")
    listed = read_json(root / "cells.json", fix).get("cells")
    if not isinstance(listed, list) or not all(isinstance(c, dict) and "folder" in c for c in listed):
        raise ProtocolError(f"{root / 'cells.json'} lacks its cells; {fix}")
    cells = {c["folder"]: c for c in listed}
    predictions: dict[str, dict] = {}
    runs: dict[tuple[str, str], list] = {}
    for e in index["seeds"]:
        cell = cells.get(e["folder"]) or {}
        if not isinstance(cell.get("test"), dict):
            continue
        task = e["task"]
        if task not in predictions:
            predictions[task] = _load_npz(root / f"predictions-{task}.npz")
        key = f"{e['method']}@seed{e['seed']}"
        arrays = predictions[task]
        if key not in arrays or "labels" not in arrays or len(arrays[key]) != len(arrays["labels"]):
            raise ProtocolError(f"{root / f'predictions-{task}.npz'} lacks {key} (or its labels); {fix}")
        metric = (index["choices"].get(f"{task}/{e['method']}") or {}).get("metric")
        check_score(cell["test"].get("metrics"), arrays[key], arrays["labels"], metric,
                    f"{root / 'cells.json'}: {e['folder']}'s test", f"{key} in predictions-{task}.npz", fix)
        results = cell.get("results") or {}
        runs.setdefault((task, e["method"]), []).append(
            {**e, "test": cell["test"].get("metrics"), "dev": results.get("eval"), "pred": arrays[key],
             "labels": arrays["labels"], "params": results.get("trainable_params"),
             "train_seconds": results.get("train_seconds"), "version": version_of(results, cell["test"])})
    if not runs:
        raise ProtocolError(f"{root} holds no seed scored on test; {fix}")
    check_labels(runs)
    return {"index": index, "runs": runs}
