"""Two data-parallel drivers of one pure train step: `jax.pmap` and `jax.jit` over a device Mesh.

A driver places the state and the frozen parameters on the devices, turns each process's
share of a batch into the step's input, runs the step, evaluates, and brings results back
to the host. Both drivers give the same numbers as one device, on one host or several (the
tests check it on 8 simulated CPU devices and on 2 processes x 2 CPU devices).

Multi-host: every process runs the same program on its own rows of each global batch
(`batching.train_batches(..., process_index, process_count)`, or `packing.train_batches`: packed
rows [R, T] with labels and weights [R, K] shard along their first axis alike); the mesh driver assembles the
global batch with `jax.make_array_from_process_local_data`, `pmap` does the same inside.
Devices are ordered by process, so process p's rows are rows [p*B/P, (p+1)*B/P) of the
global batch, as on one host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spafit_jax.training import compiling, steps
from spafit_jax.errors import ConfigError
from spafit_jax.config.schema import ParallelConfig

AXIS = "data"
FSDP = "fsdp"
MIN_SHARD_SIZE = 1024  # fsdp: frozen leaves with fewer elements stay replicated

__all__ = ["AXIS", "FSDP", "Driver", "check_batch", "make_driver", "make_mesh", "mesh_driver", "pmap_driver",
           "to_host"]


def check_batch(global_batch: int, what: str = "train.batch_size", grad_accum: int = 1,
                devices: int | None = None) -> int:
    """The per-device batch (per micro-batch); a ConfigError unless every device gets the same, non-zero share.

    `what` names the config field in the message; `devices` is the device count (default: all devices of
    all processes; `aot` passes a TPU topology's). Call it before anything heavy.
    """
    n = jax.device_count() if devices is None else devices
    ways = n * grad_accum
    accum = f" x train.grad_accum={grad_accum} micro-batches" if grad_accum > 1 else ""
    multiple = max(ways, -(-global_batch // ways) * ways)
    fix = f"set {what} to a multiple of {ways} (e.g. {what}={multiple})"
    if global_batch < ways:
        raise ConfigError(
            f"{what}={global_batch} is smaller than the {n} devices{accum}: each device would get "
            f"0 examples; {fix}" + (" or lower train.grad_accum" if grad_accum > 1 else "")
        )
    if global_batch % ways:
        raise ConfigError(f"{what}={global_batch} does not split evenly over {n} devices{accum}; {fix}")
    return global_batch // ways


def _process_ordered_devices(devices=None) -> list:
    """All devices (or `devices`), those of process 0 first (so each process's rows are one contiguous block)."""
    return sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") Mesh over all devices of all processes; batches are sharded over both axes.

    `devices`: another set, e.g. a TPU topology's compile-only devices (`aot`)."""
    devices = _process_ordered_devices(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"parallel.fsdp={fsdp} does not divide the {len(devices)} devices; "
                          f"use a divisor of {len(devices)}")
    shape = (len(devices) // fsdp, fsdp)
    try:  # topology-aware order on TPU; plain reshape elsewhere
        from jax.sharding import AxisType

        return jax.make_mesh(shape, (AXIS, FSDP), axis_types=(AxisType.Auto,) * 2, devices=devices)
    except (ImportError, TypeError, ValueError, NotImplementedError):
        return Mesh(np.asarray(devices).reshape(shape), (AXIS, FSDP))


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of one array on this host, also when it spans several processes.

    Always a copy (never a view of a device buffer that a donating step could reuse).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.array(x.addressable_data(0))
        return np.array(multihost_utils.process_allgather(x, tiled=True))
    return np.array(jax.device_get(x))


@dataclasses.dataclass(frozen=True)
class Driver:
    """Functions that run the train / eval steps on all devices of all processes."""

    mode: str
    put_state: Callable  # host TrainState -> device state
    put_frozen: Callable  # host frozen params -> device frozen params
    put_batch: Callable  # this process's rows (numpy dict) -> step input
    step: Callable  # (state, frozen, batch) -> (state, {"loss": scalar})
    eval_logits: Callable  # (trainable, frozen, batch) -> device logits of the global batch
    gather: Callable  # list of eval outputs -> one numpy array of every process's rows, in global order
    host_state: Callable  # device state -> a numpy copy on this host (for results)
    saveable: Callable  # device state -> what a checkpoint saves (every process passes it to Orbax)
    mesh: Mesh | None = None  # the mesh of the mesh driver


def _global(x, sharding):
    """A global array with `sharding` from a value every process holds whole."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def fsdp_sharding(mesh: Mesh, x) -> NamedSharding:
    """Shard a frozen leaf over "fsdp" along its largest axis that divides; small leaves stay replicated."""
    fsdp = mesh.shape[FSDP]
    shape = np.shape(x)
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return NamedSharding(mesh, P())
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % fsdp == 0]
    if not dims:
        return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[dims[0]] = FSDP
    return NamedSharding(mesh, P(*spec))


def _train_step(apply_fn, tx, train_model, **kw) -> Callable:
    """`steps.train_step` of the whole model, or of `train_model` = (apply_fn, batch keys it takes)."""
    apply, inputs = train_model or (apply_fn, steps.INPUTS)
    return functools.partial(steps.train_step, apply_fn=apply, inputs=inputs, tx=tx, **kw)


def mesh_driver(apply_fn, tx, *, is_regression: bool, grad_accum: int = 1, fsdp: int = 1,
                train_model: tuple[Callable, tuple[str, ...]] | None = None, devices=None) -> Driver:
    """`jax.jit` over a Mesh of all devices: batch sharded on ("data", "fsdp"), state replicated.

    The compiler inserts the gradient all-reduce. With fsdp > 1 the frozen base weights are
    sharded along "fsdp" (each over its largest axis that divides; leaves under
    MIN_SHARD_SIZE elements stay replicated) and gathered when used, for encoders too large
    to replicate; the numbers are those of replication. `devices`: as in `make_mesh`.
    """
    mesh = make_mesh(fsdp, devices)
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P((AXIS, FSDP)))

    step = _train_step(apply_fn, tx, train_model, is_regression=is_regression, grad_accum=grad_accum)
    jit_step = compiling.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)
    jit_eval = compiling.jit(functools.partial(steps.eval_step, apply_fn=apply_fn), out_shardings=rows)

    def put_batch(local):
        return {k: jax.make_array_from_process_local_data(rows, np.asarray(v)) for k, v in local.items()}

    def gather(outputs):
        full = jnp.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        return to_host(full)

    return Driver(
        mode="mesh",
        put_state=lambda s: jax.tree_util.tree_map(lambda x: _global(x, replicated), s),
        put_frozen=lambda f: jax.tree_util.tree_map(lambda x: _global(x, fsdp_sharding(mesh, x)), f),
        put_batch=put_batch,
        step=jit_step,
        eval_logits=jit_eval,
        gather=gather,
        host_state=lambda s: jax.tree_util.tree_map(to_host, s),
        saveable=lambda s: s,  # global arrays: Orbax writes each process's shards
        mesh=mesh,
    )


def pmap_driver(apply_fn, tx, *, is_regression: bool, grad_accum: int = 1,
                train_model: tuple[Callable, tuple[str, ...]] | None = None) -> Driver:
    """`jax.pmap` over the local devices of every process: state replicated and donated, gradients psum'd.

    Arrays carry a leading axis of local devices; on several hosts the collectives span
    every process's devices (pmap's usual multi-host semantics).
    """
    devices = jax.local_devices()
    n = len(devices)
    stacked = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))
    step = _train_step(apply_fn, tx, train_model, is_regression=is_regression, grad_accum=grad_accum,
                       axis_name=AXIS)
    p_step = jax.pmap(step, axis_name=AXIS, donate_argnums=0)
    p_eval = jax.pmap(functools.partial(steps.eval_step, apply_fn=apply_fn), axis_name=AXIS)

    def replicate_one(x):
        host = to_host(x)[None]
        return jax.make_array_from_callback((n, *host.shape[1:]), stacked, lambda _: host)

    def replicate(tree):
        # What jax.device_put_replicated did (gone in JAX 0.10): a leading axis with one copy per local device.
        return jax.tree_util.tree_map(replicate_one, tree)

    def put_batch(local):
        return {k: np.asarray(v).reshape(n, -1, *np.shape(v)[1:]) for k, v in local.items()}

    def run_step(state, frozen, batch):
        state, metrics = p_step(state, frozen, batch)
        return state, jax.tree_util.tree_map(lambda m: m.addressable_data(0)[0], metrics)

    def gather(outputs):
        # [batches, local rows, ...] on each process -> every process's rows in global order.
        local = np.stack([np.asarray(o).reshape(-1, *np.shape(o)[2:]) for o in outputs])
        if jax.process_count() == 1:
            return local.reshape(-1, *local.shape[2:])
        every = np.swapaxes(np.asarray(multihost_utils.process_allgather(local)), 0, 1)  # [batches, P, rows, ...]
        return every.reshape(-1, *every.shape[3:])

    def host_state(state):
        return jax.tree_util.tree_map(lambda x: np.array(np.asarray(x.addressable_data(0))[0]), state)

    return Driver(
        mode="pmap",
        put_state=replicate,
        put_frozen=replicate,
        put_batch=put_batch,
        step=run_step,
        eval_logits=p_eval,
        gather=gather,
        host_state=host_state,
        saveable=host_state,
    )


def make_driver(cfg: ParallelConfig, apply_fn, tx, *, is_regression: bool, grad_accum: int = 1,
                train_model: tuple[Callable, tuple[str, ...]] | None = None) -> Driver:
    """The driver that `parallel.mode` names (its values are checked by the config).

    `train_model` (default: `apply_fn` of `steps.INPUTS`) is what the train step applies and the
    batch keys it takes, e.g. the layers above a frozen-stratum cache (`frozen.Cache.train_model`);
    evaluation always applies `apply_fn`, the whole model."""
    kw = dict(is_regression=is_regression, grad_accum=grad_accum, train_model=train_model)
    if cfg.mode == "pmap":
        return pmap_driver(apply_fn, tx, **kw)
    return mesh_driver(apply_fn, tx, fsdp=cfg.fsdp, **kw)
