"""The frozen-stratum cache (`train.cache_frozen=true`): the embeddings and the first N1 layers run once.

When a plan freezes the embeddings and layers 0 .. N1-1, their output never changes during
training. `build_cache` runs them once over the train split (deterministic, so without dropout:
the one change to the maths), batched in length order, and keeps each example's hidden states on
the host at its real length (float32 or bfloat16, under `train.cache_max_gb`). It is one optional
step on the trainer's batches: `Cache.attach` adds each batch's rows' hidden states, and the train
step starts at layer N1 (`Cache.train_model`, `bert.BertForSequenceClassification.upper`);
evaluation runs the whole model as before. With the cache off nothing of this module runs.
The plan says how many layers are frozen (`Plan.frozen_depth`). Padding positions of a cached
batch are zeros: attention never reads them, so the real positions are those of the uncached step.

Resume rebuilds the cache (the same parameters give the same cache). Each process of a
multi-host run builds it on its first local device; every process holds every train row, since
the seeded shuffle hands a process other rows in every epoch, and attaches its own rows to its
share of each batch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator
from typing import Callable

import jax
import numpy as np

from spafit_jax.data import batching
from spafit_jax.training import compiling, steps
from spafit_jax.errors import ConfigError

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}
#: the batch keys the step above the cache takes (`Cache.train_model`), in order.
CACHE_INPUTS = ("hidden", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Cache:
    """Hidden states entering layer `n1` of every train example: rows `offsets[i]:offsets[i+1]` of `flat`."""

    n1: int
    flat: np.ndarray  # [sum of lengths, D]
    offsets: np.ndarray  # [N + 1]
    apply_fn: Callable  # model.apply of the layers n1 .. L-1 and the head (the step's apply_fn)
    seconds: float = 0.0  # time spent building it

    @property
    def train_model(self) -> tuple[Callable, tuple[str, ...]]:
        """What the train step applies, and the batch keys it takes (`parallel.make_driver`'s train_model)."""
        return self.apply_fn, CACHE_INPUTS

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    def hidden(self, idx: np.ndarray, length: int, starts: np.ndarray | None = None) -> np.ndarray:
        """[len(idx), length, D] hidden states of examples `idx`, zeros past each real length. Packed rows:
        `idx` [R, K] the slots of each row (`packing.EMPTY` = none) and `starts` [R, K] where each begins,
        so that a row holds its examples' cached states one after the other."""
        out = np.zeros((len(idx), length, self.flat.shape[1]), self.flat.dtype)
        idx = np.asarray(idx)
        slots = idx[:, None] if idx.ndim == 1 else idx
        starts = np.zeros_like(slots) if starts is None else np.asarray(starts)
        for row in range(len(slots)):
            for i, at in zip(slots[row].tolist(), starts[row].tolist()):
                if i >= 0:
                    lo, hi = self.offsets[i], self.offsets[i + 1]
                    out[row, at:at + hi - lo] = self.flat[lo:hi]
        return out

    def attach(self, batches: Iterable[tuple[np.ndarray, dict[str, np.ndarray]]]
               ) -> Iterator[dict[str, np.ndarray]]:
        """Each batch of `batching.train_batches(..., with_rows=True)` (or `packing.train_batches`) with its
        rows' "hidden" states."""
        for rows, batch in batches:
            yield {**batch, "hidden": self.hidden(rows, batch["input_ids"].shape[1], batch.get("segment_starts"))}


def cache_depth(plan) -> int:
    """The layers the cache covers (`Plan.frozen_depth`); a one-line ConfigError when the plan trains the
    embeddings or the first layer (nothing to cache). Used by `build_cache` and `aot`."""
    n1 = plan.frozen_depth
    _refuse(plan, n1)
    return n1


def upper_model(model, n1: int) -> tuple[Callable, tuple[str, ...]]:
    """The train step's model above the cache: layers n1 .. L-1 and the head, and the batch keys it takes."""
    return functools.partial(model.apply, method="upper", n1=n1), CACHE_INPUTS


def _refuse(plan, n1: int) -> None:
    if n1 == 0:
        raise ConfigError(f"train.cache_frozen=true needs frozen embeddings and a frozen first layer, but method "
                          f"{plan.method.name}" + (f" with n1={plan.n1}" if plan.n1 is not None else "")
                          + " trains them; use method.name=spafit with method.n1 >= 1, or train.cache_frozen=false",
                          "cache_frozen")


def build_cache(model, plan, params, enc, train_cfg, batch_size: int, buckets) -> Cache:
    """Runs the embeddings and the frozen layers once over every example of `enc` (batches of
    `batch_size` in length order, padded to `buckets`) and keeps their output on the host.

    Raises ConfigError (one line) when the plan does not freeze them, or when the cache would
    exceed `train_cfg.cache_max_gb`.
    """
    n1 = cache_depth(plan)
    dtype = np.dtype(DTYPES[train_cfg.cache_dtype])
    lengths = np.asarray(enc.lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dim = model.config.hidden_size
    need = int(offsets[-1]) * dim * dtype.itemsize
    if need > train_cfg.cache_max_gb * 1e9:
        raise ConfigError(f"train.cache_frozen: the cache of {len(lengths)} examples ({int(offsets[-1])} tokens x "
                          f"{dim} x {train_cfg.cache_dtype}) needs {need / 1e9:.2f} GB, above train.cache_max_gb="
                          f"{train_cfg.cache_max_gb}; raise it, use train.cache_dtype=bfloat16, or set "
                          "train.cache_frozen=false", "cache_max_gb")
    t0, device = time.perf_counter(), jax.local_devices()[0]
    lower = compiling.jit(functools.partial(model.apply, method="lower", n1=n1))  # runs where its inputs are
    variables = {"params": jax.device_put(params, device)}
    flat = np.empty((int(offsets[-1]), dim), dtype)
    order = np.argsort(lengths, kind="stable")  # the order of eval_batches(group_by_length=True)
    batches = batching.eval_batches(enc, batch_size, buckets=buckets, group_by_length=True)
    for b, batch in enumerate(batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        assert np.array_equal(batch["attention_mask"][:len(idx)].sum(1), lengths[idx]), "batch order changed"
        inputs = jax.device_put([batch[k] for k in steps.INPUTS], device)
        out = np.asarray(lower(variables, *inputs))
        for row, i in enumerate(idx):
            flat[offsets[i]:offsets[i + 1]] = out[row, :lengths[i]].astype(dtype)
    return Cache(n1, flat, offsets, upper_model(model, n1)[0], time.perf_counter() - t0)
