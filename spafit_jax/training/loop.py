"""The training loop of one invocation, in small pieces that each do one thing.

`Batches` hands out the train batches (from `batching`; the frozen-stratum cache, when on, is one
step applied to them), `Meter` counts what the run measures (losses of the log window, real and
padded tokens, step and compile time), `Guard` skips and counts non-finite steps, `Evaluator`
evaluates every eval split and keeps the best, `Signals` turns SIGTERM / Ctrl-C into a clean stop,
and `Loop` runs the steps and decides when to log, evaluate, checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from spafit_jax.data import batching, pipeline as data, metrics, packing
from spafit_jax.training import metricslog, optimizer, rundir
from spafit_jax.config.files import Config
from spafit_jax.training.plan import Plan
from spafit_jax.training.steps import DivergedError

log = logging.getLogger("spafit_jax")


@dataclasses.dataclass(frozen=True)
class Length:
    """How long the run is: batches per epoch and steps in all."""

    per_epoch: int
    total_steps: int


class Batches:
    """This process's train batches of each epoch, in the run's one training order (`batching.train_batches`,
    or with data.packing `packing.train_batches` in the run's `packing.Layout`); with a frozen-stratum cache
    (`frozen.Cache`) each batch also carries its rows' hidden states."""

    def __init__(self, cfg: Config, train: data.Encoded, buckets, cache=None, layout: packing.Layout | None = None):
        self.cfg, self.train, self.buckets, self.cache, self.layout = cfg, train, buckets, cache, layout

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of `epoch` from its batch `start` on."""
        t, where = self.cfg.train, dict(process_index=jax.process_index(), process_count=jax.process_count())
        if self.layout is not None:
            batches = packing.train_batches(self.train, self.layout, max_segments=self.cfg.data.max_segments,
                                            seed=t.seed, epoch=epoch, start=start, with_rows=self.cache is not None,
                                            **where)
        else:
            batches = batching.train_batches(self.train, t.batch_size, seed=t.seed, epoch=epoch, buckets=self.buckets,
                                             start=start, group_by_length=self.cfg.data.group_by_length,
                                             with_rows=self.cache is not None, **where)
        return batches if self.cache is None else self.cache.attach(batches)


class Meter:
    """What the run measures: losses of the log window, [real, padded] tokens since the last log, the epoch's
    start and the run's start (`window`, kept in checkpoints), step time and the compiled step shapes."""

    def __init__(self, window: dict | None = None):
        self.losses: list = []
        self.tokens = {"log": [0, 0], "epoch": [0, 0], "run": [0, 0]}
        if window:  # a resumed run: the log window, epoch and run counts as they were at the checkpoint
            self.losses = [float(x) for x in window.get("losses", [])]
            self.tokens.update({k: [int(v) for v in window["tokens"][k]]
                                for k in self.tokens if k in window.get("tokens", {})})
        self.shapes: set[tuple] = set()
        self.run_seconds = self.compile_seconds = 0.0  # this invocation's step time, and that of steps that compiled
        self.examples = 0  # the last batch's examples on this process (packed rows hold several)
        self.steady_examples = 0  # this invocation's examples in steps that did not compile

    def batch(self, local: dict, shape: tuple) -> bool:
        """Counts a batch's tokens and examples (weighted > 0); whether its step compiles (a shape not seen before)."""
        real, padded = batching.padding_efficiency(local)
        self.examples = int((np.asarray(local["weights"]) > 0).sum())
        for counts in self.tokens.values():
            counts[0], counts[1] = counts[0] + real, counts[1] + padded
        compiles = shape not in self.shapes
        self.shapes.add(shape)
        return compiles

    def step(self, seconds: float, compiled: bool) -> None:
        self.run_seconds += seconds
        self.compile_seconds += seconds if compiled else 0.0
        self.steady_examples += 0 if compiled else self.examples

    def efficiency(self, since: str) -> float:
        """Real tokens / padded tokens of this process's rows since the last log, epoch or start; resets."""
        real, padded = self.tokens[since]
        self.tokens[since] = [0, 0]
        return real / max(padded, 1)

    def window(self) -> dict:
        """What a checkpoint keeps so that a resumed run logs exactly what an uninterrupted one does."""
        return {"losses": [float(x) for x in self.losses], "tokens": self.tokens}

    def examples_per_second(self, processes: int = 1) -> float:
        """Steady-state training throughput of this invocation: the examples of steps that did not compile, on
        this process times `processes` (hosts' shares differ by a few examples when packed), per second."""
        seconds = self.run_seconds - self.compile_seconds
        return self.steady_examples * processes / seconds if seconds > 0 else 0.0


class Guard:
    """Counts the skipped (non-finite) steps; raises DivergedError after `limit` in a row. Checking lags
    one step behind so the host does not wait for the device after every step."""

    def __init__(self, limit: int, writer: metricslog.MetricsWriter, workdir: Path, bad_steps: int = 0):
        self.limit, self.writer, self.workdir = limit, writer, workdir
        self.bad_steps, self.in_a_row = bad_steps, 0
        self.pending: list = []  # (step, "finite" flag) of steps not yet checked

    def push(self, step: int, finite) -> None:
        self.pending.append((step, finite))

    def check(self, upto: int) -> None:
        """Checks the steps up to `upto`."""
        while self.pending and self.pending[0][0] <= upto:
            step, finite = self.pending.pop(0)
            if bool(finite):
                self.in_a_row = 0
                continue
            self.bad_steps, self.in_a_row = self.bad_steps + 1, self.in_a_row + 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.in_a_row)
            if self.in_a_row >= self.limit:
                self.writer.write({"kind": "diverged", "step": step, "bad_steps": self.bad_steps})
                raise DivergedError(
                    f"training diverged: {self.limit} steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient and were skipped; nothing was saved since; lower train.lr, set train.max_grad_norm, "
                    f"check the data, or raise train.max_bad_steps (checkpoints in {self.workdir} hold the last "
                    "good state)")


class Evaluator:
    """Evaluates every eval split (every example once, predictions gathered across hosts once), logs the
    metrics and keeps the best of the first split's `best_metric`."""

    def __init__(self, driver, cfg: Config, task: data.TaskData, buckets, best_metric: str):
        self.driver, self.cfg, self.task, self.buckets, self.best_metric = driver, cfg, task, buckets, best_metric
        self.best: dict | None = None
        self.results: dict[str, dict[str, float]] = {}

    def batch_size(self) -> int:
        """train.eval_batch_size, capped at the largest eval split rounded up to the devices."""
        return capped(self.cfg.train.eval_batch_size, max(len(enc) for enc in self.task.evals.values()))

    def batches(self, enc: data.Encoded) -> Iterator[dict[str, np.ndarray]]:
        """This process's eval batches of one split: every example once (packed with data.packing, about
        train.eval_batch_size examples a batch; otherwise `batching.eval_batches`)."""
        where = dict(process_index=jax.process_index(), process_count=jax.process_count())
        if self.cfg.data.packing:
            slots, rows = packing.eval_rows(enc, self.cfg.train.eval_batch_size,
                                            max_segments=self.cfg.data.max_segments, multiple=jax.device_count())
            return (batch for _, batch in packing.eval_batches(enc, slots, rows, **where))
        return batching.eval_batches(enc, self.batch_size(), buckets=self.buckets,
                                     group_by_length=self.cfg.data.group_by_length, **where)

    def __call__(self, state, frozen, step: int, writer: metricslog.MetricsWriter) -> dict[str, float]:
        """The first split's metrics at `step`; all splits' in `self.results`."""
        out = {}
        for split, enc in self.task.evals.items():
            logits, labels, weights = [], [], []
            for local in self.batches(enc):
                batch = self.driver.put_batch(local)
                logits.append(self.driver.eval_logits(state.trainable, frozen, batch))
                labels.append(batch["labels"])
                weights.append(batch["weights"])
            logits, labels, weights = (self.driver.gather(x) for x in (logits, labels, weights))
            if logits.ndim == 3:  # packed: [rows, K, C] -> one prediction per segment; weights drop absent ones
                logits = logits.reshape(-1, logits.shape[-1])
            out[split] = metrics.compute_metrics(self.task.spec, logits, labels.reshape(-1), weights.reshape(-1))
            writer.write({"kind": "eval", "step": step, "split": split, **out[split]})
        first = next(iter(out.values()))
        if self.best is None or first[self.best_metric] > self.best["value"]:
            self.best = {"step": step, "metric": self.best_metric, "value": first[self.best_metric]}
        self.results = out
        return first


def capped(batch: int, examples: int) -> int:
    """`batch`, capped at `examples` rounded up to the devices: a last batch is padded up to the batch size,
    and padding beyond the data only costs memory (an absurd size would not fit)."""
    n = jax.device_count()
    return min(batch, max(n, -(-examples // n) * n))


class Signals:
    """`with Signals() as s`: SIGTERM and Ctrl-C set `s.stop` (Ctrl-C also `s.interrupted`; a second one aborts).

    On several hosts JAX's preemption service catches SIGTERM and names one step at which every
    process stops; a handler of ours would replace its handler and let each process stop at another
    step, which hangs the others: so nothing is installed there (nor outside the main thread)."""

    def __init__(self):
        self.stop = self.interrupted = False
        self.previous: dict = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _on_signal(self, signum, frame) -> None:
        self.stop = True
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Loop:
    """The steps of one invocation: logging, evaluation, checkpoints and stopping around `driver.step`."""

    def __init__(self, cfg: Config, driver, ckpt, plan: Plan, length: Length, workdir: Path):
        self.cfg, self.driver, self.ckpt, self.plan, self.length, self.workdir = cfg, driver, ckpt, plan, length, workdir
        self.lead = jax.process_index() == 0
        self.start = self.step = self.bad_steps = 0
        self.train_seconds = self.eval_seconds = 0.0
        self.meter, self.interrupted = Meter(), False

    def run(self, state, frozen, batches: Batches, evaluator: Evaluator, resume: dict, stop_after: int | None):
        """Trains from the checkpoint's step to the last step, then evaluates and saves: returns (state, True);
        or until SIGTERM, a preemption or `stop_after` steps, then saves: returns (state, False).

        `resume` is {"step": the checkpoint's step, **its extra}, or {} for a new run. Afterwards `step`,
        `interrupted`, `meter`, `bad_steps`, `train_seconds` and `eval_seconds` say what happened."""
        self.start = self.step = int(resume.get("step", 0))
        evaluator.best = resume.get("best")
        self.train_seconds, self.eval_seconds = float(resume.get("train_seconds", 0.0)), 0.0
        self.meter, self.interrupted = Meter(resume.get("window")), False
        from tqdm.auto import tqdm

        with contextlib.ExitStack() as stack:  # closed in reverse order, also when a step fails
            stack.callback(self.ckpt.close)
            writer = metricslog.MetricsWriter(self.workdir, enabled=self.lead, resume_step=self.start)
            stack.callback(writer.close)
            guard = Guard(self.cfg.train.max_bad_steps, writer, self.workdir, int(resume.get("bad_steps", 0)))
            bar = tqdm(total=self.length.total_steps, initial=self.start, disable=not self.lead, mininterval=1.0,
                       desc=f"{evaluator.task.spec.name}/{self.cfg.method.name}", dynamic_ncols=True)
            stack.callback(bar.close)
            signals = stack.enter_context(Signals())
            try:
                state, done = self._steps(state, frozen, batches, evaluator, (self.meter, writer, guard, bar),
                                          lambda: signals.stop or (stop_after is not None and
                                                                   self.step - self.start >= stop_after))
            finally:
                self.bad_steps, self.interrupted = guard.bad_steps, signals.interrupted
        return state, done

    def examples_per_second(self) -> float:
        """Steady-state training throughput of this invocation (steps that compiled left out)."""
        return self.meter.examples_per_second(jax.process_count())

    def _steps(self, state, frozen, batches, evaluator, tools, stopping):
        meter, writer, guard, bar = tools
        t, every, total = self.cfg.train, self.cfg.checkpoint.every, self.length.total_steps
        since, n_log, epoch_batches = time.perf_counter(), 0, None
        while self.step < total:
            epoch, in_epoch = divmod(self.step, self.length.per_epoch)
            if epoch_batches is None or in_epoch == 0:
                epoch_batches = batches.epoch(epoch, in_epoch)
            local = next(epoch_batches)
            batch = self.driver.put_batch(local)
            compiles = meter.batch(local, tuple(batch["input_ids"].shape))
            t0 = time.perf_counter()
            state, out = self.driver.step(state, frozen, batch)
            meter.losses.append(out["loss"])
            self.step += 1
            guard.push(self.step, out["finite"])
            guard.check(upto=self.step - 1)
            n_log += meter.examples * jax.process_count()
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == total:
                guard.check(upto=self.step)
                self._log(meter, writer, guard, n_log, since, bar)
                since, n_log = time.perf_counter(), 0
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            meter.step(dt, compiles)
            if self.step % self.length.per_epoch == 0:
                writer.write({"kind": "epoch", "step": self.step, "epoch": self.step // self.length.per_epoch,
                              "padding_efficiency": meter.efficiency("epoch")})
            if t.eval_every and self.step % t.eval_every == 0 and self.step < total:
                self._save(state, meter, guard, evaluator, evaluator(state, frozen, self.step, writer))
            elif every and self.step % every == 0:
                self._save(state, meter, guard, evaluator)
            preempted = multihost_utils.reached_preemption_sync_point(self.step)
            if (preempted or stopping()) and self.step < total:
                self._save(state, meter, guard, evaluator, force=True)
                self.ckpt.wait()
                log.warning("stopped at step %d; checkpoint saved in %s; re-run the same command to resume",
                            self.step, self.workdir)
                return state, False
        bar.close()
        jax.block_until_ready(state)
        guard.check(upto=self.step)
        t_eval = time.perf_counter()
        first = evaluator(state, frozen, self.step, writer)
        self.eval_seconds = time.perf_counter() - t_eval
        self._save(state, meter, guard, evaluator, first, force=True)
        self.ckpt.wait()
        return state, True

    def _log(self, meter: Meter, writer, guard: Guard, n_examples: int, since: float, bar) -> None:
        t = self.cfg.train
        loss, now = float(np.mean([float(x) for x in meter.losses])), time.perf_counter()
        meter.losses = []
        lr = optimizer.learning_rates(self.plan, t, self.length.total_steps, self.step - 1)
        writer.write({"step": self.step, "loss": loss, "learning_rate": max(lr.values()),
                      "examples_per_second": n_examples / (now - since), "epoch": self.step / self.length.per_epoch,
                      "bad_steps": guard.bad_steps, "padding_efficiency": meter.efficiency("log"),
                      **{f"lr/{k}": v for k, v in lr.items()}})
        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{n_examples / (now - since):.1f}")

    def _save(self, state, meter: Meter, guard: Guard, evaluator: Evaluator, metrics_for_best: dict | None = None,
              force: bool = False) -> None:
        guard.check(upto=self.step)
        per_epoch = self.length.per_epoch
        extra = {"best": evaluator.best, "train_seconds": self.train_seconds, "epoch": self.step // per_epoch,
                 "batch_in_epoch": self.step % per_epoch, "bad_steps": guard.bad_steps, "window": meter.window()}
        self.ckpt.save(self.step, self.driver.saveable(state), extra=extra, metrics=metrics_for_best, force=force)
        if self.lead:
            rundir.discard_overwritten(self.workdir)  # a run moved aside by --overwrite, once a checkpoint is on disk
