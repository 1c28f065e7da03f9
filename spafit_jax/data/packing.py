"""Sequence packing (`data.packing=true`): several examples per row of `data.max_length` tokens, one shape.

A packed row holds up to K = `data.max_segments` tokenised examples one after the other, each with its own
[CLS] ... [SEP]; the batch carries the segment id of every token in `attention_mask` (1 .. K, 0 on
padding) and `segment_starts` [R, K], so the model attends within each example only and predicts one
label per segment (the interface in docs/training.md, "Packing"). Unpacked batches are the K = 1 case.

The packing itself is a pure function of a length array (`first_fit`), so `aot` and benchmarks can
estimate an epoch from lengths alone. Train rows are packed per epoch from the seeded permutation of
`batching` (deterministic in (seed, epoch), the same on every host; each process takes its own rows of
each step, as `batching.train_batches` does); evaluation and `predict` pack the examples sorted by
decreasing length (first-fit decreasing, the best fill). A step is a fixed number of rows R, chosen once
from epoch 0 (`layout`) so that a step holds train.batch_size examples on average: learning rates and
schedules carry over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from spafit_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from spafit_jax.data.tokens import Encoded

EMPTY = -1  # an empty slot of a packing


def check_settings(max_segments: int) -> int:
    """K, checked (schema asks this); a one-line ConfigError naming the fix. A K above what a row can
    hold is allowed: rows then hold what fits."""
    if isinstance(max_segments, bool) or not isinstance(max_segments, (int, np.integer)) or max_segments < 1:
        raise ConfigError(f"data.max_segments={max_segments!r} must be an integer >= 1 (examples per packed row); "
                          "use e.g. data.max_segments=8", "max_segments")
    return int(max_segments)


def first_fit(lengths, max_length: int, max_segments: int, order=None, max_rows: int | None = None) -> np.ndarray:
    """Example indices of each packed row: int64 [rows, max_segments], EMPTY (-1) in unused slots.

    The examples are taken in `order` (default: as given) and each goes into the first row with room for
    its tokens and a free slot; a new row opens when none has. With `max_rows`, no row opens beyond it and
    an example that fits none is left out (the caller sees which: `packed_examples`). Within a row the
    examples keep the order they were taken in. Raises DataError for an example longer than a row.
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.arange(len(lengths)) if order is None else np.asarray(order, np.int64)
    t, k = int(max_length), check_settings(max_segments)
    if len(order) and int(lengths[order].max()) > t:
        raise DataError(f"an example has {int(lengths[order].max())} tokens, more than a packed row of "
                        f"data.max_length={t}; raise data.max_length or tokenise with truncation to it")
    if len(order) and int(lengths[order].min()) < 1:
        raise DataError("an example has 0 tokens; drop empty examples before packing")
    cap = len(order) if max_rows is None else int(max_rows)
    free = np.full(max(cap, 1), -1, np.int64)  # tokens left in each row; -1 once the row is closed or not open
    used = np.zeros(max(cap, 1), np.int64)
    slots = np.full((max(cap, 1), k), EMPTY, np.int64)
    rows = first = 0  # rows opened; rows before `first` can take nothing more
    shortest = int(lengths[order].min()) if len(order) else 1
    for i in order.tolist():
        n = int(lengths[i])
        hit = np.flatnonzero(free[first:rows] >= n)
        if hit.size:
            r = first + int(hit[0])
        elif rows < cap:
            r, rows = rows, rows + 1
            free[r] = t
        else:
            continue
        slots[r, used[r]] = i
        used[r] += 1
        free[r] = free[r] - n if used[r] < k else -1
        while first < rows and free[first] < shortest:
            first += 1
    return slots[:rows]


def first_fit_decreasing(lengths, max_length: int, max_segments: int) -> np.ndarray:
    """`first_fit` of the examples longest first (the evaluation and predict packing: the best fill)."""
    lengths = np.asarray(lengths, np.int64)
    return first_fit(lengths, max_length, max_segments, order=np.argsort(-lengths, kind="stable"))


def packed_examples(slots: np.ndarray) -> np.ndarray:
    """The example indices a packing holds (each once), in slot order."""
    s = np.asarray(slots).reshape(-1)
    return s[s != EMPTY]


def real_token_fraction(lengths, slots: np.ndarray, max_length: int) -> float:
    """Real tokens / (rows x max_length) of a packing (1.0 for no rows)."""
    held = packed_examples(slots)
    rows = int(np.asarray(slots).shape[0])
    return float(np.asarray(lengths, np.int64)[held].sum()) / (rows * int(max_length)) if rows else 1.0


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, -(-int(x) // multiple) * multiple)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The seeded order in which an epoch's examples are packed (the same generator as `batching.train_order`)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The packed train steps of a run: `rows` per step (one shape) and `steps` per epoch."""

    rows: int
    steps: int


def layout(lengths, batch_size: int, *, max_length: int, max_segments: int, seed: int, multiple: int = 1) -> Layout:
    """The run's packed steps, from epoch 0's first-fit packing (its M rows): R = the rows that hold
    `batch_size` examples on average, rounded to `multiple` (devices x grad_accum), and ceil(M / R) steps an
    epoch, so that an epoch wastes less than one step of empty rows and a step holds about `batch_size`
    examples (learning rates and schedules carry over). Every epoch is packed into steps x R rows."""
    n = len(lengths)
    if batch_size <= 0 or n // batch_size == 0:
        raise DataError(f"the train split has {n} examples, fewer than one batch of {batch_size}; lower "
                        "train.batch_size")
    rows = first_fit(lengths, max_length, max_segments, order=epoch_permutation(n, seed=seed, epoch=0)).shape[0]
    per = max(1, round(rows * batch_size / n))
    per = max(int(multiple), round(per / multiple) * int(multiple))
    return Layout(per, -(-rows // per))


DRIFT = 0.25  # a step holding more than this share away from train.batch_size examples is worth a warning


def drift(n: int, layout: Layout, batch_size: int, multiple: int) -> str | None:
    """A warning line when `layout`'s steps hold far from `batch_size` of the `n` examples on average: rows per
    step must be a multiple of `multiple` (devices x grad_accum), which a small batch of short examples rounds far
    off (a learning rate tuned at `batch_size` then sees other batches). None when within DRIFT."""
    per_step = n / layout.steps
    if abs(per_step / batch_size - 1) <= DRIFT:
        return None
    return (f"packing: a step holds about {per_step:.0f} examples, not train.batch_size={batch_size}: its "
            f"{layout.rows} rows must be a multiple of devices x grad_accum ({multiple}) and hold about "
            f"{n / (layout.rows * layout.steps):.1f} examples each; for steps of about {batch_size}, lower "
            f"data.max_segments to about {max(1, round(batch_size / layout.rows))} or set data.packing=false")


def train_slots(lengths, layout: Layout, *, max_length: int, max_segments: int, seed: int, epoch: int
                ) -> np.ndarray:
    """The global packing of one epoch: example indices int64 [steps, rows, max_segments] (EMPTY = none).

    The epoch's seeded permutation is packed first-fit into at most steps x rows rows (an example that
    fits in none waits for a later epoch: rare, since `layout` sizes the epoch by epoch 0's packing) and
    rows beyond the packing are empty. The rows are shuffled with the same generator and dealt to the steps
    in turn, so that the steps' real rows differ by at most one (empty rows come last in a step).
    Deterministic in (seed, epoch).
    """
    steps, rows = layout.steps, layout.rows
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths))
    slots = first_fit(lengths, max_length, max_segments, order=perm, max_rows=steps * rows)
    slots = slots[rng.permutation(len(slots))]
    full = np.full((steps, rows, int(max_segments)), EMPTY, np.int64)
    j = np.arange(len(slots))
    full[j % steps, j // steps] = slots
    return full


def pad_id(enc: Encoded) -> int:
    """The pad id `enc` was padded with (0 when no example is shorter than max_length)."""
    short = np.flatnonzero(enc.lengths < enc.max_length)
    return int(enc.input_ids[short[0], enc.lengths[short[0]]]) if short.size else 0


def assemble(enc: Encoded, slots: np.ndarray, *, pad: int = 0, filler: int = 0) -> dict[str, np.ndarray]:
    """The packed batch of `slots` [R, K] (docs/training.md, "Packing"): input_ids, attention_mask (segment
    ids 1..K, 0 on padding), token_type_ids, segment_starts [R, K], labels [R, K] and weights [R, K].

    A row with no example gets example `filler` in its first slot, weighted 0, so that no row is all
    padding (it costs what an eval padding row costs unpacked)."""
    slots = np.asarray(slots)
    r, k = slots.shape
    t = enc.max_length
    ids = np.full((r, t), pad, np.int32)
    seg = np.zeros((r, t), np.int32)
    types = np.zeros((r, t), np.int32)
    starts = np.zeros((r, k), np.int32)
    labels = np.zeros((r, k), enc.labels.dtype)
    weights = (slots != EMPTY).astype(np.float32)
    for row in range(r):
        at = 0
        members = slots[row] if weights[row].any() else np.array([filler])
        for j, i in enumerate(members.tolist()):
            if i == EMPTY:
                continue
            n = int(enc.lengths[i])
            ids[row, at:at + n] = enc.input_ids[i, :n]
            types[row, at:at + n] = enc.token_type_ids[i, :n]
            seg[row, at:at + n] = j + 1
            starts[row, j] = at
            labels[row, j] = enc.labels[i]
            at += n
    return {"input_ids": ids, "attention_mask": seg, "token_type_ids": types, "segment_starts": starts,
            "labels": labels, "weights": weights}


def _local(rows: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if rows % process_count:
        raise DataError(f"{rows} packed rows per batch do not split over {process_count} processes; choose a "
                        "multiple of the process count")
    return rows // process_count


def train_batches(enc: Encoded, layout: Layout, *, max_segments: int, seed: int, epoch: int, start: int = 0,
                  process_index: int = 0, process_count: int = 1, with_rows: bool = False
                  ) -> Iterator[dict[str, np.ndarray]] | Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """This process's rows of each packed train step of one epoch (`train_slots`), from step `start` on.

    Process p gets rows [p*R/P, (p+1)*R/P) of every step. With `with_rows` each item is (the slots
    [R/P, K] of its rows, batch), for the frozen-stratum cache (`frozen.Cache.attach`)."""
    local = _local(layout.rows, process_index, process_count)
    if int(seed) < 0 or int(epoch) < 0:
        raise DataError(f"seed {seed} and epoch {epoch} must be >= 0")
    if not 0 <= start <= layout.steps:
        raise DataError(f"start {start} is outside the epoch's {layout.steps} batches")
    slots = train_slots(enc.lengths, layout, max_length=enc.max_length, max_segments=max_segments, seed=seed,
                        epoch=epoch)
    lo, pad, filler = process_index * local, pad_id(enc), int(packed_examples(slots)[0])

    def batches():
        for step in slots[start:]:
            mine = step[lo:lo + local]
            batch = assemble(enc, mine, pad=pad, filler=filler)
            yield (mine, batch) if with_rows else batch

    return batches()


def eval_rows(enc: Encoded, batch_size: int, *, max_segments: int, multiple: int = 1) -> tuple[np.ndarray, int]:
    """(first-fit-decreasing slots of every example [M, K], rows per eval batch): `batch_size` examples per
    batch on average, rounded up to `multiple` (the devices) and capped at the packing rounded up."""
    slots = first_fit_decreasing(enc.lengths, enc.max_length, max_segments)
    if not len(slots):
        return slots, int(multiple)
    per = min(_round_up(-(-int(batch_size) * len(slots) // len(enc)), multiple), _round_up(len(slots), multiple))
    return slots, per


def eval_batches(enc: Encoded, slots: np.ndarray, rows: int, *, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """This process's rows of each packed eval batch of `rows` rows over `slots` (`eval_rows`): every example
    once; the last batch is filled with empty rows (weights 0). Yields (this process's slots, batch)."""
    local = _local(rows, process_index, process_count)
    batches = -(-len(slots) // rows)
    full = np.full((batches * rows, slots.shape[1] if slots.ndim == 2 else 1), EMPTY, np.int64)
    full[:len(slots)] = slots
    lo, pad = process_index * local, pad_id(enc)
    for b in range(batches):
        mine = full[b * rows + lo:b * rows + lo + local]
        yield mine, assemble(enc, mine, pad=pad, filler=int(packed_examples(full[b * rows:(b + 1) * rows])[0]))


def unpack(values: np.ndarray, slots: np.ndarray, n: int) -> np.ndarray:
    """Per-slot outputs [M, K, ...] of the packed rows `slots` [M, K] -> per-example outputs [n, ...] in
    example order (every example must sit in exactly one slot)."""
    slots = np.asarray(slots).reshape(-1)
    values = np.asarray(values).reshape(len(slots), *np.shape(values)[2:])
    keep = slots != EMPTY
    out = np.zeros((n, *values.shape[1:]), values.dtype)
    if np.bincount(slots[keep], minlength=n).tolist() != [1] * n:
        raise DataError("a packing must hold every example exactly once to unpack its outputs")
    out[slots[keep]] = values[keep]
    return out


def check_model(model, what: str) -> None:
    """A one-line ConfigError unless `model` takes packed batches (`segment_starts=`); `what` names the model."""
    import inspect

    try:
        ok = "segment_starts" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"data.packing=true: {what} cannot take packed rows yet (its model has no segment_starts); "
                          "set data.packing=false", "packing")


def describe(enc: Encoded, layout: Layout, max_segments: int, *, seed: int) -> dict:
    """What results.json says of a packed run: K, rows per step, steps per epoch, and epoch 0's segments per
    row, real-token fraction (as the steps see them: rows x max_length tokens) and examples per step."""
    slots = train_slots(enc.lengths, layout, max_length=enc.max_length, max_segments=max_segments, seed=seed,
                        epoch=0)
    flat = slots.reshape(-1, slots.shape[-1])
    return {"max_segments": int(max_segments), "rows_per_step": layout.rows, "steps_per_epoch": layout.steps,
            "segments_per_row": round(float((flat != EMPTY).sum()) / len(flat), 4),
            "real_token_fraction": round(real_token_fraction(enc.lengths, flat, enc.max_length), 4),
            "examples_per_step": round(float((flat != EMPTY).sum()) / layout.steps, 2)}
