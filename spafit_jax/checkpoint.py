"""Orbax checkpoints of the trainable state, tied to a fingerprint of the frozen base.

A checkpoint holds only what changes during fine-tuning (the train state given to
`Checkpointer.save`: trainable parameters, optimizer state, step, RNG, ...) plus a JSON
item with the run's `extra` data (data position, metrics, seeds, config digest) and the
`fingerprint` of the frozen base model and the trainability plan. `restore` refuses a
checkpoint whose fingerprint differs from this run's.

Layout of `<directory>/<step>/`:
  state/  the state's leaves as a nested dict of arrays (Orbax StandardSave, OCDBT), keyed
          by the state's pytree path (`trainable/bert/.../bias`, `opt_state/0/mu/...`);
          `None` placeholders and empty nodes (optax `EmptyState`, `MaskedNode`) hold no
          data and are rebuilt from the restore template; typed PRNG keys are stored as
          their `jax.random.key_data` (uint32) and re-wrapped with the template's impl.
  meta/   JSON: {"format", "step", "fingerprint", "extra", "metrics", "prng_keys"}.
  metrics/ JSON written by Orbax when best-checkpoint tracking is on.

Atomicity: Orbax writes every step into a temporary folder
(`<step>.orbax-checkpoint-tmp-*`) and renames it to `<step>` only once all items and all
processes have finished (on object stores it writes `commit_success.txt` instead). A step
folder without that finalisation is never listed, so a crash mid-save leaves the previous
step as the latest readable one; leftovers of such a crash are deleted when the next
`Checkpointer` opens the folder. Old steps are pruned only after the new one is final.

Saves are asynchronous: `save` returns once the arrays are copied off the devices (so the
caller may donate or delete them); call `wait()` (or `close()`, or leave the `with` block)
before exiting. Multi-host: every process must call `save`, `restore`, `wait` and `close`
with the same arguments; Orbax coordinates the writes (each process writes its own
shards, process 0 the JSON and the finalisation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from spafit_jax.errors import CheckpointError

FORMAT = 1
_STATE = "state"
_META = "meta"

__all__ = ["Checkpointer", "fingerprint", "FORMAT"]


# --------------------------------------------------------------------------- paths


def _key_name(entry: Any) -> str:
    """One pytree path entry as a plain string."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(e) for e in path)


def _escape(name: str) -> str:
    # Orbax joins nested keys with "." (and "/" ends up in file names): keep keys plain.
    return name.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


# --------------------------------------------------------------------------- fingerprint


def _host_array(x: Any) -> np.ndarray:
    """A leaf as a host numpy array (all-gathered first when it spans several hosts)."""
    if _is_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def fingerprint(frozen_params: Any, labels: Any, *, model_name: str) -> dict[str, str]:
    """Identify the frozen base model and the trainability plan of a run.

    Args:
      frozen_params: the frozen part of the parameters (`masking.split(...)[1]`); `None`
        placeholders (trainable leaves) are skipped.
      labels: the label tree of the plan (str leaves, e.g. "frozen", "bias", "lora").
      model_name: the model as the user named it (shown in error messages only).

    Returns:
      {"base": sha256 hex over each frozen leaf's path, shape, dtype and bytes,
       "plan": sha256 hex over the sorted (path, label) pairs, "model": model_name}.
      Hashing runs on the host at memory speed (~1 GB in a few seconds). If a frozen
      leaf is sharded across hosts it is all-gathered, so every process must call this.
      A plan change also changes which leaves are frozen, hence "base"; `Checkpointer`
      therefore reports another plan as such while "model" is unchanged, and another
      base model when "plan" agrees but "base" differs, or when "model" differs too.
    """
    base = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(frozen_params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: _path_str(pl[0])):
        arr = np.ascontiguousarray(_host_array(leaf))
        raw = arr.reshape(-1).view(np.uint8)
        header = json.dumps([_path_str(path), list(arr.shape), str(arr.dtype), raw.size])
        base.update(header.encode() + b"\n")
        base.update(raw)
    pairs = sorted(
        (_path_str(path), str(label))
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
    )
    plan = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return {"base": base.hexdigest(), "plan": plan, "model": str(model_name)}


# --------------------------------------------------------------------------- state <-> nested dict


def _nested_items(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(escaped key tuple, leaf) for every leaf, in flatten order; checks uniqueness."""
    items = [
        (tuple(_escape(_key_name(e)) for e in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    seen: set[tuple[str, ...]] = set()
    for keys, _ in items:
        if keys in seen or not keys:
            raise ValueError(
                f"cannot checkpoint this state: two leaves share the path {'/'.join(keys)!r}"
            )
        seen.add(keys)
    return items


def _insert(nested: dict, keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        nested = nested.setdefault(k, {})
        if not isinstance(nested, dict):
            raise ValueError(f"cannot checkpoint this state: path clash at {'/'.join(keys)!r}")
    if keys[-1] in nested:
        raise ValueError(f"cannot checkpoint this state: path clash at {'/'.join(keys)!r}")
    nested[keys[-1]] = value


def _lookup(nested: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        nested = nested[k]
    return nested


def _to_saveable(state: Any) -> tuple[dict, dict[str, str]]:
    """The state as a nested dict of arrays, plus {path: prng impl} of its typed keys."""
    nested: dict = {}
    key_impls: dict[str, str] = {}
    for keys, leaf in _nested_items(state):
        if _is_key(leaf):
            key_impls["/".join(keys)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        elif isinstance(leaf, (bool, int, float, complex)):
            leaf = np.asarray(leaf)
        _insert(nested, keys, leaf)
    return nested, key_impls


def _extend_sharding(sharding: Any, extra_dims: int) -> Any:
    """The sharding of `key_data(k)` given the sharding of the key array `k`."""
    if sharding is None or extra_dims == 0:
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * extra_dims
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise ValueError(
        f"cannot restore a typed PRNG key onto sharding {sharding!r}; give the template a "
        "concrete key array or a NamedSharding"
    )


def _abstract_leaf(leaf: Any) -> Any:
    """What Orbax should restore for one template leaf."""
    if _is_key(leaf):
        if isinstance(leaf, jax.Array):
            data = jax.random.key_data(leaf)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
        data = jax.eval_shape(jax.random.key_data, leaf)
        sharding = _extend_sharding(
            getattr(leaf, "sharding", None), len(data.shape) - len(leaf.shape)
        )
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return np.asarray(leaf)  # numpy arrays and python / numpy scalars come back as numpy


def _key_impl_of(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.random.key_impl(leaf)
    impl = getattr(leaf.dtype, "_impl", None)  # abstract key (ShapeDtypeStruct)
    if impl is None:
        raise ValueError(f"cannot tell the PRNG impl of template leaf {leaf!r}")
    return impl


def _from_restored(template_leaf: Any, value: Any) -> Any:
    """Turn one restored array back into the template leaf's kind."""
    if _is_key(template_leaf):
        return jax.random.wrap_key_data(value, impl=_key_impl_of(template_leaf))
    if isinstance(template_leaf, (bool, int, float, complex)):
        return type(template_leaf)(np.asarray(value).item())
    if isinstance(template_leaf, np.generic):
        return np.asarray(value, dtype=template_leaf.dtype)[()]
    return value


def _describe(shape: Any, dtype: Any) -> str:
    return f"{np.dtype(dtype) if dtype is not None else '?'}{list(shape or ())}"


# --------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)) or isinstance(obj, jax.Array):
        return np.asarray(obj).tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _jsonable(obj: Any, what: str) -> Any:
    """A JSON round trip of `obj` (numpy / jax scalars become Python numbers)."""
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON serialisable: {e}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _find_broken_step(directory: str) -> str | None:
    """The first step folder whose small JSON files do not parse (for error messages)."""
    from etils import epath

    try:
        steps = sorted(
            (p for p in epath.Path(directory).iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        for step_dir in steps:
            for name in ("_CHECKPOINT_METADATA", "metrics/metrics", f"{_META}/metadata"):
                f = step_dir / name
                if f.exists():
                    json.loads(f.read_text())
    except json.JSONDecodeError:
        return str(step_dir)
    except Exception:  # noqa: BLE001 - best effort only
        return None
    return None


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Saves and restores train states in `directory` with an Orbax `CheckpointManager`.

    Keeps the newest `keep` steps and, when `keep_best`, also the step with the best
    `metrics[best_metric]` (max or min by `best_mode`) among the steps saved with that
    metric, however old. Use as a context manager, or call `close()` at the end.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: Mapping[str, str],
        keep: int = 2,
        keep_best: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if keep_best and not best_metric:
            raise ValueError("keep_best=True needs best_metric (the metric to rank steps by)")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.fingerprint = {k: str(v) for k, v in dict(fingerprint).items()}
        self.keep = int(keep)
        self.keep_best = bool(keep_best)
        self.best_metric = best_metric
        self.best_mode = best_mode

        try:
            from orbax.checkpoint import checkpoint_managers as policies

            preserve = [policies.LatestN(n=self.keep)]
            best_fn = None
            if self.keep_best:
                best_fn = self._metric_value
                preserve.append(
                    policies.BestN(
                        get_metric_fn=best_fn,
                        reverse=best_mode == "min",
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    )
                )
            preservation = policies.AnyPreservationPolicy(preserve)
        except (ImportError, AttributeError) as e:  # pragma: no cover - old orbax
            raise CheckpointError(
                f"orbax-checkpoint {ocp.__version__} lacks preservation policies ({e}); "
                "upgrade it: pip install -U orbax-checkpoint"
            ) from e

        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            best_fn=best_fn,  # makes Orbax store and reload per-step metrics
            best_mode=best_mode,
            cleanup_tmp_directories=True,  # remove the leftovers of a crash mid-save
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(
                directory,
                options=options,
                item_handlers={
                    _STATE: ocp.StandardCheckpointHandler(),
                    _META: ocp.JsonCheckpointHandler(),
                },
            )
        except Exception as e:
            broken = _find_broken_step(directory)
            if broken is not None:
                raise CheckpointError(
                    f"checkpoint {broken} is unreadable ({_one_line(e)}); delete that folder "
                    "to resume from an earlier step, or use a new --workdir"
                ) from e
            raise CheckpointError(
                f"cannot open checkpoint folder {directory} ({_one_line(e)}); check the path "
                "and its permissions, or use a new --workdir"
            ) from e

    # ------------------------------------------------------------------ queries

    def _metric_value(self, metrics: Any) -> float:
        worst = -math.inf if self.best_mode == "max" else math.inf
        try:
            value = float(metrics[self.best_metric])
        except (KeyError, TypeError, ValueError):
            return worst
        return worst if math.isnan(value) else value

    def step_dir(self, step: int) -> str:
        """The folder of one step (where its files are, for messages)."""
        return os.path.join(self.directory, str(int(step)))

    def latest_step(self) -> int | None:
        """The newest finalised step, or None when the folder holds no checkpoint."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalised step in the folder, ascending."""
        return sorted(self._mngr.all_steps())

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step when not tracking)."""
        return self._mngr.best_step()

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        extra: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save `state` (any pytree of arrays) and the JSON `extra` as step `step`.

        `metrics` (JSON numbers) rank the step for `keep_best`; a step saved without
        `metrics[best_metric]` is kept only while it is among the newest `keep`.
        Returns False (and writes nothing) when the step already exists or Orbax's save
        policy declines it (a step older than the latest one, unless `force`).
        Every process must call this in a multi-host run.
        """
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        nested, key_impls = _to_saveable(state)
        metrics_json = _jsonable(dict(metrics), "metrics") if metrics is not None else None
        meta = {
            "format": FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "extra": _jsonable(dict(extra), "extra"),
            "metrics": metrics_json,
            "prng_keys": key_impls,
        }
        ranked = None
        if self.keep_best and metrics_json is not None and self.best_metric in metrics_json:
            ranked = metrics_json
        try:
            return bool(
                self._mngr.save(
                    step,
                    args=ocp.args.Composite(
                        **{_STATE: ocp.args.StandardSave(nested), _META: ocp.args.JsonSave(meta)}
                    ),
                    metrics=ranked,
                    force=force,
                )
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot write checkpoint {self.step_dir(step)} ({_one_line(e)}); check free "
                "disk space and permissions"
            ) from e

    def wait(self) -> None:
        """Block until pending asynchronous saves are finalised on disk."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"a checkpoint save in {self.directory} failed ({_one_line(e)}); check free "
                "disk space and permissions"
            ) from e

    def close(self) -> None:
        """Wait for pending saves, then release the manager's resources."""
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.step_dir(step)} is unreadable ({_one_line(e)}); delete that "
            "folder to resume from an earlier step, or use a new --workdir"
        )

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no checkpoint in {self.directory}; train from scratch or point "
                    "--workdir at a run that saved one"
                )
        step = int(step)
        if step not in self._mngr.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (found: "
                f"{self.all_steps() or 'none'}); pick one of those steps"
            )
        return step

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON item of a step (latest if None), after checking the fingerprint."""
        step = self._resolve_step(step)
        try:
            restored = self._mngr.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )
            meta = restored[_META]
        except Exception as e:
            raise self._unreadable(step, e) from e
        if not isinstance(meta, dict) or "fingerprint" not in meta or "extra" not in meta:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} was not written by spafit_jax (no "
                "fingerprint); use a new --workdir"
            )
        self._check_fingerprint(meta["fingerprint"])
        return meta

    def _check_fingerprint(self, saved: Mapping[str, str]) -> None:
        # Another plan freezes other leaves, so the base hashes are comparable only when
        # the plans agree; when they do not, the model name tells the two causes apart.
        other_plan = saved.get("plan") != self.fingerprint.get("plan")
        other_name = saved.get("model") != self.fingerprint.get("model")
        other_base = saved.get("base") != self.fingerprint.get("base")
        if (other_plan and other_name) or (not other_plan and other_base):
            raise CheckpointError(
                f"checkpoint in {self.directory} was made from a different base model "
                f"({saved.get('model', 'unknown')}); use a new --workdir or the same model"
            )
        if other_plan:
            raise CheckpointError(
                f"checkpoint in {self.directory} was made with a different trainability plan "
                "(method / n1 / n2 / LoRA targets and ranks); use a new --workdir or the same "
                "method settings"
            )

    def _check_structure(self, step: int, items: list, abstract: dict) -> None:
        """Compare the template's leaves with what the checkpoint holds."""
        try:
            md = self._mngr.item_metadata(step)[_STATE]
            tree = getattr(md, "tree", md)
            saved = {
                tuple(_key_name(e) for e in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            }
        except Exception as e:
            raise self._unreadable(step, e) from e
        wanted = {keys for keys, _ in items}
        where = f"checkpoint {self.step_dir(step)} does not fit this run's state"
        fix = "use a new --workdir or the settings the checkpoint was made with"
        missing = sorted("/".join(k) for k in wanted - saved.keys())
        if missing:
            raise CheckpointError(f"{where}: it lacks {missing[:5]}; {fix}")
        unexpected = sorted("/".join(k) for k in saved.keys() - wanted)
        if unexpected:
            raise CheckpointError(f"{where}: it has extra leaves {unexpected[:5]}; {fix}")
        for keys, _ in items:
            want = _lookup(abstract, keys)
            got = saved[keys]
            got_shape = tuple(getattr(got, "shape", None) or ())
            got_dtype = getattr(got, "dtype", None)
            same_dtype = got_dtype is None or np.dtype(got_dtype) == np.dtype(want.dtype)
            if got_shape != tuple(want.shape) or not same_dtype:
                raise CheckpointError(
                    f"{where}: {'/'.join(keys)} is {_describe(got_shape, got_dtype)} there "
                    f"but {_describe(want.shape, want.dtype)} here; {fix}"
                )

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore step `step` (latest if None) into the structure of `template`.

        `template` is a pytree like the saved state (concrete arrays or
        `jax.ShapeDtypeStruct`s with `sharding=`); jax arrays come back with the
        template leaves' shardings and dtypes, numpy / Python leaves as the same kind.
        Returns (state, extra). Raises CheckpointError when the folder has no such step,
        the fingerprint differs (other base model or plan), the leaves do not match the
        template, or the files are unreadable. Every process must call this.
        """
        step = self._resolve_step(step)
        meta = self.read_meta(step)
        template_leaves, treedef = jax.tree_util.tree_flatten(template)
        items = _nested_items(template)
        abstract: dict = {}
        for keys, leaf in items:
            _insert(abstract, keys, _abstract_leaf(leaf))
        self._check_structure(step, items, abstract)
        try:
            restored = self._mngr.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
            )[_STATE]
            values = [
                _from_restored(leaf, _lookup(restored, keys))
                for (keys, _), leaf in zip(items, template_leaves)
            ]
        except Exception as e:
            raise self._unreadable(step, e) from e
        return jax.tree_util.tree_unflatten(treedef, values), meta["extra"]

    def metrics(self, step: int | None = None) -> dict | None:
        """The metrics saved with a step (latest if None), or None."""
        return self.read_meta(step).get("metrics")
