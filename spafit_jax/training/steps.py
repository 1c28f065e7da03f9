"""The train state and the pure train / eval steps (the optimizer they apply is built in `optimizer`).

The step differentiates only the trainable part of the parameters (`masking.split`), so XLA
drops the backward pass below the first trainable layer and the weight gradients of the
bias-only stratum.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from spafit_jax import masking
from spafit_jax.errors import SpafitError


class DivergedError(SpafitError):
    """Training hit `train.max_bad_steps` consecutive steps with a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """What changes during training (and what a checkpoint holds)."""

    step: jax.Array
    trainable: Any  # the params with None where a leaf is frozen
    opt_state: Any
    rng: jax.Array  # raw PRNG key data (uint32); dropout keys are folded from it and the step


def init_state(trainable, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0, fresh optimizer state, and the dropout key."""
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(jax.random.key(seed)))


def loss_sum(logits, batch, is_regression: bool):
    """(sum of weighted per-example losses, sum of weights): cross-entropy, or MSE for regression.

    Unpacked: logits [B, C], labels and weights [B]; packed: logits [R, K, C], labels and weights [R, K]
    (one example per segment; absent segments weigh 0)."""
    weights = batch["weights"]
    if is_regression:
        losses = jnp.square(logits[..., 0] - batch["labels"])
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(losses * weights), jnp.sum(weights)


#: the batch keys the model takes, in order; the frozen-stratum cache's step takes `frozen.CACHE_INPUTS`.
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: the key of a packed batch (`packing`) that the model takes by keyword: its presence switches to packed mode.
SEGMENT_STARTS = "segment_starts"


def packed_kwargs(batch) -> dict:
    """``{"segment_starts": ...}`` for a packed batch, ``{}`` for an unpacked one (the model's keyword)."""
    return {SEGMENT_STARTS: batch[SEGMENT_STARTS]} if SEGMENT_STARTS in batch else {}


def train_step(
    state: TrainState,
    frozen,
    batch,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    inputs: tuple[str, ...] = INPUTS,
    is_regression: bool = False,
    grad_accum: int = 1,
    axis_name: str | None = None,
):
    """One optimizer step on `batch`; returns (new state, {"loss": mean loss, "finite": bool}).

    A step whose loss, gradients or updated parameters are not all finite is skipped: the
    parameters and the optimizer state stay as they were (the step counter still advances, so
    the data moves on) and "finite" is False. Unlike `optax.apply_if_finite` this keeps the
    optimizer state's structure (checkpoints stay compatible) and never gives up and applies
    a NaN; the trainer decides when to stop (`train.max_bad_steps`).

    Gradients are taken w.r.t. `state.trainable` only. With grad_accum = k > 1 the batch is cut
    into k micro-batches, rows i, i+k, i+2k, ... (so each device's rows split evenly and a
    batch sharded over devices needs no re-sharding), whose gradients are summed in a scan; the
    loss is the mean over the step's real examples (packed: its real segments) in every case.
    Under `pmap`, pass axis_name so gradients and losses are summed across devices. `apply_fn`
    takes the batch's `inputs` in order (the whole model: INPUTS; the layers above a frozen-stratum
    cache: `frozen.CACHE_INPUTS`).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

    def loss(trainable, micro, key):
        params = masking.join(trainable, frozen)
        logits = apply_fn({"params": params}, *(micro[k] for k in inputs), deterministic=False, rngs={"dropout": key},
                          **packed_kwargs(micro))
        return loss_sum(logits, micro, is_regression)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(state.trainable, batch, key)
    else:
        micro = jax.tree_util.tree_map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, inp):
            i, mb = inp
            (l, n), g = grad_fn(state.trainable, mb, jax.random.fold_in(key, i))
            return jax.tree_util.tree_map(jnp.add, carry, (g, l, n)), None

        zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.trainable), jnp.zeros(()), jnp.zeros(()))
        (grads, total, count), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    if axis_name is not None:
        grads, total, count = jax.lax.psum((grads, total, count), axis_name)
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1.0), grads)
    mean_loss = total / jnp.maximum(count, 1.0)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(mean_loss) & all_finite(grads) & all_finite(trainable)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    trainable, opt_state = jax.tree_util.tree_map(keep, (trainable, opt_state), (state.trainable, state.opt_state))
    new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new, {"loss": mean_loss, "finite": finite}


def all_finite(tree) -> jax.Array:
    """True when every element of every (inexact) leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def eval_step(trainable, frozen, batch, *, apply_fn: Callable):
    """Logits [B, C] (packed: [R, K, C]) of the deterministic whole model (padding examples included; weights
    mask them)."""
    return apply_fn({"params": masking.join(trainable, frozen)}, *(batch[k] for k in INPUTS), deterministic=True,
                    **packed_kwargs(batch))
