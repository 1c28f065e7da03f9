"""Packed rows (sequence packing): segment ids in, attention bias, positions within segments and each segment's
first token out; the trace-time checks of a packed call. Written once for every family (`bert`, `deberta`,
`modernbert`); imports jax only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spafit_jax.errors import ConfigError


def check_packed(segment_starts, inputs, attention_mask) -> bool:
    """Whether a call is packed (`segment_starts` given), after its trace-time checks: `segment_starts` an integer
    [B, K] array (K >= 1) of the batch size of `inputs` (the token ids, or the hidden states entering a layer),
    and `attention_mask` (the segment ids) given. Raises a one-line ConfigError."""
    if segment_starts is None:
        return False
    input_shape = inputs.shape
    shape, dtype = getattr(segment_starts, "shape", None), getattr(segment_starts, "dtype", None)
    if shape is None or len(shape) != 2 or shape[1] < 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise ConfigError(f"segment_starts must be an integer array [rows, K] with K >= 1, got shape {shape} dtype "
                          f"{dtype}; pass the packed batch's segment_starts (or None for unpacked rows)")
    if shape[0] != input_shape[0]:
        raise ConfigError(f"segment_starts has {shape[0]} rows but the inputs have {input_shape[0]}; pass the "
                          "segment_starts of the same packed batch")
    if attention_mask is None:
        raise ConfigError("segment_starts needs attention_mask holding the segment ids (1 .. K, 0 on padding); "
                          "pass the packed batch's attention_mask")
    return True


def segment_mask(segment_ids_BxT):
    """bool [B, 1, T, T]: query q may attend key t iff both carry the same non-zero segment id."""
    ids = segment_ids_BxT
    return (ids[:, None, :, None] == ids[:, None, None, :]) & (ids[:, None, None, :] > 0)


def attention_bias(attention_mask_BxT, packed: bool = False):
    """The additive float32 attention bias, built once per forward: unpacked [B, 1, 1, T] (0 on real
    keys, the float32 minimum on padding); packed [B, 1, T, T] from the segment ids (`segment_mask`).
    A padding query of a packed row sees no key and attends uniformly: its output is never read."""
    low = jnp.finfo(jnp.float32).min
    if not packed:
        return jnp.where(attention_mask_BxT[:, None, None, :] > 0, 0.0, low)
    return jnp.where(segment_mask(attention_mask_BxT), 0.0, low)


def segment_positions(segment_ids_BxT):
    """int32 [B, T]: each token's position within its segment (0 at its first token, where the segment
    id changes), 0 on padding (segment id 0). Segments are contiguous runs of one id."""
    ids = segment_ids_BxT
    t_T = jnp.arange(ids.shape[-1], dtype=jnp.int32)
    change_BxT = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(change_BxT, t_T[None], 0), axis=1)
    return jnp.where(ids > 0, t_T[None] - start_BxT, 0)


def first_tokens(x_BxTxD, segment_starts_BxK=None):
    """The first token of each row [B, D]; packed, of each segment [B, K, D] (a start outside the row is
    clipped into it, so an absent segment's slot holds a real, finite token)."""
    if segment_starts_BxK is None:
        return x_BxTxD[:, 0]
    return jnp.take_along_axis(x_BxTxD, segment_starts_BxK[..., None].astype(jnp.int32), axis=1, mode="clip")
