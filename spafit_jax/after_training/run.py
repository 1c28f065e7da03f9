"""Reload a finished (or stopped) run from its folder: `load_run(workdir)` -> a `LoadedRun` that predicts.

A run folder holds config.yaml, checkpoints/ and, written when the run starts (`rundir.save_assets`),
tokenizer/ (the tokenizer files) and task.json (the task spec: label names, regression or not,
text columns). A folder without those assets still loads: the tokenizer then comes from the base
model named in config.yaml and the spec from the task registry / data config. The frozen base
weights are read from the model config.yaml names (`model.name`); the checkpoint holds only the
trained half, and its fingerprint proves that the base is the one the run was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.data import batching, packing
from spafit_jax.training import compiling, optimizer, results, rundir, steps
from spafit_jax.models import hf
from spafit_jax import lora, masking
from spafit_jax.training.checkpoint import Checkpointer, fingerprint
from spafit_jax.config.files import Config, load_config
from spafit_jax.errors import CheckpointError, ConfigError, DataError, LoadError
from spafit_jax.training.loading import load_model
from spafit_jax.data.metrics import main_metric
from spafit_jax.training.plan import Plan
from spafit_jax.data.tasks import TaskSpec, spec_from_json
from spafit_jax.data.tokens import Examples, check_texts, encode

log = logging.getLogger("spafit_jax")

TOKENIZER, TASK = rundir.TOKENIZER, rundir.TASK  # the run folder names them


def load_spec(workdir: Path, cfg: Config) -> TaskSpec:
    """The run's task spec: task.json, else the registry / data config (a local or hub task reads its train split)."""
    path = workdir / TASK
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not readable JSON ({e}); restore it from a copy, or delete it (the run then "
                            "reads its spec from config.yaml's data settings)") from None
        return spec_from_json(raw, str(path))
    from spafit_jax.data.sources import task_from_config

    return task_from_config(cfg.data)


@dataclasses.dataclass(eq=False)
class LoadedRun:
    """A reloaded run: the model, its parameters (trained + frozen, adapters unmerged), the
    tokenizer, the task spec, the resolved config, the plan and the checkpoint step; `results` is the run's
    results.json (None for a run that has not finished)."""

    workdir: Path
    config: Config
    spec: TaskSpec
    tokenizer: Any
    model: Any
    params: Any
    plan: Plan
    step: int
    results: results.Results | None = None
    _logits_fn: Any = dataclasses.field(default=None, repr=False)

    @property
    def label_names(self) -> list[str] | None:
        return list(self.spec.label_names) if self.spec.label_names else None

    def packs(self) -> bool:
        """Whether `logits` packs by default: the run's model takes packed rows (`segment_starts=`)."""
        try:
            packing.check_model(self.model, "")
        except ConfigError:
            return False
        return True

    def merged_params(self) -> Any:
        """The parameters with every LoRA adapter folded into its kernel (a plain BERT tree)."""
        return lora.merge(self.params, self.plan.lora) if self.plan.lora else self.params

    def logits(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, batch_size: int = 32,
               progress: bool = False, packed: bool | None = None) -> np.ndarray:
        """Logits [N, num_labels] in input order. The texts are packed into rows of data.max_length
        (`_packed_logits`, exact per text) whatever batching the run was trained with, when its model takes
        packed rows and `packed` is None or True; `packed=False` pads batches to the training buckets instead.
        `texts` (and `text_pairs`) are lists of strings, or one string as one text; `batch_size` an integer >= 1."""
        texts = check_texts(texts, "texts")
        text_pairs = None if text_pairs is None else check_texts(text_pairs, "text_pairs")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} must be an integer >= 1 (--batch-size on the command line)")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise DataError(f"{len(texts)} texts but {len(text_pairs)} text pairs; pass one pair per text")
        if (text_pairs is None) != (self.spec.text_b is None):
            need = "pairs (text_pairs=...)" if self.spec.text_b else "single texts (no text_pairs)"
            raise DataError(f"task {self.spec.name} was trained on {need}; pass the same kind of input")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.spec.num_labels), np.float32)
        d = self.config.data
        enc = encode(self.tokenizer, Examples(texts, None if text_pairs is None else list(text_pairs),
                                              np.zeros(n, np.int32)), max_length=d.max_length, cache=False)
        if self._logits_fn is None:
            apply = self.model.apply
            self._logits_fn = compiling.jit(lambda p, b: apply({"params": p}, b["input_ids"], b["attention_mask"],
                                                         b["token_type_ids"], **steps.packed_kwargs(b)))
        if packed is None:
            packed = self.packs()
        elif packed:
            packing.check_model(self.model, f"model.name={self.config.model.name} ({type(self.model).__name__})")
        if packed:
            return self._packed_logits(enc, batch_size, progress)
        batch_size = max(1, min(int(batch_size), n))
        buckets = d.bucket_lengths([enc.lengths[i:i + batch_size].max() for i in range(0, n, batch_size)])
        out = []
        from tqdm.auto import tqdm

        batches = batching.eval_batches(enc, batch_size, buckets=buckets)
        for b in tqdm(batches, total=batching.num_eval_batches(enc, batch_size), disable=not progress,
                      desc="predict", mininterval=1.0):
            logits = np.asarray(self._logits_fn(self.params, b))
            out.append(logits[b["weights"] > 0])
        return np.concatenate(out).astype(np.float32)

    def _packed_logits(self, enc, batch_size: int, progress: bool) -> np.ndarray:
        """`logits` in packed rows: the texts packed first-fit decreasing (the best fill) into
        rows of data.max_length, about `batch_size` texts a batch, the logits returned in input order."""
        from tqdm.auto import tqdm

        slots, rows = packing.eval_rows(enc, batch_size, max_segments=self.config.data.max_segments)
        held, out = [], []
        for mine, b in tqdm(packing.eval_batches(enc, slots, rows), total=-(-len(slots) // rows),
                            disable=not progress, desc="predict", mininterval=1.0):
            held.append(mine)
            out.append(np.asarray(self._logits_fn(self.params, b)))
        return packing.unpack(np.concatenate(out), np.concatenate(held), len(enc)).astype(np.float32)

    def predict(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, batch_size: int = 32,
                progress: bool = False, packed: bool | None = None) -> np.ndarray:
        """Class probabilities [N, num_labels] (softmax), or scores [N] for a regression task; `packed` as in
        `logits`."""
        logits = self.logits(texts, text_pairs, batch_size=batch_size, progress=progress, packed=packed)
        if self.spec.is_regression:
            return logits[:, 0]
        return np.asarray(jax.nn.softmax(logits, axis=-1))


def _pick_step(ckpt: Checkpointer, which: str | int, directory: Path) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}; the run saved none (train it, or let it reach a save)")
    if which == "last":
        return max(steps)
    if which == "best":
        best = ckpt.best_step()
        if best is None:
            log.warning("%s ranks no checkpoint by metric; using the last step %d", directory, max(steps))
            return max(steps)
        return best
    try:
        step = int(which)
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint={which!r} is not best, last or a step number") from None
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory} (found: {sorted(steps)}); pick one")
    return step


def load_run(workdir: str | os.PathLike, checkpoint: str | int = "best") -> LoadedRun:
    """Reload a run folder at a checkpoint: "best" (the best eval metric; the last step when the run
    ranked none), "last" or a step number. Needs the folder and the base weights config.yaml names."""
    if not (checkpoint in ("best", "last") or isinstance(checkpoint, (int, np.integer)) and not isinstance(
            checkpoint, bool) and checkpoint >= 0 or isinstance(checkpoint, str) and checkpoint.isdigit()):
        raise CheckpointError(f"checkpoint={checkpoint!r} is not best, last or a step number (a whole number >= 0); "
                              "pass one of those (--checkpoint on the command line)")
    workdir = Path(workdir)
    if not (workdir / rundir.CONFIG).is_file():
        raise LoadError(f"{workdir} is not a run folder (no {rundir.CONFIG}); pass the --workdir of a training run")
    cfg = load_config([str(workdir / rundir.CONFIG)])
    directory = workdir / rundir.CHECKPOINTS
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no {rundir.CHECKPOINTS}/; the run saved no checkpoint yet")
    spec = load_spec(workdir, cfg)
    quiet, log.disabled = log.disabled, True  # the head and adapters come from the checkpoint, not the base
    try:
        model, params, plan = load_model(cfg, spec.num_labels)
    except LoadError as e:
        raise LoadError(f"the base model of {workdir} (model.name={cfg.model.name}) is not available: {e}") from None
    finally:
        log.disabled = quiet
    tokenizer = hf.load_tokenizer(workdir / TOKENIZER if (workdir / TOKENIZER).is_dir() else cfg.model.name)
    trainable, frozen = plan.split(params)
    tx = optimizer.make_optimizer(plan, cfg.train, 1)
    template = jax.eval_shape(lambda t: steps.init_state(t, tx, cfg.train.seed), trainable)
    with Checkpointer(directory, fingerprint=fingerprint(frozen, plan.labels, model_name=cfg.model.name),
                      keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                      best_metric=cfg.train.best_metric or main_metric(spec)) as ckpt:
        step = _pick_step(ckpt, checkpoint, directory)
        try:
            state, _ = ckpt.restore(template, step=step)
        except CheckpointError as e:  # the trainer's fix (a new --workdir) does not apply to a finished run
            if "different base model" not in str(e):
                raise
            raise CheckpointError(f"{directory} was trained on other base weights than those now in model.name="
                                  f"{cfg.model.name} ({rundir.CONFIG}); put the original weights back there, or set "
                                  f"model.name in {workdir / rundir.CONFIG} to a folder that holds them") from None
    restored = jax.tree.map(lambda x: jnp.asarray(x), state.trainable)
    params = masking.join(restored, frozen)
    done = results.read(workdir) if (workdir / rundir.RESULTS).is_file() else None
    return LoadedRun(workdir, cfg, spec, tokenizer, model, params, plan, step, done)

