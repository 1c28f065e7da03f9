"""The work behind `python -m spafit_jax.aot_epoch` (its command line and --help: `spafit_jax/aot_epoch.py`).

`aot` estimates one step of one shape. A real dataset's epoch runs many steps of several shapes: this
module takes a length distribution (a task tokenised with the trainer's own `data.load_task_data`, or
files of token counts, one per line), works out the batches of one epoch as the trainer would cut them,
and adds up each shape's estimated step times its batches, for two batchings of the same examples:

- `bucketed` (today's batching without packing): epoch 0's seeded order, length-grouped as
  `data.group_by_length` says, each batch padded to the bucket that holds its longest example, the
  buckets fitted to those batches (`data.max_shapes`) or as configured; evaluation in length order,
  `train.eval_batch_size` rows a batch, on the same buckets (`batching`);
- `packed` (`data.packing=true`): R rows of data.max_length per step from `packing.rows_per_step`,
  epoch 0's `packing.train_slots`; evaluation packed first-fit decreasing (`packing.eval_rows`).

Each distinct (kind, rows, length) is one program, compiled for the topology by `ahead.compile_program`
(its roofline `est_step_seconds` and its compile seconds on this machine) or, with `--compile none`,
costed by our model FLOPs at the chip's peak only (a lower bound: it ignores HBM traffic). Every time
printed is an estimate, not a measurement; the compile count is exact for these lengths.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from spafit_jax.tpu import ahead
from spafit_jax.data import batching, packing
from spafit_jax.training import parallel
from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.config.files import Config
from spafit_jax.errors import DataError

STRATEGIES = ("bucketed", "packed")
ESTIMATE = ("estimate: roofline step time per compiled shape (max of FLOPs / peak and bytes accessed / HBM "
            "bandwidth) x that shape's batches; not a measurement")
FLOPS_ONLY = "estimate (lower bound): our model FLOPs / the chip's peak x batches, no HBM traffic; not a measurement"


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Token counts standing in for a tokenised split (what `packing.eval_rows` reads of an `Encoded`)."""

    lengths: np.ndarray
    max_length: int

    def __len__(self) -> int:
        return len(self.lengths)


def read_lengths(path: str, max_length: int) -> np.ndarray:
    """Token counts from a text file, one integer >= 1 per line (blank lines and `#` comments skipped), each
    clipped to `max_length` as tokenising with truncation does; one DataError line for a bad file."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                if not text.isdigit() or int(text) < 1:
                    raise DataError(f"{path}:{i}: {text!r} is not a token count (an integer >= 1 per line); fix the "
                                    "line or drop it")
                out.append(int(text))
    except OSError as e:
        raise DataError(f"cannot read lengths file {path}: {e.strerror}; give a file of token counts, one per line") \
            from None
    if not out:
        raise DataError(f"{path} holds no token counts; give one integer >= 1 per line")
    return np.minimum(np.asarray(out, np.int64), int(max_length))


def task_lengths(cfg: Config, tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, first evaluation split) token counts of `data.task` tokenised by `tokenizer` (a model name or
    folder whose tokenizer the trainer would load) at data.max_length, as the trainer reads them."""
    from spafit_jax.data import pipeline as data
    from spafit_jax.models import hf

    task = data.load_task_data(cfg.data, hf.load_tokenizer(hf.resolve(tokenizer)), seed=cfg.train.seed)
    return task.train.lengths.astype(np.int64), next(iter(task.evals.values())).lengths.astype(np.int64)


def bucketed_batches(cfg: Config, train: np.ndarray, evl: np.ndarray | None, devices: int) -> dict:
    """The unpacked epoch: {"train"/"eval": {(rows, length): batches}}, the buckets and real-token fractions."""
    t, d = cfg.train, cfg.data
    order = batching.train_order(train, t.batch_size, seed=t.seed, epoch=0, group_by_length=d.group_by_length)
    buckets = d.bucket_lengths(batching.batch_maxima(train, order))  # as the trainer fits them (`train._buckets`)
    shapes = {"train": collections.Counter(), "eval": collections.Counter()}
    tokens = {"train": [0, 0], "eval": [0, 0]}  # real, padded
    for idx in order:
        n = batching.pick_bucket(int(train[idx].max()), buckets)
        shapes["train"][(t.batch_size, n)] += 1
        tokens["train"][0] += int(train[idx].sum())
        tokens["train"][1] += t.batch_size * n
    if evl is not None:
        rows = min(t.eval_batch_size, max(devices, -(-len(evl) // devices) * devices))  # `loop.capped`
        ordered = np.sort(evl) if d.group_by_length else evl
        for b in range(0, len(ordered), rows):
            n = batching.pick_bucket(int(ordered[b:b + rows].max()), buckets)
            shapes["eval"][(rows, n)] += 1
            tokens["eval"][0] += int(ordered[b:b + rows].sum())
            tokens["eval"][1] += rows * n
    return {"shapes": shapes, "buckets": buckets,
            "real_token_fraction": {k: v[0] / v[1] if v[1] else None for k, v in tokens.items()}}


def packed_batches(cfg: Config, train: np.ndarray, evl: np.ndarray | None, devices: int) -> dict:
    """The packed epoch (data.packing=true): {"train"/"eval": {(rows, length): batches}}, R and the fractions."""
    t, d = cfg.train, cfg.data
    k, m = d.max_segments, d.max_length
    lay = packing.layout(train, t.batch_size, max_length=m, max_segments=k, seed=t.seed,
                         multiple=devices * t.grad_accum)
    slots = packing.train_slots(train, lay, max_length=m, max_segments=k, seed=t.seed, epoch=0)
    steps, r = lay.steps, lay.rows
    held = packing.packed_examples(slots)
    shapes = {"train": collections.Counter({(r, m): steps}), "eval": collections.Counter()}
    fraction = {"train": float(train[held].sum()) / (steps * r * m), "eval": None}
    out = {"rows_per_step": r, "examples_per_epoch": int(len(held)), "segments_per_row": len(held) / (steps * r)}
    if evl is not None:
        eslots, per = packing.eval_rows(Lengths(evl, m), t.eval_batch_size, max_segments=k, multiple=devices)
        batches = -(-len(eslots) // per)
        shapes["eval"][(per, m)] = batches
        fraction["eval"] = float(evl.sum()) / (batches * per * m)
        out["eval_rows_per_batch"] = per
    return {**out, "shapes": shapes, "real_token_fraction": fraction}


def _costed(s: ahead.Setup, kind: str, rows: int, length: int, compile_: bool) -> dict:
    """One program's figures: compiled (`ahead.compile_program`), or our FLOPs at the chip's peak only."""
    if compile_:
        return ahead.compile_program(s, kind, rows, length)
    row = ahead.program_row(s, kind, rows, length)
    return {**row, "fits": None, "est_step_seconds": row["model_flops_per_chip"] / s.topo.chip.peak_flops,
            "compile_seconds": 0.0}


def estimate(cfg: Config, topology: str, train: np.ndarray, evl: np.ndarray | None, *, compile_: bool = True,
             progress=None) -> list[dict]:
    """JSON-able records: one `aot_epoch_program` per shape of each strategy (its batches and step estimate)
    and one `aot_epoch` per strategy (steps, programs, compile count and seconds, estimated epoch and
    evaluation seconds, real-token fractions), then an `aot_epoch_ratio` (packed over bucketed)."""
    topo = tpu_specs.topology(topology)
    devices = len(topo.devices)
    t = cfg.train
    parallel.check_batch(t.batch_size, "train.batch_size", t.grad_accum, devices=devices)
    parallel.check_batch(t.eval_batch_size, "train.eval_batch_size", devices=devices)
    unpacked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))
    s = ahead.setup(unpacked, topo)
    packed = dataclasses.replace(s, cfg=dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=True)))
    packing.check_model(s.model, f"model.name={cfg.model.name} ({type(s.model).__name__})")
    records, summary = [], {}
    plans = {"packed": (packed, packed_batches(packed.cfg, train, evl, devices)),  # first: two programs only
             "bucketed": (s, bucketed_batches(unpacked, train, evl, devices))}
    for name, (setup, plan) in plans.items():
        totals = {"train": 0.0, "eval": 0.0}
        compile_s = 0.0
        for kind in ("train", "eval"):
            for (rows, length), batches in sorted(plan["shapes"][kind].items()):
                fig = _costed(setup, kind, rows, length, compile_)
                step = fig["est_step_seconds"]
                rec = {"record": "aot_epoch_program", "strategy": name, **fig, "batches": batches,
                       "est_seconds": None if step is None else step * batches}
                totals[kind] = None if step is None or totals[kind] is None else totals[kind] + step * batches
                compile_s += fig["compile_seconds"]
                records.append(rec)
                if progress is not None:
                    progress(rec)
        shapes = plan.pop("shapes")
        summary[name] = {
            "record": "aot_epoch", "strategy": name, "model": cfg.model.name, "method": cfg.method.name,
            "topology": topo.name, "chips": devices, "train_examples": int(len(train)),
            "eval_examples": None if evl is None else int(len(evl)), "max_length": cfg.data.max_length,
            "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size,
            "train_steps": sum(shapes["train"].values()), "eval_batches": sum(shapes["eval"].values()),
            "train_programs": len(shapes["train"]), "eval_programs": len(shapes["eval"]),
            "compile_count": len(shapes["train"]) + len(shapes["eval"]),
            "compile_seconds_here": compile_s if compile_ else None,
            "est_train_epoch_seconds": totals["train"], "est_eval_seconds": totals["eval"] if evl is not None else None,
            **plan, "estimate": ESTIMATE if compile_ else FLOPS_ONLY,
        }
        records.append(summary[name])
    b, p = summary["bucketed"], summary["packed"]
    ratio = lambda k: p[k] / b[k] if p[k] is not None and b[k] else None  # noqa: E731
    records.append({"record": "aot_epoch_ratio", "a": "packed", "b": "bucketed", "topology": topo.name,
                    "model": cfg.model.name, "est_train_epoch_ratio": ratio("est_train_epoch_seconds"),
                    "est_eval_ratio": ratio("est_eval_seconds"), "compile_count_ratio": ratio("compile_count"),
                    "estimate": ESTIMATE if compile_ else FLOPS_ONLY})
    return records


def seconds_text(x) -> str:
    """A number of seconds (or a ratio) to three significant digits; "-" for None."""
    return "-" if x is None else f"{x:.3g}"


def format_text(records: list[dict]) -> str:
    """The per-strategy summary lines and the ratio, as text (every time labelled an estimate)."""
    lines = []
    for r in records:
        if r["record"] == "aot_epoch_program":
            lines.append(f"  {r['strategy']:<8} {r['program']:<24} x {r['batches']:>6} batches  est. step "
                         f"{seconds_text(None if r['est_step_seconds'] is None else r['est_step_seconds'] * 1e3)} ms  "
                         f"compile {r['compile_seconds']:.1f} s{'' if r['fits'] is not False else '  DOES NOT FIT'}")
        elif r["record"] == "aot_epoch":
            fr = r["real_token_fraction"]
            lines.append(f"{r['strategy']}: {r['train_steps']} train steps over {r['train_programs']} program(s), "
                         f"{r['eval_batches']} eval batches over {r['eval_programs']}; real tokens train "
                         f"{fr['train']:.3f}" + ("" if fr["eval"] is None else f", eval {fr['eval']:.3f}")
                         + f"; est. epoch {seconds_text(r['est_train_epoch_seconds'])} s, est. eval "
                         f"{seconds_text(r['est_eval_seconds'])} s; {r['compile_count']} compiles"
                         + ("" if r["compile_seconds_here"] is None else f", {r['compile_seconds_here']:.0f} s here"))
        else:
            lines.append(f"packed / bucketed: est. epoch x{seconds_text(r['est_train_epoch_ratio'])}, est. eval "
                         f"x{seconds_text(r['est_eval_ratio'])}, compiles x{seconds_text(r['compile_count_ratio'])}")
            lines.append(f"({r['estimate']})")
    return "\n".join(lines)
