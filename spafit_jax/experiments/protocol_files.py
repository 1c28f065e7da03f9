"""What the protocol reads and writes: JSON read with a one-line error, and an output folder written only where
the protocol wrote before.

`read_json` turns a missing, unreadable or damaged file into a `ProtocolError` naming the file and the fix.
`write_outputs` checks the output folder before anything is computed into it: it must be a folder (or not exist
yet), and each file about to be written must be absent or one the protocol wrote there unchanged (its marker,
`.spafit-protocol.json`, lists each file it wrote with its sha256). Everything is written into a temporary
folder inside it first and moved into place once complete; on failure the temporary folder (and a folder made
for the output) is removed, so nothing is left half-written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax.experiments import intervals
from spafit_jax.errors import SpafitError

MARKER = ".spafit-protocol.json"  # in every folder the protocol wrote: {"files": {name: sha256}}


class ProtocolError(SpafitError):
    """Nothing to report, or an input or output the protocol cannot use (one line: the file and the fix)."""


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in `path`; a ProtocolError naming the file and `fix` when it is missing, unreadable, not
    JSON or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProtocolError(f"{path} not found; {fix}") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except OSError as e:
        raise ProtocolError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path} is not a JSON object; {fix}")
    return obj


def check_score(recorded: Any, pred: np.ndarray, labels: np.ndarray, metric: str, what: str, source: str,
                fix: str) -> None:
    """Refuses a recorded test score ({metric: value}) that the predictions it came from do not give."""
    value = recorded.get(metric) if isinstance(recorded, dict) else None
    recomputed = intervals.metric_fn(metric)(pred, labels)
    if not isinstance(value, (int, float)) or not math.isclose(value, recomputed, rel_tol=1e-9, abs_tol=1e-12):
        raise ProtocolError(f"{what} {metric} {value} is not the {recomputed:.6g} of {source} (mismatched files); {fix}")


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise TypeError(what)


def check_index(index: Any, path: Path) -> dict:
    """`index` (a selection.json) checked for the fields the protocol reads; a ProtocolError naming `path` if not."""
    fix = "it is not a selection.json written by the experiment; rerun the experiment to write it again"
    try:
        _need(isinstance(index, dict) and isinstance(index["choices"], dict), "choices")
        _need(isinstance(index["seeds"], list) and isinstance(index.get("search", []), list), "seeds, search")
        for e in [*index["seeds"], *index.get("search", [])]:
            _need(isinstance(e["task"], str) and isinstance(e["method"], str) and isinstance(e["folder"], str), "task")
            _need(not Path(e["folder"]).is_absolute() and ".." not in Path(e["folder"]).parts, "folder")
        for e in [*index["seeds"], *index.get("search", [])]:
            _need(e.get("budget") is None or isinstance(e["budget"], str) and e["budget"], "budget")
        for e in index["seeds"]:
            _need(isinstance(e["seed"], int), "seed")
        for e in index.get("search", []):
            _need(isinstance(e["point"], dict) and isinstance(e["label"], str), "point")
        for key, c in index["choices"].items():
            _need("/" in key and isinstance(c, dict) and isinstance(c["metric"], str), "metric")
            _need(isinstance(c.get("chosen"), (dict, type(None))) and isinstance(c.get("ties", []), list)
                  and isinstance(c.get("failed", []), list), "chosen, ties, failed")
            _need(c.get("dev") is None or isinstance(c["dev"], (int, float)), "dev")
            _need(all(isinstance(c.get(k, []), list) for k in ("rests_on", "extensions", "commits")),
                  "rests_on, extensions, commits")
            _need(all(isinstance(x, dict) and isinstance(x.get("key"), str) and "value" in x
                      for x in c.get("extensions", [])), "extensions")
            _need(all(isinstance(x, str) for x in c.get("commits", [])), "commits")
            _need(c.get("bracketed") in (None, True, False) and isinstance(c.get("extension_stopped") or "", str),
                  "bracketed, extension_stopped")
        _need(isinstance(index.get("commits", {}), dict) and index.get("mixed_commits") in (None, True, False),
              "commits, mixed_commits")
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"{path}: {fix} (bad or missing field {e})") from None
    return index


def check_labels(runs: dict) -> None:
    """Every seed of a task must have been scored on the same test labels."""
    first: dict[str, tuple] = {}
    for (task, method), seeds in runs.items():
        for r in seeds:
            seen = first.setdefault(task, (f"{method} seed {r['seed']}", r["labels"]))
            if not np.array_equal(seen[1], r["labels"]):
                raise ProtocolError(f"{task}: {method} seed {r['seed']} was scored on other test labels than "
                                    f"{seen[0]}; delete the stale test.json and rerun the experiment to score it again")


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _ours(out: Path) -> dict[str, str]:
    """{name: sha256} from the marker of a folder the protocol wrote ({} when absent or damaged)."""
    try:
        files = json.loads((out / MARKER).read_text(encoding="utf-8")).get("files")
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def check_out(out: Path, names: Sequence[str], flag: str) -> None:
    """Refuses (ProtocolError) an `out` that is not a folder, sits under a file, or holds any of `names` that the
    protocol did not write there or that changed since."""
    if out.exists() and not out.is_dir():
        raise ProtocolError(f"{flag} {out} is a file, not a folder; name a new folder (or one protocol wrote)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ProtocolError(f"{flag} {out}: {parent} is a file, not a folder; name a folder under a folder")
    if not out.exists():
        return
    ours = _ours(out)
    for name in names:
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            same = not path.is_symlink() and path.is_file() and ours.get(name) == sha256(path)
        except OSError as e:
            raise ProtocolError(f"{flag} {out}: {name} cannot be read ({e.strerror or e}); name another folder") from None
        if not same:
            raise ProtocolError(f"{flag} {out} already holds {name}, which protocol did not write there (or which "
                                "changed since); move it aside or name another folder")


def write_outputs(out: Path, texts: Mapping[str, str | bytes], draw: Callable[[Path], list[str]] | None,
                  names: Sequence[str], *, flag: str = "--out") -> list[str]:
    """Writes `texts` ({relative name: text or bytes}) and the files `draw(folder)` makes into `out`, after
    `check_out(out, names)`; returns the names written. All or nothing (see the module's docstring)."""
    out = Path(out)
    check_out(out, names, flag)
    made = not out.exists()
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".protocol-", dir=out))
        for name, text in texts.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        drawn = draw(tmp) if draw is not None else []
        written = [*texts, *drawn]
        unexpected = sorted(set(written) - set(names))
        if unexpected:
            raise ProtocolError(f"internal: {', '.join(unexpected)} not checked before writing")
        ours = {**_ours(out), **{name: sha256(tmp / name) for name in written}}
        for name in written:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
        (out / MARKER).write_text(json.dumps({"files": ours}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return written
    except OSError as e:
        raise ProtocolError(f"{flag} {out} cannot be written ({e.strerror or e}); name a writable folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if made and out.is_dir() and not (out / MARKER).exists():
            shutil.rmtree(out, ignore_errors=True)
