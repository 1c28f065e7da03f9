"""Two data-parallel drivers of one pure train step: `jax.pmap` and `jax.jit` over a device Mesh.

A driver places the state and the frozen parameters on the devices, turns each process's
share of a batch into the step's input, runs the step, and evaluates. Both drivers give the
same numbers as one device (the tests check it on 8 simulated CPU devices).
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

from spafit_jax import optim
from spafit_jax.errors import ConfigError

AXIS = "data"


def check_batch(global_batch: int, what: str = "train.batch_size", grad_accum: int = 1) -> None:
    """Fails unless every device (and every micro-batch) gets the same non-zero number of examples."""
    n = jax.device_count()
    per_device = global_batch // (n * grad_accum)
    if global_batch % (n * grad_accum) or per_device == 0:
        raise ConfigError(
            f"{what}={global_batch} does not split evenly over {n} devices"
            + (f" x {grad_accum} micro-batches" if grad_accum > 1 else "")
            + f"; use a multiple of {n * grad_accum}"
        )


@dataclasses.dataclass(frozen=True)
class Driver:
    """Functions that run the train / eval steps on all devices of all processes."""

    mode: str
    put_state: Callable  # host TrainState -> device state
    put_frozen: Callable  # host frozen params -> device frozen params
    put_batch: Callable  # this process's rows (numpy dict) -> step input
    step: Callable  # (state, frozen, batch) -> (state, {"loss": scalar})
    eval_logits: Callable  # (trainable, frozen, batch) -> device logits of the global batch
    gather: Callable  # list of eval outputs -> one numpy array of every process's rows, in order
    host_state: Callable  # device state -> a host copy (for checkpoints and results)


def _global(x, sharding):
    """A global array with `sharding` from a value every process holds whole."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def mesh_driver(apply_fn, tx, *, is_regression: bool, grad_accum: int = 1, fsdp: int = 1) -> Driver:
    """`jax.jit` over a Mesh of all devices: batch sharded on "data", state replicated.

    With fsdp > 1 the mesh is (data, fsdp) and the frozen base weights are sharded along
    "fsdp" (each over its largest axis that divides), for encoders too large to replicate.
    """
    devices = np.asarray(jax.devices())
    if devices.size % fsdp:
        raise ConfigError(f"parallel.fsdp={fsdp} does not divide the {devices.size} devices; use a divisor")
    mesh = Mesh(devices.reshape(-1, fsdp), (AXIS, "fsdp"))
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P((AXIS, "fsdp")))

    def frozen_sharding(x):
        if fsdp == 1 or x is None:
            return replicated
        dims = [d for d in np.argsort(np.shape(x))[::-1] if np.shape(x)[d] % fsdp == 0]
        if not dims:
            return replicated
        spec = [None] * np.ndim(x)
        spec[dims[0]] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    step = functools.partial(optim.train_step, apply_fn=apply_fn, tx=tx, is_regression=is_regression,
                             grad_accum=grad_accum)
    jit_step = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)
    jit_eval = jax.jit(functools.partial(optim.eval_step, apply_fn=apply_fn), out_shardings=rows)

    def put_batch(local):
        return {k: jax.make_array_from_process_local_data(rows, np.asarray(v)) for k, v in local.items()}

    def gather(outputs):
        full = jnp.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        return np.asarray(multihost_utils.process_allgather(full, tiled=True))

    return Driver(
        mode="mesh",
        put_state=lambda s: jax.tree_util.tree_map(lambda x: _global(x, replicated), s),
        put_frozen=lambda f: jax.tree_util.tree_map(lambda x: _global(x, frozen_sharding(x)), f),
        put_batch=put_batch,
        step=jit_step,
        eval_logits=jit_eval,
        gather=gather,
        host_state=lambda s: jax.tree_util.tree_map(lambda x: x, s),
    )


def pmap_driver(apply_fn, tx, *, is_regression: bool, grad_accum: int = 1) -> Driver:
    """`jax.pmap` over local devices: state replicated and donated, gradients summed with psum."""
    n = jax.local_device_count()
    devices = jax.local_devices()
    step = functools.partial(optim.train_step, apply_fn=apply_fn, tx=tx, is_regression=is_regression,
                             grad_accum=grad_accum, axis_name=AXIS)
    p_step = jax.pmap(step, axis_name=AXIS, donate_argnums=0)
    p_eval = jax.pmap(functools.partial(optim.eval_step, apply_fn=apply_fn), axis_name=AXIS)

    def replicate(tree):
        return jax.device_put_replicated(tree, devices)

    def put_batch(local):
        return {k: np.asarray(v).reshape(n, -1, *np.shape(v)[1:]) for k, v in local.items()}

    def run_step(state, frozen, batch):
        state, metrics = p_step(state, frozen, batch)
        return state, jax.tree_util.tree_map(lambda m: m[0], metrics)

    def gather(outputs):
        local = np.concatenate([np.asarray(o).reshape(-1, *o.shape[2:]) for o in outputs])
        if jax.process_count() == 1:
            return local
        return np.asarray(multihost_utils.process_allgather(local, tiled=True))

    return Driver(
        mode="pmap",
        put_state=replicate,
        put_frozen=replicate,
        put_batch=put_batch,
        step=run_step,
        eval_logits=p_eval,
        gather=gather,
        host_state=lambda s: jax.device_get(jax.tree_util.tree_map(lambda x: x[0], s)),
    )


def make_driver(mode: str, apply_fn, tx, *, is_regression: bool, grad_accum: int = 1, fsdp: int = 1) -> Driver:
    """The driver named by `parallel.mode` ("mesh" or "pmap")."""
    if mode == "mesh":
        return mesh_driver(apply_fn, tx, is_regression=is_regression, grad_accum=grad_accum, fsdp=fsdp)
    if mode == "pmap":
        if fsdp != 1:
            raise ConfigError("parallel.fsdp needs parallel.mode=mesh; set parallel.fsdp=1 with pmap")
        return pmap_driver(apply_fn, tx, is_regression=is_regression, grad_accum=grad_accum)
    raise ConfigError(f"parallel.mode={mode!r} is unknown; use mesh or pmap")
