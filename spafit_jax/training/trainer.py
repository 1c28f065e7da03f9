"""The work behind `python -m spafit_jax.train` (its command line and --help: `spafit_jax/train.py`).

All the work is in `train_and_evaluate(config, workdir)`: load and plan once, then the loop.
`main` only parses the command line. With no arguments it runs the offline demo: MiniLM on BBC
News with SPAFIT, on the CPU. The data flow: config -> plan -> data -> batches -> step -> checkpoint
-> results (see `loop` for the pieces of the loop).
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import dataclasses
import logging
import math
import os
from pathlib import Path

import jax

from spafit_jax.data import batching, pipeline as data, metrics, packing
from spafit_jax.training import checkpoint, frozen, loading, optimizer, parallel, rundir, runlock, steps
from spafit_jax.config.files import Config
from spafit_jax.training.loop import Batches, Evaluator, Length, Loop, capped
from spafit_jax.training import results as results_lib
from spafit_jax.training.results import Best, Results

log = logging.getLogger("spafit_jax")
CACHE_HINT_BELOW = 0.85  # a run whose steps spend less than this share of their layers training hears of the cache


@dataclasses.dataclass
class TrainedRun:
    """What `train_and_evaluate` returns: the results (None when the run stopped before its last step), the
    step it reached, whether Ctrl-C stopped it, the final host state and the run folder."""

    results: Results | None
    step: int
    interrupted: bool
    state: steps.TrainState
    workdir: Path


def _buckets(cfg: Config, train: data.Encoded) -> list[int]:
    """The bucket lengths of the run (data.max_shapes: fitted to the batches of the first epoch, the same on
    every host and on resume, since the order depends only on the seed)."""
    order = batching.train_order(train.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0,
                                 group_by_length=cfg.data.group_by_length)
    return cfg.data.bucket_lengths(batching.batch_maxima(train.lengths, order))


def _init_distributed(cfg: Config) -> None:
    d = cfg.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id,
        initialization_timeout=d.initialization_timeout, heartbeat_timeout_seconds=d.heartbeat_timeout,
    )


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None, *,
                       overwrite: bool = False, stop_after: int | None = None) -> TrainedRun:
    """Trains, evaluates, checkpoints and writes results.json in `workdir`; re-running resumes.

    `stop_after` stops (as SIGTERM would: checkpoint, then return) after that many steps of
    this invocation; it exists to test resumption.
    """
    _init_distributed(cfg)
    lead, t = jax.process_index() == 0, cfg.train
    parallel.check_batch(t.batch_size, "train.batch_size", t.grad_accum)  # batches the devices cannot share
    parallel.check_batch(t.eval_batch_size, "train.eval_batch_size")
    workdir = rundir.choose(workdir, cfg, overwrite=overwrite, processes=jax.process_count())
    with runlock.Lock(workdir, enabled=lead):  # taken before anything is written, released at the end
        return _train(cfg, workdir, stop_after)


def _train(cfg: Config, workdir: Path, stop_after: int | None) -> TrainedRun:
    """`train_and_evaluate` in its locked run folder."""
    lead, t = jax.process_index() == 0, cfg.train
    run = loading.load_for_training(cfg)
    plan, spec = run.plan, run.task.spec
    per_epoch = batching.steps_per_epoch(run.task.train, t.batch_size)  # a batch larger than the data: refused
    packed = _packed_layout(cfg, run) if cfg.data.packing else None  # a family that cannot pack: refused
    per_epoch = per_epoch if packed is None else packed.steps
    length = Length(per_epoch, min(math.ceil(t.epochs * per_epoch), t.max_steps or math.inf))
    rundir.prepare(workdir, lead=lead)  # only once the model, the plan and the data are good

    trainable, frozen_half = plan.split(run.params)
    tx = optimizer.make_optimizer(plan, t, length.total_steps)
    best_metric = t.best_metric or metrics.main_metric(spec)
    ckpt = checkpoint.Checkpointer(
        workdir / rundir.CHECKPOINTS, fingerprint=checkpoint.fingerprint(frozen_half, plan.labels, model_name=cfg.model.name),
        keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best, best_metric=best_metric)
    state, resume = steps.init_state(trainable, tx, t.seed), {}
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        rundir.check_resume_step(int(state.step), length.total_steps, t, ckpt.directory)
        rundir.check_resume_settings(workdir, cfg)
        resume = {**extra, "step": int(state.step)}
        log.warning("resuming from step %d in %s", int(state.step), workdir)
    buckets = _buckets(cfg, run.task.train)
    cache = None
    if t.cache_frozen:  # the step starts at layer n1 from cached hidden states; evaluation runs the whole model
        cache = frozen.build_cache(run.model, plan, run.params, run.task.train, t,
                                   capped(t.eval_batch_size, len(run.task.train)), buckets)
    driver = parallel.make_driver(cfg.parallel, run.model.apply, tx, is_regression=spec.is_regression,
                                  grad_accum=t.grad_accum, train_model=None if cache is None else cache.train_model)
    if lead:  # the run is accepted (the checkpoints fit it): its config replaces the old one
        rundir.save_config(cfg, workdir / rundir.CONFIG, resume.get("step"))  # a resume's changes: changes.jsonl
        rundir.save_assets(workdir, run.tokenizer, spec)  # the folder alone reloads the run (load_run)
    loop = Loop(cfg, driver, ckpt, plan, length, workdir)
    evaluator = Evaluator(driver, cfg, run.task, buckets, best_metric)
    try:
        state, done = loop.run(driver.put_state(state), driver.put_frozen(frozen_half),
                               Batches(cfg, run.task.train, buckets, cache, packed), evaluator, resume, stop_after)
    finally:
        if lead:
            rundir.discard_overwritten(workdir)
    if done and loop.step and loop.bad_steps >= loop.step:  # nothing was learnt: no score as if it were fine
        raise steps.DivergedError(
            f"every one of the {loop.step} steps had a non-finite loss or gradient and was skipped, so the model is "
            f"the untrained one; no {rundir.RESULTS} was written: lower train.lr, set train.max_grad_norm or check the "
            f"data and the model, then train in a new --workdir")
    results = _results(cfg, run, loop, evaluator, (driver, buckets, cache, packed)) if done else None
    if results is not None and lead:
        path = results.write(workdir)
        print(_summary(run, results, cfg))
        print(f"results: {path}")
    return TrainedRun(results, loop.step, loop.interrupted, driver.host_state(state), workdir)


def _results(cfg: Config, run: loading.ModelAndTask, loop: Loop, evaluator: Evaluator, how) -> Results:
    """The typed results.json record of a finished run."""
    driver, buckets, cache, packed = how
    best, d = evaluator.best, cfg.data
    return Results(
        task=run.task.spec.name, model=str(cfg.model.name), **run.plan.describe(),
        eval=next(iter(evaluator.results.values())), eval_splits=evaluator.results,
        best=None if best is None else Best(**best), steps=loop.step, train_seconds=loop.train_seconds,
        eval_seconds=loop.eval_seconds, examples_per_second=loop.examples_per_second(),
        compile_seconds=loop.meter.compile_seconds, padding_efficiency=loop.meter.efficiency("run"),
        compiled_shapes=len(loop.meter.shapes), buckets=list(buckets), bad_steps=loop.bad_steps,
        devices=jax.device_count(), processes=jax.process_count(), parallel=driver.mode,
        frozen_cache=None if cache is None else {"n1": cache.n1, "bytes": cache.nbytes, "seconds": cache.seconds},
        packing=None if packed is None else packing.describe(run.task.train, packed, d.max_segments,
                                                             seed=cfg.train.seed),
        code=results_lib.code_version(),
    )


def _packed_layout(cfg: Config, run: loading.ModelAndTask) -> packing.Layout:
    """The packed steps (`packing.layout`: rows of about train.batch_size examples, a multiple of the devices x
    train.grad_accum, and steps per epoch); a one-line ConfigError when the model family cannot pack."""
    packing.check_model(run.model, f"model.name={cfg.model.name} ({type(run.model).__name__})")
    t, multiple, lengths = cfg.train, jax.device_count() * cfg.train.grad_accum, run.task.train.lengths
    lay = packing.layout(lengths, t.batch_size, max_length=run.task.train.max_length,
                         max_segments=cfg.data.max_segments, seed=t.seed, multiple=multiple)
    warning = packing.drift(len(lengths), lay, t.batch_size, multiple)
    if warning:
        log.warning(warning)
    return lay


def cache_advice(cfg: Config, plan) -> str | None:
    """A line saying what `train.cache_frozen=true` would save and change, for a run without it whose plan
    freezes the embeddings and a sizeable share of the layers (None otherwise)."""
    depth = plan.frozen_depth
    if cfg.train.cache_frozen or depth == 0 or depth / plan.num_layers < 1 - CACHE_HINT_BELOW:
        return None
    return (f"hint: the embeddings and layers 0..{depth - 1} never train; train.cache_frozen=true would run them once "
            f"per example instead of at every step ({depth} of {plan.num_layers} layers less per step), at the cost of "
            "host memory and without dropout in those layers (a change to the maths)")


def _summary(run: loading.ModelAndTask, results: Results, cfg: Config) -> str:
    lines = [run.plan.summary(run.params), ""]
    for split, values in results.splits.items():
        lines.append(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    lines.append(
        f"train time {results.train_seconds:.1f} s, {results.examples_per_second:.1f} examples/s, "
        f"{results.steps} steps, {results.compiled_shapes} compiled step shapes"
    )
    advice = cache_advice(cfg, run.plan)
    return "\n".join(lines + ([advice] if advice else []))
