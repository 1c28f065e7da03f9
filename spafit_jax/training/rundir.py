"""The run folder: its file names, which folder a run uses, what a resume must keep, atomic writes.

`<workdir>/config.yaml` (the resolved config), `metrics.jsonl` and `tensorboard/` (written by
process 0 through `metricslog.MetricsWriter`), `checkpoints/` (Orbax, see `checkpoint`) and
`results.json` (`results.Results`, written last, atomically); `.lock` (`runlock.Lock`) while a run
is in it. A folder with `results.json` holds a finished run; `--overwrite` moves it to
`.overwritten-<time>/` until the new run has written a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from spafit_jax.config.files import Config, config_yaml, format_value
from spafit_jax.errors import ConfigError, SpafitError

log = logging.getLogger("spafit_jax")

CONFIG, METRICS, RESULTS, TENSORBOARD, CHECKPOINTS, LOCK = (
    "config.yaml", "metrics.jsonl", "results.json", "tensorboard", "checkpoints", ".lock")
TOKENIZER, TASK = "tokenizer", "task.json"  # what `save_assets` writes: the folder alone reloads the run
ERROR = "error.txt"  # the one-line error of an experiment cell that failed
OVERWRITTEN = ".overwritten-"  # + time: a finished run replaced by --overwrite, until the new one has a checkpoint
CHANGES = "changes.jsonl"  # append-only: each setting a resume changed, with the step it took effect
#: what the trainer writes in a run folder: its own files (whether or not they exist yet) and its own folders
#: (with `OVERWRITTEN` ones); no other command writes there (`outputs.run_places`)
OWN_FILES = (CONFIG, METRICS, RESULTS, TASK, ERROR, LOCK, CHANGES)
OWN_FOLDERS = (CHECKPOINTS, TOKENIZER, TENSORBOARD)


class WorkdirError(SpafitError):
    """The run folder cannot be used as it is (a damaged log, a run already in it)."""


@contextlib.contextmanager
def naming(path: Path):
    """Re-raises an OSError that names no file (a failed write or flush) as one naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that reached the top level: the path, what happened, what to do."""
    what = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = ("free disk space (or use a --workdir on another disk), then re-run the same command: it resumes "
               "from the last checkpoint")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable or choose another --workdir"
    else:
        fix = "check the path and its disk, then re-run the same command (it resumes from the last checkpoint)"
    path = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
    return f"{path}: {what}; {fix}" if path else f"{what} ({e}); {fix}"


def choose(workdir: str | os.PathLike | None, cfg: Config, *, overwrite: bool, processes: int) -> Path:
    """The run folder: `workdir`, or runs/<task>-<method>-<time> on one host. Writes nothing.

    Raises ConfigError for a folder holding a finished run without `overwrite`, and for a
    multi-host run without an explicit folder.
    """
    if workdir is None:
        if processes > 1:
            raise ConfigError("multi-host runs need an explicit --workdir shared by all processes")
        workdir = Path("runs") / f"{cfg.data.task}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    text = os.fspath(workdir)
    if not str(text).strip():
        raise ConfigError("--workdir is empty; name a folder, or leave --workdir out for runs/<task>-<method>-<time>")
    if any(ord(c) < 32 or ord(c) == 127 for c in str(text)):
        raise ConfigError(f"--workdir {str(text)!r} holds a control character (a pasted newline or tab?); "
                          "name the folder without it")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(text)):
        raise ConfigError(f"--workdir {text} is a URL, but the run folder must be a local or mounted path; mount "
                          "the bucket (gcsfuse; tpu_scripts/launch.sh does it for gs:// workdirs) and pass the mount")
    workdir = Path(workdir)
    if (workdir / RESULTS).exists() and not overwrite:
        raise ConfigError(f"{workdir} holds a finished run ({RESULTS}); pass --overwrite to replace it "
                          "or choose another --workdir")
    return workdir


def prepare(workdir: Path, *, lead: bool) -> None:
    """Creates the folder. A finished run in it (allowed by `choose`: --overwrite) is moved aside
    to `<workdir>/.overwritten-<time>/`, whole, and deleted by `discard_overwritten` only once
    the new run has written its first checkpoint: until then a failed new run loses nothing."""
    if lead and (workdir / RESULTS).exists():

        aside = workdir / f"{OVERWRITTEN}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        with naming(aside):
            aside.mkdir()
            for name in (RESULTS, CHECKPOINTS, METRICS, TENSORBOARD, CONFIG, TASK, TOKENIZER):
                if (workdir / name).exists():
                    os.replace(workdir / name, aside / name)
        log.warning("--overwrite: moved the finished run to %s; it is deleted once this run has written its first "
                    "checkpoint", aside)
    workdir.mkdir(parents=True, exist_ok=True)


def discard_overwritten(workdir: Path) -> None:
    """Deletes the runs `prepare` moved aside once `<workdir>/checkpoints` holds a finished step."""
    asides = [p for p in Path(workdir).glob(OVERWRITTEN + "*") if p.is_dir()]
    ckpts = Path(workdir) / CHECKPOINTS
    if asides and ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
        for aside in asides:
            shutil.rmtree(aside)


def check_resume_step(step: int, total_steps: int, train_cfg, checkpoints: Path) -> None:
    """Refuses (writing nothing) a resume whose checkpoint is past the run's last step."""
    if step <= total_steps:
        return
    if train_cfg.max_steps is not None and train_cfg.max_steps <= total_steps:
        limit, fix = f"train.max_steps={train_cfg.max_steps}", "raise train.max_steps"
    else:
        limit, fix = f"the {total_steps} steps of train.epochs={train_cfg.epochs:g}", "raise train.epochs"
    raise ConfigError(f"the checkpoint in {checkpoints} is at step {step}, past {limit}; {fix} or use a new "
                      "--workdir", "max_steps")


DEFAULT = object()  # in BATCH_FIELDS: a config.yaml without the field held the schema's default
#: the settings that decide which examples form which batch, in which order and shape ({dotted name: its value
#: in a config.yaml written before the field existed or its default changed; DEFAULT: the schema's default}).
#: A resume that changes one is refused (`check_resume_settings`). Add a field here when it decides batches.
BATCH_FIELDS = {
    "data.task": DEFAULT, "data.train_file": DEFAULT, "data.hf_path": DEFAULT, "data.hf_name": DEFAULT,
    "data.train_split": DEFAULT, "data.text_column": DEFAULT, "data.text_pair_column": DEFAULT,
    "data.label_column": DEFAULT, "data.num_labels": DEFAULT, "data.is_regression": DEFAULT, "data.encoding": DEFAULT,
    "data.limit_train": DEFAULT, "data.max_length": DEFAULT,
    "data.padding": "bucket", "data.buckets": None, "data.bucket_multiple": None, "data.max_shapes": None,
    "data.group_by_length": False, "data.packing": False, "data.max_segments": 16,
    "train.seed": DEFAULT, "train.batch_size": DEFAULT, "train.grad_accum": DEFAULT,
}
#: the settings that decide what the evaluations already logged (and the best checkpoint) mean: a resume that
#: changes one would rank checkpoints scored on other data or by another metric; refused the same way.
SCORE_FIELDS = {"data.eval_file": DEFAULT, "data.eval_splits": DEFAULT, "data.limit_eval": DEFAULT,
                "train.best_metric": DEFAULT}


def _saved(workdir: Path) -> dict | None:
    """The run's config.yaml as a mapping; None where it is missing or unreadable (nothing to hold a resume to)."""
    import yaml

    try:
        saved = yaml.safe_load((workdir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def _flat(tree: dict, prefix: str = "") -> dict:
    """{dotted name: value} of a config mapping (sections one level deep)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + str(key)] = value
    return out


def _fmt(value) -> str:
    return format_value(list(value) if isinstance(value, tuple) else value)


def _now(cfg: Config) -> dict:
    """{dotted name: value} of `cfg` as its config.yaml would hold it."""
    import yaml

    return _flat(yaml.safe_load(config_yaml(cfg, CONFIG)))


def _default(cfg: Config, name: str):
    import dataclasses

    section, key = name.split(".", 1)
    field = {f.name: f for f in dataclasses.fields(getattr(cfg, section))}[key]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def check_resume_settings(workdir: Path, cfg: Config) -> None:
    """Refuses (writing nothing) a resume whose config changes a setting of `BATCH_FIELDS` or `SCORE_FIELDS`
    from the run's config.yaml: the batches, their order and shapes, and what earlier evaluations scored
    must stay those of the steps already taken. One line names each field, its old and new value and the fix."""
    saved = _saved(workdir)
    if saved is None:
        return
    old, now = _flat(saved), _now(cfg)
    changed = []
    for name, before in {**BATCH_FIELDS, **SCORE_FIELDS}.items():
        if name not in now:
            continue
        was = old.get(name, _default(cfg, name) if before is DEFAULT else before)
        if _fmt(was) != _fmt(now[name]):
            changed.append((name, _fmt(was), _fmt(now[name])))
    if changed:
        was, new = (", ".join(f"{c[0]}={c[i]}" for c in changed) for i in (1, 2))
        fix = " ".join(f"{c[0]}={c[1].replace(' ', '')}" for c in changed)
        what = "forms other batches" if any(c[0] in BATCH_FIELDS for c in changed) else "scores otherwise"
        raise ConfigError(f"{workdir} was trained with {was} ({workdir / CONFIG}), but this resume sets {new}, which "
                          f"{what} than the steps already taken; resume with {fix}, or train in a new --workdir",
                          changed[0][0].split(".", 1)[1])


def resume_changes(workdir: Path, cfg: Config) -> list[tuple[str, object, object]]:
    """(dotted name, old value, new value) of each setting `cfg` changes from the run's config.yaml (the safe
    ones, once `check_resume_settings` has passed: e.g. train.max_steps, train.eval_every)."""
    saved = _saved(workdir)
    if saved is None:
        return []
    old, now = _flat(saved), _now(cfg)
    return [(k, old.get(k), v) for k, v in now.items() if _fmt(old.get(k)) != _fmt(v) and k in old]


def save_config(cfg: Config, path: str | os.PathLike, step: int | None = None) -> Path:
    """The resolved config as YAML (every field) at `path`, written atomically (the trainer's
    `<workdir>/config.yaml` once the run is accepted: a refused resume keeps the old one); `load_config([path]) == cfg`.
    On a resume from `step`, each setting it changes is first appended to the run folder's `CHANGES` with that step
    (JSON lines: step, field, old, new), so the folder says which value held for which steps."""
    import json

    path = Path(path)
    workdir = path.parent
    workdir.mkdir(parents=True, exist_ok=True)
    changes = resume_changes(workdir, cfg) if step is not None else []
    if changes:
        with naming(workdir / CHANGES), open(workdir / CHANGES, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, "field": k, "old": a, "new": b}, default=str) + "\n"
                            for k, a, b in changes))
        log.warning("resume from step %d changes %s (recorded in %s)", step,
                    ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, a, b in changes), workdir / CHANGES)
    write_atomic(path, config_yaml(cfg, path))
    return path


def finite_json(obj):
    """`obj` with every non-finite float replaced by None, so that it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_atomic(path: Path, text: str | bytes | Callable[[IO], None], *, per_process: bool = False,
                 newline: str | None = None, binary: bool = False) -> None:
    """`path` holds `text` or what it held before (a full disk leaves no half file, and no tmp file).

    `text` is the whole content (str, or bytes), or a function that writes it to the open temporary file
    (opened with `newline`, as `open` takes it; in binary mode with `binary`, e.g. for `np.savez`).
    `per_process`: the temporary file is named after this host and process, for files that several
    processes (shards on one mounted folder) may write at once; the last rename wins. The one atomic file
    write of the package (`outputs.write_file` adds its errors).
    """
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp" if per_process
                         else path.name + ".tmp")
    binary = binary or isinstance(text, bytes)
    try:
        with naming(tmp), (open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline=newline)) as f:
            if callable(text):
                text(f)
            else:
                f.write(text)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):  # e.g. the folder is gone: report the first error
            tmp.unlink(missing_ok=True)
        raise


def save_assets(workdir: str | os.PathLike, tokenizer, spec) -> None:
    """Writes the tokenizer files (`<workdir>/tokenizer/`) and the task spec (`<workdir>/task.json`),
    so that the run folder alone says how to read text and name labels. Call on process 0."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(workdir / TOKENIZER))
    write_atomic(workdir / TASK, json.dumps(dataclasses.asdict(spec), indent=2))
