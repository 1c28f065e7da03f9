"""`python -m spafit_jax.train`: fine-tune a BERT with SPAFIT (or a baseline) and evaluate it.

All the work is in `train_and_evaluate(config, workdir)`; `main` only parses the command line.
With no arguments it runs the offline demo: MiniLM on BBC News with SPAFIT, on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from spafit_jax import checkpoint, cli, config as config_lib, data, hf, masking, metrics, optim, parallel
from spafit_jax.errors import ConfigError, SpafitError
from spafit_jax.lora import LoRAConfig

log = logging.getLogger("spafit_jax")
RESULTS = "results.json"


@dataclasses.dataclass
class Run:
    """What `train_and_evaluate` returns: the results.json contents and the final host state."""

    results: dict
    state: optim.TrainState
    workdir: Path


def _default_workdir(cfg) -> Path:
    return Path("runs") / f"{cfg.data.task}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _init_distributed(cfg) -> None:
    d = cfg.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id,
        initialization_timeout=d.initialization_timeout, heartbeat_timeout_seconds=d.heartbeat_timeout,
    )


def _lora_config(cfg, num_layers: int) -> LoRAConfig | None:
    m = cfg.method
    if m.name not in ("lora", "spafit"):
        return None
    layers = None
    if m.name == "spafit":
        _, n2 = masking.resolve_strata(num_layers, m.n1, m.n2)
        layers = tuple(range(n2, num_layers))
    return LoRAConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout, targets=m.lora_targets,
                      layers=layers, rank_pattern=dict(m.rank_pattern), rslora=m.rslora)


class _Writer:
    """metrics.jsonl and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        prefix = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _evaluate(driver, state, frozen, task: data.TaskData, cfg) -> dict[str, dict[str, float]]:
    """Metrics of every eval split: every example once, predictions gathered across hosts once."""
    buckets = data.resolve_buckets(cfg.data)
    out = {}
    for split, enc in task.evals.items():
        logits, labels, weights = [], [], []
        for local in data.eval_batches(enc, cfg.train.eval_batch_size, buckets=buckets,
                                       process_index=jax.process_index(), process_count=jax.process_count()):
            batch = driver.put_batch(local)
            logits.append(driver.eval_logits(state.trainable, frozen, batch))
            labels.append(batch["labels"])
            weights.append(batch["weights"])
        logits, labels, weights = (driver.gather(x) for x in (logits, labels, weights))
        out[split] = metrics.compute_metrics(task.spec, logits, labels, weights)
    return out


def _summary_table(params, labels, n1, n2, results) -> str:
    lines = [masking.summary(params, labels), ""]
    if n1 is not None:
        lines.append(f"strata: frozen layers 0..{n1 - 1}, bias-only {n1}..{n2 - 1}, LoRA + bias {n2}..L-1")
    for split, vals in results["eval_splits"].items():
        lines.append(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
    lines.append(
        f"train time {results['train_seconds']:.1f} s, {results['examples_per_second']:.1f} examples/s, "
        f"{results['steps']} steps, {results['compiled_shapes']} compiled step shapes"
    )
    return "\n".join(lines)


def train_and_evaluate(cfg: config_lib.Config, workdir: str | os.PathLike | None = None, *,
                       overwrite: bool = False, stop_after: int | None = None) -> Run:
    """Trains, evaluates, checkpoints and writes results.json in `workdir`; re-running resumes.

    `stop_after` stops (as SIGTERM would: checkpoint, then return) after that many steps of
    this invocation; it exists to test resumption.
    """
    _init_distributed(cfg)
    lead = jax.process_index() == 0
    spec = data.task_from_config(cfg.data)  # bad task names fail before anything heavy
    t = cfg.train
    parallel.check_batch(t.batch_size, "train.batch_size", t.grad_accum)  # and batches the devices cannot share
    parallel.check_batch(t.eval_batch_size, "train.eval_batch_size")
    if workdir is None:
        if jax.process_count() > 1:
            raise ConfigError("multi-host runs need an explicit --workdir shared by all processes")
        workdir = _default_workdir(cfg)
    workdir = Path(workdir)
    if (workdir / RESULTS).exists():
        if not overwrite:
            raise ConfigError(f"{workdir} holds a finished run ({RESULTS}); pass --overwrite to replace it "
                              "or choose another --workdir")
        if lead:
            for name in (RESULTS, "checkpoints", "metrics.jsonl", "tensorboard"):
                path = workdir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        config_lib.save_config(cfg, workdir / "config.yaml")

    folder = hf.resolve(cfg.model.name)
    num_layers = hf.read_config(folder).num_hidden_layers
    lora = _lora_config(cfg, num_layers)
    tokenizer = hf.load_tokenizer(folder)
    task = data.load_task_data(cfg.data, tokenizer, seed=cfg.train.seed)
    spec = task.spec
    dtype = jnp.dtype(cfg.model.dtype)
    model, params = hf.load_pretrained(folder, num_labels=spec.num_labels, dtype=dtype,
                                       param_dtype=jnp.dtype(cfg.model.param_dtype), seed=cfg.train.seed, lora=lora)
    m = cfg.method
    labels = masking.method_labels(params, m.name, n1=m.n1, n2=m.n2, train_pooler=m.train_pooler,
                                   train_layernorm=None if m.name == "full" else m.train_layernorm)
    n1, n2 = masking.resolve_strata(num_layers, m.n1, m.n2) if m.name == "spafit" else (None, None)
    trainable, frozen = masking.split(params, labels)

    per_epoch = data.steps_per_epoch(task.train, t.batch_size)
    total_steps = math.ceil(t.epochs * per_epoch)
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    tx = optim.make_optimizer(labels, t, total_steps)
    driver = parallel.make_driver(cfg.parallel.mode, model.apply, tx, is_regression=spec.is_regression,
                                  grad_accum=t.grad_accum, fsdp=cfg.parallel.fsdp)
    best_metric = t.best_metric or metrics.main_metric(spec)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", fingerprint=checkpoint.fingerprint(frozen, labels, model_name=str(cfg.model.name)),
        keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best, best_metric=best_metric, best_mode="max",
    )
    state = optim.init_state(trainable, tx, t.seed)
    extra: dict[str, Any] = {"best": None, "train_seconds": 0.0}
    if ckpt.latest_step() is not None:
        host, extra = ckpt.restore(driver.host_state(driver.put_state(state)))
        state = host
        log.warning("resuming from step %d in %s", int(np.asarray(host.step).reshape(-1)[0]), workdir)
    state = driver.put_state(state)
    frozen = driver.put_frozen(frozen)
    start = int(np.asarray(driver.host_state(state).step))

    stop = {"signal": False}
    # On several hosts JAX's preemption service catches SIGTERM and names one step at which every
    # process stops (reached_preemption_sync_point below); a handler of ours would replace its
    # handler and let each process stop at another step, which hangs the others.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True)) \
        if _main_thread() and jax.process_count() == 1 else None
    if lead and (workdir / "metrics.jsonl").exists():  # drop what was logged after the checkpoint we resume from
        kept = [r for r in (workdir / "metrics.jsonl").read_text().splitlines() if r and json.loads(r)["step"] <= start]
        (workdir / "metrics.jsonl").write_text("".join(r + "\n" for r in kept))
    writer = _Writer(workdir, lead)
    buckets = data.resolve_buckets(cfg.data)
    shapes: set[tuple] = set()
    best = extra.get("best")
    train_seconds = float(extra.get("train_seconds", 0.0))
    eval_results: dict = {}

    def save(step: int, metrics_for_best: dict | None = None, force: bool = False):
        ckpt.save(step, driver.host_state(state) if driver.mode == "pmap" else state,
                  extra={"best": best, "train_seconds": train_seconds, "epoch": step // per_epoch,
                         "batch_in_epoch": step % per_epoch},
                  metrics=metrics_for_best, force=force)

    def evaluate(step: int) -> dict:
        nonlocal best
        results = _evaluate(driver, state, frozen, task, cfg)
        first = next(iter(results.values()))
        for split, vals in results.items():
            writer.write({"kind": "eval", "step": step, "split": split, **vals})
        if best is None or first[best_metric] > best["value"]:
            best = {"step": step, "metric": best_metric, "value": first[best_metric]}
        return results

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=not lead, desc=f"{spec.name}/{m.name}", mininterval=1.0,
               dynamic_ncols=True)
    step, losses, t_log, n_log = start, [], time.perf_counter(), 0
    batches = None
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, per_epoch)
            if batches is None or in_epoch == 0:
                batches = data.train_batches(task.train, t.batch_size, seed=t.seed, epoch=epoch, buckets=buckets,
                                             start=in_epoch, process_index=jax.process_index(),
                                             process_count=jax.process_count())
            batch = driver.put_batch(next(batches))
            shapes.add(tuple(batch["input_ids"].shape))
            t0 = time.perf_counter()
            state, out = driver.step(state, frozen, batch)
            losses.append(out["loss"])
            step += 1
            n_log += t.batch_size
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                loss = float(np.mean([float(x) for x in losses]))
                now = time.perf_counter()
                lr = optim.learning_rates(labels, t, total_steps, step - 1)
                record = {"step": step, "loss": loss, "learning_rate": max(lr.values()),
                          "examples_per_second": n_log / (now - t_log), "epoch": step / per_epoch}
                record.update({f"lr/{k}": v for k, v in lr.items()})
                writer.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{record['examples_per_second']:.1f}")
                losses, t_log, n_log = [], now, 0
            train_seconds += time.perf_counter() - t0
            if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                eval_results = evaluate(step)
                save(step, next(iter(eval_results.values())))
            elif cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
            preempted = stop["signal"] or multihost_utils.reached_preemption_sync_point(step)
            if preempted or (stop_after is not None and step - start >= stop_after):
                if step < total_steps:
                    save(step, force=True)
                    ckpt.wait()
                    log.warning("stopped at step %d; checkpoint saved in %s; re-run the same command to resume",
                                step, workdir)
                    return Run({"stopped_at": step}, driver.host_state(state), workdir)
        bar.close()
        jax.block_until_ready(state)
        t_eval = time.perf_counter()
        eval_results = evaluate(step)
        eval_seconds = time.perf_counter() - t_eval
        save(step, next(iter(eval_results.values())), force=True)
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    counts = masking.count_params(params, labels)
    total = sum(counts.values())
    trained = total - counts.get("frozen", 0)
    results = {
        "task": spec.name, "method": m.name, "model": str(cfg.model.name), "n1": n1, "n2": n2,
        "trainable_params": trained, "total_params": total, "trainable_percent": 100.0 * trained / total,
        "params_by_label": counts,
        "eval": next(iter(eval_results.values())), "eval_splits": eval_results, "best": best,
        "steps": step, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "examples_per_second": (step - start) * t.batch_size / max(train_seconds, 1e-9) if step > start else 0.0,
        "compiled_shapes": len(shapes), "buckets": list(buckets),
        "devices": jax.device_count(), "processes": jax.process_count(), "parallel": driver.mode,
    }
    if lead:
        tmp = workdir / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(workdir / RESULTS)
        print(_summary_table(params, labels, n1, n2, results))
        print(f"results: {workdir / RESULTS}")
    return Run(results, driver.host_state(state), workdir)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notices
    try:
        cfg, args = cli.parse_args(argv)
        train_and_evaluate(cfg, args.workdir, overwrite=args.overwrite)
    except SpafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
