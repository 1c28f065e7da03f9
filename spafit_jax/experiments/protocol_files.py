"""What the protocol reads and writes: JSON read with a one-line error, and an output folder written only where
the protocol wrote before.

`read_json` turns a missing, unreadable or damaged file into a `ProtocolError` naming the file and the fix.
`write_outputs` writes the tables, pictures and evidence by the package's one rule for a command's files in a
shared folder (`outputs.write_files`, refusals are `OutputError`s): `out` must be a folder (or not exist yet),
and each file about to be written must be absent or one the protocol wrote there and nobody changed since (its
marker, `.spafit-protocol.json`, records each file it wrote with its sha256). All or nothing: on failure nothing
is left half-written, and a folder made for the output is removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spafit_jax.after_training import outputs
from spafit_jax.experiments import intervals
from spafit_jax.errors import SpafitError

COMMAND = "protocol"  # its marker in --out: .spafit-protocol.json (outputs.marker_of)


class ProtocolError(SpafitError):
    """Nothing to report, or an input the protocol cannot use (one line: the file and the fix); an output folder it
    may not write is `outputs.OutputError`'s."""


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


def write_outputs(out: Path, texts: Mapping[str, str | bytes], draw: Callable[[Path], list[str]] | None,
                  names: Sequence[str], *, flag: str = "--out") -> list[str]:
    """Writes `texts` ({relative name: text or bytes}) and the files `draw(folder)` makes into `out` by
    `outputs.write_files` (its rule, checked for `names` first: see the module's docstring); returns the names
    written, the texts first."""
    written: list[str] = []

    def build(folder: Path) -> None:
        for name, text in texts.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        written[:] = [*texts, *(draw(folder) if draw is not None else [])]

    outputs.write_files(out, build, COMMAND, flag=flag, names=names)
    return written
