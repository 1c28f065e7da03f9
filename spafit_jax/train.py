"""`python -m spafit_jax.train`: fine-tune a BERT with SPAFIT (or a baseline) and evaluate it.

All the work is in `train_and_evaluate(config, workdir)`: load and plan once, then the loop.
`main` only parses the command line. With no arguments it runs the offline demo: MiniLM on BBC
News with SPAFIT, on the CPU. The data flow: config -> plan -> data -> step -> checkpoint -> results.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from spafit_jax import batching, checkpoint, cli, compiling, data, hf, metrics, optim, parallel, rundir
from spafit_jax import frozen as frozen_cache
from spafit_jax import run as run_lib
from spafit_jax.config import Config
from spafit_jax.errors import ConfigError, SpafitError
from spafit_jax.plan import Plan, make_plan

log = logging.getLogger("spafit_jax")


@dataclasses.dataclass
class Run:
    """What `train_and_evaluate` returns: the results.json contents and the final host state."""

    results: dict
    state: optim.TrainState
    workdir: Path


@dataclasses.dataclass
class Loaded:
    """Everything a run loads once: the model and its parameters, the plan, the tokenised task."""

    model: Any
    params: Any
    plan: Plan
    task: data.TaskData
    tokenizer: Any


def load(cfg: Config) -> Loaded:
    """Resolve the model, plan its trainability, load and tokenise the task, load the weights.

    Settings that do not fit the model (data.max_length above its positions) are refused first."""
    folder = hf.resolve(cfg.model.name)
    model_cfg = hf.read_config(folder)
    if cfg.data.max_length > model_cfg.max_tokens:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is above the {model_cfg.max_tokens} positions of "
                          f"{cfg.model.name} (from max_position_embeddings in {folder / 'config.json'}); use "
                          f"data.max_length={model_cfg.max_tokens} or less", "data.max_length")
    plan = make_plan(cfg.method, model_cfg.num_hidden_layers)
    _check_sizes(cfg, plan, model_cfg, folder)
    tokenizer = hf.load_tokenizer(folder)
    task = data.load_task_data(cfg.data, tokenizer, seed=cfg.train.seed)
    _check_head(cfg, task.spec.num_labels, model_cfg)
    model, params, plan = run_lib.load_model(cfg, task.spec.num_labels, folder, plan)
    return Loaded(model, params, plan, task, tokenizer)


def _check_sizes(cfg: Config, plan: Plan, model_cfg, folder: Path) -> None:
    """Refuses LoRA ranks above the matrices they adapt (before anything is allocated): a rank above
    min(in, out) of every target adds nothing but memory, and an absurd one would not fit."""
    if plan.lora is None:
        return
    limit = min(model_cfg.hidden_size, model_cfg.intermediate_size)
    ranks = {"method.lora_rank": cfg.method.lora_rank,
             **{f"method.rank_pattern[{k!r}]": v for k, v in dict(cfg.method.rank_pattern).items()}}
    for field, rank in ranks.items():
        if rank > limit:
            raise ConfigError(f"{field}={rank} is above {limit}, the smaller side of the matrices of {cfg.model.name} "
                              f"(hidden_size {model_cfg.hidden_size}, intermediate_size {model_cfg.intermediate_size} "
                              f"in {folder / 'config.json'}); a LoRA rank is at most min(in, out): use {limit} or "
                              "less", "lora_rank")


def _check_head(cfg: Config, num_labels: int, model_cfg) -> None:
    """Refuses a classifier head larger than the model's whole embedding table (data.num_labels=10**9)."""
    if num_labels > model_cfg.vocab_size:
        raise ConfigError(f"{num_labels} classes (data.num_labels={cfg.data.num_labels}) would make a classifier head "
                          f"larger than the whole embedding table of {cfg.model.name} ({model_cfg.vocab_size} tokens); "
                          "check data.num_labels (null infers it from the train labels)", "num_labels")


def _eval_batch(t, task: data.TaskData) -> int:
    """train.eval_batch_size, capped at the largest eval split rounded up to the devices: a last batch is
    padded up to the batch size, and padding beyond the split only costs memory (an absurd size would not fit)."""
    return _capped(t.eval_batch_size, max(len(enc) for enc in task.evals.values()))


def _capped(batch: int, examples: int) -> int:
    n = jax.device_count()
    return min(batch, max(n, -(-examples // n) * n))


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


def _evaluate(driver, state, frozen, task: data.TaskData, cfg: Config, buckets) -> dict[str, dict[str, float]]:
    """Metrics of every eval split: every example once, predictions gathered across hosts once."""
    out, size = {}, _eval_batch(cfg.train, task)
    for split, enc in task.evals.items():
        logits, labels, weights = [], [], []
        for local in batching.eval_batches(enc, size, buckets=buckets,
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           group_by_length=cfg.data.group_by_length):
            batch = driver.put_batch(local)
            logits.append(driver.eval_logits(state.trainable, frozen, batch))
            labels.append(batch["labels"])
            weights.append(batch["weights"])
        logits, labels, weights = (driver.gather(x) for x in (logits, labels, weights))
        out[split] = metrics.compute_metrics(task.spec, logits, labels, weights)
    return out


def train_and_evaluate(cfg: Config, workdir: str | os.PathLike | None = None, *,
                       overwrite: bool = False, stop_after: int | None = None) -> Run:
    """Trains, evaluates, checkpoints and writes results.json in `workdir`; re-running resumes.

    `stop_after` stops (as SIGTERM would: checkpoint, then return) after that many steps of
    this invocation; it exists to test resumption.
    """
    _init_distributed(cfg)
    lead, t = jax.process_index() == 0, cfg.train
    parallel.check_batch(t.batch_size, "train.batch_size", t.grad_accum)  # batches the devices cannot share
    parallel.check_batch(t.eval_batch_size, "train.eval_batch_size")
    workdir = rundir.choose(workdir, cfg, overwrite=overwrite, processes=jax.process_count())
    with rundir.Lock(workdir, enabled=lead):  # taken before anything is written, released at the end
        return _train(cfg, workdir, stop_after)


def _train(cfg: Config, workdir: Path, stop_after: int | None) -> Run:
    """`train_and_evaluate` in its locked run folder."""
    lead, t = jax.process_index() == 0, cfg.train
    run = load(cfg)
    plan, spec = run.plan, run.task.spec
    per_epoch = batching.steps_per_epoch(run.task.train, t.batch_size)  # a batch larger than the data: refused
    total_steps = min(math.ceil(t.epochs * per_epoch), t.max_steps or math.inf)
    rundir.prepare(workdir, lead=lead)  # only once the model, the plan and the data are good

    trainable, frozen = plan.split(run.params)
    tx = optim.make_optimizer(plan.labels, t, total_steps)
    buckets = _buckets(cfg, run.task.train)
    cache = None
    if t.cache_frozen:  # the step starts at layer n1 from cached hidden states; evaluation runs the whole model
        cache = frozen_cache.build_cache(run.model, plan, run.params, run.task.train, t,
                                         _capped(t.eval_batch_size, len(run.task.train)), buckets)
    driver = parallel.make_driver(cfg.parallel, run.model.apply, tx, is_regression=spec.is_regression,
                                  grad_accum=t.grad_accum, train_apply_fn=None if cache is None else cache.apply_fn)
    best_metric = t.best_metric or metrics.main_metric(spec)
    ckpt = checkpoint.Checkpointer(
        workdir / rundir.CHECKPOINTS, fingerprint=checkpoint.fingerprint(frozen, plan.labels, model_name=cfg.model.name),
        keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best, best_metric=best_metric)
    state, extra = optim.init_state(trainable, tx, t.seed), {"best": None, "train_seconds": 0.0}
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        rundir.check_resume_step(int(state.step), total_steps, t, ckpt.directory)
        log.warning("resuming from step %d in %s", int(state.step), workdir)
    if lead:  # the run is accepted (the checkpoints fit it): its config replaces the old one
        rundir.save_config(workdir, cfg)
        run_lib.save_assets(workdir, run.tokenizer, spec)  # the folder alone reloads the run (load_run)
    loop = _Loop(cfg, driver, ckpt, run.task, plan, workdir, best_metric, per_epoch, total_steps, buckets,
                 start=int(state.step), best=extra.get("best"), train_seconds=float(extra.get("train_seconds", 0.0)),
                 bad_steps=int(extra.get("bad_steps", 0)), cache=cache, window=extra.get("window"))
    try:
        state, done = loop.run(driver.put_state(state), driver.put_frozen(frozen), stop_after)
    finally:
        loop.close()
        if lead:
            rundir.discard_overwritten(workdir)
    if not done:
        return Run({"stopped_at": loop.step, "interrupted": loop.interrupted}, driver.host_state(state), workdir)

    results = {
        "task": spec.name, "method": cfg.method.name, "model": str(cfg.model.name), **plan.describe(),
        "eval": next(iter(loop.eval_results.values())), "eval_splits": loop.eval_results, "best": loop.best,
        "steps": loop.step, "train_seconds": loop.train_seconds, "eval_seconds": loop.eval_seconds,
        "examples_per_second": loop.examples_per_second(), "compile_seconds": loop.compile_seconds,
        "padding_efficiency": loop.efficiency("run"),
        "compiled_shapes": len(loop.shapes), "buckets": list(loop.buckets), "bad_steps": loop.bad_steps,
        "devices": jax.device_count(), "processes": jax.process_count(), "parallel": driver.mode,
        "frozen_cache": None if cache is None else {"n1": cache.n1, "bytes": cache.nbytes, "seconds": cache.seconds},
    }
    if lead:
        path = rundir.write_results(workdir, results)
        print(_summary(run, results))
        print(f"results: {path}")
    return Run(results, driver.host_state(state), workdir)


class _Loop:
    """The training loop of one invocation: steps, logging, evaluation, checkpoints, preemption."""

    def __init__(self, cfg, driver, ckpt, task, plan, workdir, best_metric, per_epoch, total_steps, buckets, *,
                 start, best, train_seconds, bad_steps=0, cache=None, window=None):
        self.cfg, self.driver, self.ckpt, self.task, self.plan = cfg, driver, ckpt, task, plan
        self.workdir, self.best_metric, self.per_epoch, self.total_steps = workdir, best_metric, per_epoch, total_steps
        self.start = self.step = start
        self.best, self.train_seconds, self.eval_seconds = best, train_seconds, 0.0
        self.eval_results: dict = {}
        self.pending: list = []  # (step, "finite" flag) of steps not yet checked
        self.bad_steps, self.bad_in_a_row = bad_steps, 0
        self.cache = cache  # frozen.Cache: batches carry the frozen stratum's output
        self.shapes: set[tuple] = set()
        self.buckets = buckets
        self.tokens = {"log": [0, 0], "epoch": [0, 0], "run": [0, 0]}  # [real, padded] since the last log / epoch / start
        self.losses: list = []  # losses of the steps since the last log record
        if window:  # a resumed run: the log window, epoch and run counts as they were at the checkpoint
            self.losses = [float(x) for x in window.get("losses", [])]
            self.tokens.update({k: [int(v) for v in window["tokens"][k]] for k in self.tokens if k in window.get("tokens", {})})
        self.run_seconds = self.compile_seconds = 0.0  # this invocation's step time, and that of steps that compiled
        self.writer = rundir.MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
        self.stop = False
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start, disable=jax.process_index() != 0,
                        desc=f"{task.spec.name}/{cfg.method.name}", mininterval=1.0, dynamic_ncols=True)
        # On several hosts JAX's preemption service catches SIGTERM and names one step at which every
        # process stops (reached_preemption_sync_point below); a handler of ours would replace its
        # handler and let each process stop at another step, which hangs the others.
        # Ctrl-C stops like SIGTERM (checkpoint, then exit 130); a second Ctrl-C aborts at once.
        self.previous, self.interrupted = {}, False
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self.previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self.on_signal),
                             signal.SIGINT: signal.signal(signal.SIGINT, self.on_signal)}

    def on_signal(self, signum, frame) -> None:
        self.stop = True
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def save(self, state, metrics_for_best: dict | None = None, force: bool = False) -> None:
        self.check(upto=self.step)
        extra = {"best": self.best, "train_seconds": self.train_seconds, "epoch": self.step // self.per_epoch,
                 "batch_in_epoch": self.step % self.per_epoch, "bad_steps": self.bad_steps,
                 # so that a resumed run logs exactly what an uninterrupted one does (mean loss of the log
                 # window, padding efficiency of the epoch and of the run)
                 "window": {"losses": [float(x) for x in self.losses], "tokens": self.tokens}}
        self.ckpt.save(self.step, self.driver.saveable(state), extra=extra, metrics=metrics_for_best, force=force)
        if jax.process_index() == 0:
            rundir.discard_overwritten(self.workdir)  # a run moved aside by --overwrite, once a checkpoint is on disk

    def evaluate(self, state, frozen) -> dict:
        results = _evaluate(self.driver, state, frozen, self.task, self.cfg, self.buckets)
        first = next(iter(results.values()))
        for split, values in results.items():
            self.writer.write({"kind": "eval", "step": self.step, "split": split, **values})
        if self.best is None or first[self.best_metric] > self.best["value"]:
            self.best = {"step": self.step, "metric": self.best_metric, "value": first[self.best_metric]}
        self.eval_results = results
        return first

    def count_tokens(self, real: int, padded: int) -> None:
        for counts in self.tokens.values():
            counts[0], counts[1] = counts[0] + real, counts[1] + padded

    def efficiency(self, since: str) -> float:
        """Real tokens / padded tokens of this process's rows since the last log, epoch or start; resets."""
        real, padded = self.tokens[since]
        self.tokens[since] = [0, 0]
        return real / max(padded, 1)

    def examples_per_second(self) -> float:
        """Steady-state training throughput of this invocation: steps that compiled are left out."""
        steps = self.step - self.start - len(self.shapes)
        seconds = self.run_seconds - self.compile_seconds
        return steps * self.cfg.train.batch_size / seconds if steps > 0 and seconds > 0 else 0.0

    def check(self, upto: int) -> None:
        """Counts the skipped (non-finite) steps up to step `upto`; raises DivergedError after
        `train.max_bad_steps` in a row. Checking lags one step behind so the host does not wait
        for the device after every step."""
        while self.pending and self.pending[0][0] <= upto:
            step, finite = self.pending.pop(0)
            if bool(finite):
                self.bad_in_a_row = 0
                continue
            self.bad_steps, self.bad_in_a_row = self.bad_steps + 1, self.bad_in_a_row + 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.bad_in_a_row)
            limit = self.cfg.train.max_bad_steps
            if self.bad_in_a_row >= limit:
                self.writer.write({"kind": "diverged", "step": step, "bad_steps": self.bad_steps})
                raise optim.DivergedError(
                    f"training diverged: {limit} steps in a row (up to step {step}) had a non-finite loss or gradient "
                    f"and were skipped; nothing was saved since; lower train.lr, set train.max_grad_norm, check the "
                    f"data, or raise train.max_bad_steps (checkpoints in {self.workdir} hold the last good state)")

    def log(self, losses: list, n_examples: int, since: float) -> None:
        t = self.cfg.train
        self.check(upto=self.step)
        loss, now = float(np.mean([float(x) for x in losses])), time.perf_counter()
        lr = optim.learning_rates(self.plan.labels, t, self.total_steps, self.step - 1)
        self.writer.write({"step": self.step, "loss": loss, "learning_rate": max(lr.values()),
                           "examples_per_second": n_examples / (now - since), "epoch": self.step / self.per_epoch,
                           "bad_steps": self.bad_steps, "padding_efficiency": self.efficiency("log"),
                           **{f"lr/{k}": v for k, v in lr.items()}})
        self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{n_examples / (now - since):.1f}")

    def run(self, state, frozen, stop_after: int | None):
        """Trains to the last step (then evaluates and saves: returns (state, True)), or until
        SIGTERM, a preemption or `stop_after` steps (then saves: returns (state, False))."""
        t, ckpt_every = self.cfg.train, self.cfg.checkpoint.every
        since, n_log, batches = time.perf_counter(), 0, None
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.per_epoch)
            if batches is None or in_epoch == 0:
                batches = frozen_cache.train_batches(
                    self.cache, self.task.train, t.batch_size, seed=t.seed, epoch=epoch, buckets=self.buckets,
                    start=in_epoch, process_index=jax.process_index(), process_count=jax.process_count(),
                    group_by_length=self.cfg.data.group_by_length)
            local = next(batches)
            self.count_tokens(*batching.padding_efficiency(local))
            batch = self.driver.put_batch(local)
            shape = tuple(batch["input_ids"].shape)
            compiles = shape not in self.shapes
            self.shapes.add(shape)
            t0 = time.perf_counter()
            state, out = self.driver.step(state, frozen, batch)
            self.losses.append(out["loss"])
            self.step += 1
            self.pending.append((self.step, out["finite"]))
            self.check(upto=self.step - 1)
            n_log += t.batch_size
            self.bar.update(1)
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                self.log(self.losses, n_log, since)
                self.losses, since, n_log = [], time.perf_counter(), 0
            dt = time.perf_counter() - t0
            self.train_seconds, self.run_seconds = self.train_seconds + dt, self.run_seconds + dt
            self.compile_seconds += dt if compiles else 0.0
            if self.step % self.per_epoch == 0:
                self.writer.write({"kind": "epoch", "step": self.step, "epoch": self.step // self.per_epoch,
                                   "padding_efficiency": self.efficiency("epoch")})
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.save(state, self.evaluate(state, frozen))
            elif ckpt_every and self.step % ckpt_every == 0:
                self.save(state)
            preempted = self.stop or multihost_utils.reached_preemption_sync_point(self.step)
            if (preempted or (stop_after is not None and self.step - self.start >= stop_after)) \
                    and self.step < self.total_steps:
                self.save(state, force=True)
                self.ckpt.wait()
                log.warning("stopped at step %d; checkpoint saved in %s; re-run the same command to resume",
                            self.step, self.workdir)
                return state, False
        self.bar.close()
        jax.block_until_ready(state)
        self.check(upto=self.step)
        t_eval = time.perf_counter()
        first = self.evaluate(state, frozen)
        self.eval_seconds = time.perf_counter() - t_eval
        self.save(state, first, force=True)
        self.ckpt.wait()
        return state, True

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.ckpt.close()
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _summary(run: Loaded, results: dict) -> str:
    lines = [run.plan.summary(run.params), ""]
    for split, values in results["eval_splits"].items():
        lines.append(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    lines.append(
        f"train time {results['train_seconds']:.1f} s, {results['examples_per_second']:.1f} examples/s, "
        f"{results['steps']} steps, {results['compiled_shapes']} compiled step shapes"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notices
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars of small files: stderr is the trainer's own
    try:
        cfg, args = cli.parse_args(argv)
        compiling.use_compile_cache()  # a rerun or a resume loads the compiled steps
        run = train_and_evaluate(cfg, args.workdir, overwrite=args.overwrite)
    except SpafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the workdir or its disk (full, read-only): the path and what to do
        print(f"error: {rundir.describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved since the last checkpoint (if any); re-run the same command to "
              "resume from it", file=sys.stderr)
        return 130
    return 130 if run.results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
