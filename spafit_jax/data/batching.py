"""Batching: bucket lengths, deterministic train batches, eval batches that see every example once.

Every process of a multi-host run reads only its own rows of each global batch. Bucket rules are
written once, here; `config` asks `resolve_buckets` so a bad bucket list fails before loading.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from spafit_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from spafit_jax.data.tokens import Encoded

PADDINGS = ("bucket", "max_length")
GROUP_BATCHES = 50  # length grouping sorts chunks of this many batches (as Hugging Face's megabatches)
FIT_MULTIPLE = 8  # fitted bucket lengths are multiples of this (tile-friendly on GPU/TPU), or max_length


def default_buckets(max_length: int) -> list[int]:
    """``[max_length//4, max_length//2, max_length]`` without duplicates or lengths below 8."""
    m = int(max_length)
    return sorted({b for b in (m // 4, m // 2) if b >= 8} | {m})


def resolve_buckets(max_length: int, padding: str = "bucket", buckets: Sequence[int] | None = None,
                    multiple: int | None = None, max_shapes: int | None = None,
                    batch_maxima: Sequence[int] = ()) -> list[int]:
    """Bucket lengths from ``data.padding`` / ``data.buckets`` / ``data.bucket_multiple`` /
    ``data.max_shapes`` / ``data.max_length``, the first that is set winning in that order.

    ``buckets`` are used as given. ``multiple`` N gives every multiple of N below max_length, then
    max_length (fine buckets, at most max_length / N compiled shapes). ``max_shapes`` K (the default,
    8) fits at most K lengths to ``batch_maxima``, the longest example of each batch the buckets
    will serve (`fit_buckets`). With all three null: max_length/4, /2, /1 (`default_buckets`).
    Raises ConfigError unless the buckets are positive, strictly increasing and end at max_length.
    """
    if padding == "max_length":
        return [int(max_length)]
    if padding != "bucket":
        raise ConfigError(f"data.padding={padding!r} is unknown; use one of "
                          f"{' | '.join(PADDINGS)}")
    if multiple is not None:
        if int(multiple) < 1:
            raise ConfigError(f"data.bucket_multiple={multiple} must be >= 1; use e.g. data.bucket_multiple=16")
        if buckets is not None:
            raise ConfigError(f"data.bucket_multiple={multiple} and data.buckets={list(buckets)} are both set; "
                              "set one of them to null")
        return list(range(int(multiple), int(max_length), int(multiple))) + [int(max_length)]
    if buckets is None:
        return default_buckets(max_length) if max_shapes is None else fit_buckets(batch_maxima, max_shapes, max_length)
    b = [int(x) for x in buckets]
    if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:])) or b[-1] != max_length:
        raise ConfigError(f"data.buckets={b} must be positive, strictly increasing lengths whose "
                          f"largest is data.max_length={max_length}; e.g. data.buckets="
                          f"[{max(1, max_length // 2)}, {max_length}]")
    return b


def fit_buckets(batch_maxima: Sequence[int], max_shapes: int, max_length: int) -> list[int]:
    """At most `max_shapes` lengths that pad the batches with these longest examples the least, then max_length.

    Each batch is padded to the smallest chosen length >= its longest example; the lengths are
    multiples of FIT_MULTIPLE (or max_length) and chosen by dynamic programming over the distinct
    rounded batch lengths to minimise the padded tokens. max_length ends the list so that
    longer inputs (evaluation, prediction) still fit; train batches use at most `max_shapes`.
    """
    if int(max_shapes) < 1:
        raise ConfigError(f"data.max_shapes={max_shapes} must be >= 1; use e.g. data.max_shapes=8")
    m = int(max_length)
    rounded = np.minimum(-(-np.asarray(batch_maxima, np.int64) // FIT_MULTIPLE) * FIT_MULTIPLE, m)
    if rounded.size == 0:
        return [m]
    lengths, counts = np.unique(rounded, return_counts=True)
    n, k = len(lengths), min(int(max_shapes), len(lengths))
    before = np.concatenate([[0], np.cumsum(counts)])  # batches below lengths[i]
    # best[s, j]: fewest padded tokens (per row) of the batches of lengths[:j] in s buckets, the last lengths[j-1]
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((k + 1, n + 1), np.int64)
    for s in range(1, k + 1):
        for j in range(1, n + 1):
            costs = best[s - 1, :j] + lengths[j - 1] * (before[j] - before[:j])
            cut[s, j] = int(np.argmin(costs))
            best[s, j] = costs[cut[s, j]]
    s, j, chosen = int(np.argmin(best[:, n])), n, []
    while j > 0:
        chosen.append(int(lengths[j - 1]))
        j, s = int(cut[s, j]), s - 1
    return sorted(chosen) + ([m] if max(chosen) < m else [])


def batch_maxima(lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The longest example of each batch of `order` [steps, batch] (what `fit_buckets` fits)."""
    return np.asarray(lengths)[order].max(axis=1)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise DataError(f"an example has {length} tokens, more than the largest bucket "
                    f"{max(buckets)}; include max_length in data.buckets")


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0:
        raise DataError(f"batch size {batch_size} must be positive")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count="
                        f"{process_count})")
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by the {process_count} "
                        "processes; choose a multiple of the process count")
    return batch_size // process_count


def steps_per_epoch(enc: Encoded, batch_size: int) -> int:
    """Full train batches per epoch (the ragged remainder is dropped)."""
    if batch_size <= 0:
        raise DataError(f"batch size {batch_size} must be positive")
    steps = len(enc) // batch_size
    if steps == 0:
        raise DataError(f"the train split has {len(enc)} examples, fewer than one batch of "
                        f"{batch_size}; lower train.batch_size")
    return steps


def _batch(enc: Encoded, idx: np.ndarray, length: int, weights: np.ndarray
           ) -> dict[str, np.ndarray]:
    return {
        "input_ids": enc.input_ids[idx, :length],
        "attention_mask": (np.arange(length)[None, :] < enc.lengths[idx, None]).astype(np.int32),
        "token_type_ids": enc.token_type_ids[idx, :length],
        "labels": enc.labels[idx],
        "weights": weights.astype(np.float32),
    }


def train_order(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                group_by_length: bool = False) -> np.ndarray:
    """Example indices of each global train batch of one epoch: int [steps, batch_size].

    A permutation drawn from (seed, epoch), the ragged remainder dropped. With `group_by_length`
    the permutation is cut into chunks of GROUP_BATCHES batches, each chunk sorted by length (so
    a batch holds examples of similar length and pads little), and the batches shuffled again.
    Deterministic in (seed, epoch): every host computes the same order.
    """
    steps = len(lengths) // batch_size
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        return perm[:steps * batch_size].reshape(steps, batch_size)
    perm = perm[:steps * batch_size]
    chunk = GROUP_BATCHES * batch_size
    groups = [c[np.argsort(-lengths[c], kind="stable")] for c in np.split(perm, range(chunk, len(perm), chunk))]
    order = np.concatenate(groups).reshape(steps, batch_size)
    return order[rng.permutation(steps)]


def padding_efficiency(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batch; packed (weights [R, K]): the tokens of segments weighted > 0."""
    seg, weights = np.asarray(batch["attention_mask"]), np.asarray(batch["weights"])
    if weights.ndim == 2:
        real = np.take_along_axis(weights, np.maximum(seg - 1, 0), axis=1) * (seg > 0)
        return int((real > 0).sum()), int(seg.size)
    mask = seg * (weights[:, None] > 0)
    return int(mask.sum()), int(seg.size)


def train_batches(enc: Encoded, batch_size: int, *, seed: int, epoch: int,
                  buckets: Sequence[int], start: int = 0, process_index: int = 0,
                  process_count: int = 1, group_by_length: bool = False, with_rows: bool = False
                  ) -> Iterator[dict[str, np.ndarray]] | Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """This process's rows of each global train batch of one epoch, in `train_order`.

    Each global batch is padded to the smallest bucket holding its longest example, so all
    processes agree on the shape. Process ``p`` gets rows ``[p*B/P, (p+1)*B/P)``. ``start``
    skips that many batches (resume) without building them. Arguments are checked on the call.
    With `with_rows` each item is (the examples' indices in `enc`, batch), for a step that adds
    per-example data to the batch (the frozen-stratum cache, `frozen.Cache.attach`).
    """
    local = _check_sharding(batch_size, process_index, process_count)
    steps = steps_per_epoch(enc, batch_size)
    if int(seed) < 0 or int(epoch) < 0:
        raise DataError(f"seed {seed} and epoch {epoch} must be >= 0")
    if not 0 <= start <= steps:
        raise DataError(f"start {start} is outside the epoch's {steps} batches")
    pick_bucket(int(enc.lengths.max()), buckets)
    order = train_order(enc.lengths, batch_size, seed=seed, epoch=epoch, group_by_length=group_by_length)
    lo = process_index * local

    def batches():
        for idx in order[start:]:
            length = pick_bucket(int(enc.lengths[idx].max()), buckets)
            rows = idx[lo:lo + local]
            batch = _batch(enc, rows, length, np.ones(local, np.float32))
            yield (rows, batch) if with_rows else batch

    return batches()


def num_eval_batches(enc: Encoded, batch_size: int) -> int:
    """Global eval batches needed to see every example once."""
    return -(-len(enc) // batch_size)


def eval_batches(enc: Encoded, batch_size: int, *, buckets: Sequence[int],
                 process_index: int = 0, process_count: int = 1, group_by_length: bool = False
                 ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global eval batch: every example once, in order (in order
    of length with `group_by_length`, which pads less; metrics do not depend on the order).

    The last global batch is filled up to ``batch_size`` with copies of its last example,
    weighted 0. Sharding across processes as in ``train_batches``.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    n = len(enc)
    if n:
        pick_bucket(int(enc.lengths.max()), buckets)
    lo = process_index * local
    order = np.argsort(enc.lengths, kind="stable") if group_by_length else np.arange(n)

    def batches():
        for b in range(num_eval_batches(enc, batch_size)):
            real = order[b * batch_size:(b + 1) * batch_size]
            idx = np.concatenate([real, np.full(batch_size - len(real), real[-1])])
            weights = (np.arange(batch_size) < len(real)).astype(np.float32)
            length = pick_bucket(int(enc.lengths[real].max()), buckets)
            yield _batch(enc, idx[lo:lo + local], length, weights[lo:lo + local])

    return batches()
