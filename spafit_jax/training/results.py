"""results.json as one typed record: `Results`, written by the trainer, read by the report and `load_run`.

The trainer builds a `Results` once at the end of a run and writes it (`write`, atomically, strict
JSON); the report and anything else that reads a finished run reads it back with `read`, which
names the file and the field when it is damaged. Fields added after a run was written read as
their defaults (None), so older run folders still load.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import numbers
import subprocess
from pathlib import Path
from typing import Any

from spafit_jax.training import rundir
from spafit_jax.errors import SpafitError


class ResultsError(SpafitError):
    """A results.json that is missing, not JSON or lacks a field."""


@dataclasses.dataclass(frozen=True)
class Best:
    """The best evaluation of a run: its step, the metric ranked and its value."""

    step: int
    metric: str
    value: float


@dataclasses.dataclass(frozen=True)
class Results:
    """What a finished run reports. Plan fields (`Plan.describe`), metrics, timings, shapes and devices."""

    task: str
    method: str
    model: str
    trainable_params: int
    total_params: int
    eval: dict[str, float]  # the first eval split's metrics at the end of training
    steps: int
    best: Best | None = None
    eval_splits: dict[str, dict[str, float]] | None = None  # every eval split's metrics
    n1: int | None = None  # spafit's strata, None for the other methods
    n2: int | None = None
    stratum3_bias: bool | None = None
    bias_stand_in: str | None = None  # "layernorm" when a model without biases trains its norm scales instead
    trainable_percent: float | None = None
    params_by_label: dict[str, int] | None = None
    layer_kinds: list[str] | None = None  # what each encoder layer trains (`Plan.layer_kinds`)
    train_seconds: float | None = None
    eval_seconds: float | None = None
    examples_per_second: float | None = None
    compile_seconds: float | None = None
    padding_efficiency: float | None = None  # real tokens / padded tokens of the whole run
    compiled_shapes: int | None = None
    buckets: list[int] | None = None
    bad_steps: int | None = None
    devices: int | None = None
    processes: int | None = None
    parallel: str | None = None
    frozen_cache: dict[str, Any] | None = None  # {"n1", "bytes", "seconds"} when train.cache_frozen was on
    packing: dict[str, Any] | None = None  # data.packing: `packing.describe` (rows per step, segments per row, ...)
    code: dict[str, Any] | None = None  # the code it ran on: {"version", "commit", "dirty"} (`code_version`)

    @property
    def splits(self) -> dict[str, dict[str, float]]:
        """Every eval split's metrics (older results hold only `eval`)."""
        return self.eval_splits or {"eval": self.eval}

    def to_json(self) -> dict[str, Any]:
        """The record as results.json holds it (non-finite floats become null on writing)."""
        return dataclasses.asdict(self)

    def write(self, workdir: Path) -> Path:
        """`<workdir>/results.json`, written atomically (a crash leaves the old file or none)."""
        path = Path(workdir) / rundir.RESULTS
        rundir.write_atomic(path, json.dumps(rundir.finite_json(self.to_json()), indent=2, allow_nan=False))
        return path


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The code this process runs: {"version": the package version, "commit": the git commit of the checkout the
    package is imported from, "dirty": whether its tracked files differ from that commit}; commit and dirty are
    None where the package is not in a git checkout (an installed wheel) or git is missing."""
    try:
        __version__ = importlib.metadata.version("spafit-jax")  # what spafit_jax.__version__ reads
    except importlib.metadata.PackageNotFoundError:
        __version__ = "0+unknown"
    root = next(p for p in Path(__file__).resolve().parents if p.name == "spafit_jax").parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:  # the package sits in someone else's repository
        return {"version": __version__, "commit": None, "dirty": None}
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"version": __version__, "commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


_REQUIRED = [f.name for f in dataclasses.fields(Results) if f.default is dataclasses.MISSING]


def read(path: str | Path) -> Results:
    """The Results of a results.json (or of the run folder holding one). Raises ResultsError, one line
    naming the file and what is wrong, for a missing or damaged file; unknown fields are ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / rundir.RESULTS
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); the run did not finish "
                           "cleanly: re-run its training command to finish it") from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{path} holds a JSON {type(raw).__name__}, not the results object; re-run the training "
                           "command with --overwrite to write it again")
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ResultsError(f"{path} lacks {', '.join(missing)}; it is damaged or not a spafit_jax results file: "
                           "re-run the training command with --overwrite to write it again")
    if not isinstance(raw["eval"], dict) or not all(isinstance(v, numbers.Real) or v is None
                                                    for v in raw["eval"].values()):
        raise ResultsError(f"{path}: field eval is not a mapping of metric names to numbers; re-run the training "
                           "command with --overwrite to write it again")
    best = raw.get("best")
    if best is not None:
        if not isinstance(best, dict) or not {"step", "metric", "value"} <= set(best):
            raise ResultsError(f"{path}: field best is not {{step, metric, value}}; re-run the training command "
                               "with --overwrite to write it again")
        best = Best(best["step"], best["metric"], best["value"])
    known = {f.name for f in dataclasses.fields(Results)}
    return Results(**{**{k: v for k, v in raw.items() if k in known}, "best": best})
