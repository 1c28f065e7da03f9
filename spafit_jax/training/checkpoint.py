"""Orbax checkpoints of the train state, tied to a fingerprint of the frozen base and the plan.

A checkpoint holds what changes during fine-tuning (the state given to `Checkpointer.save`:
trainable parameters, optimizer state, step, RNG key data), the run's JSON `extra` (data
position, best metric, ...) and the `fingerprint` of the frozen base model and the plan;
`restore` refuses a checkpoint made from another base or plan. Layout of `<directory>/<step>/`:
  state/    the state pytree as Orbax saves it (OCDBT), one entry per array leaf named by its
            path (`trainable.bert...bias`, `opt_state.1.inner_states...`); `None`,
            `MaskedNode` and `EmptyState` hold no data.
  meta/     JSON {"format": 2, "fingerprint": {...}, "extra": {...}}.
  metrics/  JSON written by Orbax when `keep_best` ranks the steps.
Format 1 stored the same leaves under the same path names in nested dicts; `restore` places
leaves by path, so it reads both.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it once every item and
every process has finished, so a crash mid-save leaves the previous step as the latest (the
leftovers are deleted when the next `Checkpointer` opens the folder). `save` is asynchronous:
it returns once the arrays are copied off the devices; `wait()` / `close()` block until they
are on disk. Multi-host: every process calls `save`, `restore`, `wait` and `close` with the
same arguments; Orbax coordinates the writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from spafit_jax.errors import CheckpointError

log = logging.getLogger("spafit_jax")

FORMAT = 2

__all__ = ["Checkpointer", "fingerprint", "FORMAT"]


def fingerprint(frozen_params: Any, labels: Any, *, model_name: str) -> dict[str, str]:
    """Identify the frozen base model and the trainability plan of a run.

    Returns {"base": sha256 over each frozen leaf's path, shape, dtype and bytes (None leaves,
    i.e. trainable ones, skipped), "plan": sha256 over the sorted (path, label) pairs,
    "model": model_name (for messages)}. A frozen leaf sharded across hosts is all-gathered,
    so every process must call this.
    """
    base = hashlib.sha256()
    for path, leaf in sorted(ocp.tree.to_flat_dict(frozen_params, sep="/").items()):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        arr = np.ascontiguousarray(jax.device_get(leaf))
        raw = arr.reshape(-1).view(np.uint8)
        base.update(json.dumps([path, list(arr.shape), str(arr.dtype), raw.size]).encode() + b"\n")
        base.update(raw)
    pairs = sorted((path, str(label)) for path, label in ocp.tree.to_flat_dict(labels, sep="/").items())
    plan = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return {"base": base.hexdigest(), "plan": plan, "model": str(model_name)}


def _json(obj: Any, what: str) -> Any:
    """A JSON round trip of `obj` (numpy / jax scalars and arrays become Python numbers / lists)."""
    try:
        return json.loads(json.dumps(obj, default=lambda x: np.asarray(x).tolist()))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON serialisable: {e}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _broken_step(directory: str) -> int | None:
    """The first step whose small JSON files (read when the folder is opened) do not parse."""
    for step in sorted(int(p.name) for p in Path(directory).glob("*") if p.name.isdigit()):
        for f in (Path(directory, str(step), "_CHECKPOINT_METADATA"), Path(directory, str(step), "metrics/metrics")):
            try:
                json.loads(f.read_text()) if f.exists() else None
            except (OSError, ValueError):
                return step
    return None


class _Unretrieved(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" records of reads from `directory` (see `quiet_closed_loops`)."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).endswith("exception was never retrieved") and self.directory in str(e))


def quiet_closed_loops(directory: str | None = None) -> None:
    """Drops, from now on, what TensorStore's reads still in flight report after Orbax's restore of a damaged
    checkpoint has failed: the "Event loop is closed" RuntimeErrors (unraisable, one per array) and, for reads
    from `directory`, asyncio's "exception was never retrieved" records. Any other unraisable exception or
    record is kept. Idempotent."""
    import sys

    if directory is not None:
        logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _Unretrieved) and f.directory == directory for f in logger.filters):
            logger.addFilter(_Unretrieved(directory))
    previous = sys.unraisablehook
    if getattr(previous, "_spafit_quiet", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._spafit_quiet = True
    sys.unraisablehook = hook


def _describe(x: Any) -> str:
    return f"{np.dtype(x.dtype)}{list(x.shape)}"


class _Unreadable(CheckpointError):
    """A step whose files cannot be read (an older step may still be)."""


class Checkpointer:
    """Saves and restores train states in `directory` with an Orbax `CheckpointManager`.

    Keeps the newest `keep` steps and, when `keep_best`, also the step with the highest finite
    `metrics[best_metric]` among those saved with it, however old. Use as a context manager or
    call `close()` at the end.
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Mapping[str, str], keep: int,
                 keep_best: bool, best_metric: str | None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if keep_best and not best_metric:
            raise ValueError("keep_best=True needs best_metric (the metric to rank steps by)")
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = {k: str(v) for k, v in fingerprint.items()}
        self._best = best_metric if keep_best else None
        keep_policies = [policies.LatestN(n=keep)]
        if keep_best:
            keep_policies.append(policies.BestN(get_metric_fn=self._score, n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            best_fn=self._score if keep_best else None,  # makes Orbax store and reload the metrics
            cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except Exception as e:
            broken = _broken_step(self.directory)
            if broken is not None:
                raise self._unreadable(broken, e) from e
            raise CheckpointError(f"cannot open checkpoint folder {self.directory} ({_one_line(e)}); check the path "
                                  "and its permissions, or use a new --workdir") from e

    def _score(self, metrics: Mapping[str, Any]) -> float:
        value = float(metrics.get(self._best, -math.inf))
        return value if math.isfinite(value) else -math.inf

    def latest_step(self) -> int | None:
        """The newest finalised step, or None when the folder holds no checkpoint."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """The finalised steps in the folder, oldest first."""
        return sorted(self._mngr.all_steps())

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among those ranked (None without `keep_best` or ranked steps)."""
        return self._mngr.best_step() if self._best else None

    def save(self, step: int, state: Any, *, extra: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Save the pytree `state` and the JSON `extra` as step `step`.

        `metrics` rank the step for `keep_best`; a step without a finite `metrics[best_metric]`
        is kept only while among the newest `keep`. Returns False (writing nothing) when the step
        exists or Orbax's policy declines it (a step older than the latest, unless `force`).
        """
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "extra": _json(dict(extra), "extra")}
        ranked = _json(dict(metrics), "metrics") if self._best and metrics else None
        if ranked is not None and self._score(ranked) == -math.inf:
            ranked = None
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        try:
            return bool(self._mngr.save(step, args=args, metrics=ranked, force=force))
        except Exception as e:
            raise CheckpointError(f"cannot write checkpoint {self._where(step)} ({_one_line(e)}); check free disk "
                                  "space and permissions") from e

    def wait(self) -> None:
        """Block until pending asynchronous saves are finalised on disk."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"a checkpoint save in {self.directory} failed ({_one_line(e)}); check free disk "
                                  "space and permissions") from e

    def close(self) -> None:
        """Wait for pending saves, then release the manager."""
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _where(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
        return _Unreadable(f"checkpoint {self._where(step)} is unreadable ({_one_line(e)}); delete that folder "
                               "to resume from an earlier step, or use a new --workdir")

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore step `step` (latest if None) as host numpy arrays in the structure of `template`.

        `template` is a host state like the saved one (numpy or jax arrays; only the structure,
        shapes and dtypes are used). Returns (state, extra). Without `step`, an unreadable newest
        checkpoint falls back to the newest readable one, with a warning naming both. Raises a
        one-line CheckpointError when the step is missing or unreadable, the fingerprint differs,
        or the saved leaves do not fit the template. Every process must call this.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train from scratch or point --workdir at a "
                                  "run that saved one")
        if step is not None:
            return self._restore(template, int(step), steps)
        for newer, older in zip(steps, steps[1:]):
            try:
                return self._restore(template, newer, steps)
            except _Unreadable as e:
                log.warning("%s; trying the next older one, step %d, instead", e, older)
        return self._restore(template, steps[-1], steps)

    def _restore(self, template: Any, step: int, steps: list[int]) -> tuple[Any, dict]:
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (found: {sorted(steps)}); "
                                  "pick one of those steps")
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            saved = self._mngr.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
        except Exception as e:
            raise self._unreadable(step, e) from e
        if not isinstance(meta, dict) or "fingerprint" not in meta or "extra" not in meta:
            raise CheckpointError(f"checkpoint {self._where(step)} was not written by spafit_jax (no fingerprint); "
                                  "use a new --workdir")
        if meta.get("format", 1) > FORMAT:
            raise CheckpointError(f"checkpoint {self._where(step)} has format {meta['format']}, newer than this "
                                  f"spafit_jax reads ({FORMAT}); upgrade spafit_jax or use a new --workdir")
        self._check_fingerprint(meta["fingerprint"])
        self._check_fits(step, ocp.tree.to_flat_dict(saved, sep="/"), ocp.tree.to_flat_dict(template, sep="/"))
        # Read what is on disk as host numpy arrays (whatever its sharding was), then place it by path.
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        quiet_closed_loops(self.directory)  # a damaged array fails the restore while the reads of the others still finish
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy))
        try:
            flat = ocp.tree.to_flat_dict(self._mngr.restore(step, args=args)["state"], sep="/")
        except Exception as e:
            raise self._unreadable(step, e) from e
        return ocp.tree.from_flat_dict(flat, target=template, sep="/"), meta["extra"]

    def _check_fingerprint(self, saved: Mapping[str, str]) -> None:
        # Another plan freezes other leaves, so the base hashes are comparable only when the plans
        # agree; when they do not, the model name tells the two causes apart.
        other_plan = saved.get("plan") != self.fingerprint.get("plan")
        other_name = saved.get("model") != self.fingerprint.get("model")
        other_base = saved.get("base") != self.fingerprint.get("base")
        if (other_plan and other_name) or (not other_plan and other_base):
            raise CheckpointError(f"checkpoint in {self.directory} was made from a different base model "
                                  f"({saved.get('model', 'unknown')}); use a new --workdir or the same model")
        if other_plan:
            raise CheckpointError(f"checkpoint in {self.directory} was made with a different trainability plan "
                                  "(method / n1 / n2 / LoRA targets and ranks); use a new --workdir or the same "
                                  "method settings")

    def _check_fits(self, step: int, saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose leaves (paths, shapes, dtypes) differ from the template's."""
        where = f"checkpoint {self._where(step)} does not fit this run's state"
        fix = "use a new --workdir or the settings the checkpoint was made with"
        missing = sorted(wanted.keys() - saved.keys())
        if missing:
            raise CheckpointError(f"{where}: it lacks {missing[:5]}; {fix}")
        unexpected = sorted(saved.keys() - wanted.keys())
        if unexpected:
            raise CheckpointError(f"{where}: it has extra leaves {unexpected[:5]}; {fix}")
        for path, want in wanted.items():
            got = saved[path]
            if tuple(got.shape) != tuple(np.shape(want)) or np.dtype(got.dtype) != np.dtype(want.dtype):
                raise CheckpointError(f"{where}: {path} is {_describe(got)} there but {_describe(want)} here; {fix}")
