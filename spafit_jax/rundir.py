"""The run folder: its file names, which folder a run uses, what a resume must keep, atomic writes.

`<workdir>/config.yaml` (the resolved config), `metrics.jsonl` and `tensorboard/` (written by
process 0 through `metricslog.MetricsWriter`), `checkpoints/` (Orbax, see `checkpoint`) and
`results.json` (`results.Results`, written last, atomically); `.lock` (`runlock.Lock`) while a run
is in it. A folder with `results.json` holds a finished run; `--overwrite` moves it to
`.overwritten-<time>/` until the new run has written a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
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

from spafit_jax.config import Config, config_yaml, format_value
from spafit_jax.errors import ConfigError, SpafitError

log = logging.getLogger("spafit_jax")

CONFIG, METRICS, RESULTS, TENSORBOARD, CHECKPOINTS, LOCK = (
    "config.yaml", "metrics.jsonl", "results.json", "tensorboard", "checkpoints", ".lock")
TOKENIZER, TASK = "tokenizer", "task.json"  # what `run.save_assets` writes: the folder alone reloads the run
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


#: the fields that decide how batches are formed, with their value in a config.yaml written before the field
#: existed or before its default changed (group_by_length and max_shapes became defaults in one change).
BATCH_FIELDS = {"padding": "bucket", "buckets": None, "bucket_multiple": None, "max_shapes": None,
                "group_by_length": False}


def check_resume_settings(workdir: Path, cfg: Config) -> None:
    """Refuses (writing nothing) a resume whose config forms batches otherwise than the run's config.yaml:
    the batch order and shapes must stay those of the steps already taken."""
    import yaml

    try:
        saved = yaml.safe_load((workdir / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # no readable config.yaml: nothing recorded to hold the resume to
    data = saved.get("data") if isinstance(saved, dict) else None
    data = data if isinstance(data, dict) else {}
    fmt = lambda v: format_value(list(v) if isinstance(v, tuple) else v)  # noqa: E731
    changed = [(f"data.{key}", fmt(data.get(key, before)), fmt(getattr(cfg.data, key)))
               for key, before in BATCH_FIELDS.items() if fmt(data.get(key, before)) != fmt(getattr(cfg.data, key))]
    if changed:
        was, now = (", ".join(f"{c[0]}={c[i]}" for c in changed) for i in (1, 2))
        fix = " ".join(f"{c[0]}={c[1].replace(' ', '')}" for c in changed)
        raise ConfigError(f"{workdir} was trained with {was} ({workdir / CONFIG}), but this resume sets {now}, which "
                          f"forms other batches; resume with {fix}, or train in a new --workdir",
                          changed[0][0].split(".", 1)[1])


def save_config(workdir: Path, cfg: Config) -> Path:
    """config.yaml, written atomically once the run is accepted (a refused resume keeps the old one)."""
    path = workdir / CONFIG
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


def write_atomic(path: Path, text: str | Callable[[IO[str]], None], *, per_process: bool = False,
                 newline: str | None = None) -> None:
    """`path` holds `text` or what it held before (a full disk leaves no half file, and no tmp file).

    `text` is the whole content, or a function that writes it to the open temporary file (opened with
    `newline`, as `open` takes it). `per_process`: the temporary file is named after this host and
    process, for files that several processes (shards on one mounted folder) may write at once; the
    last rename wins. The one atomic file write of the package (`outputs.write_file` adds its errors).
    """
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp" if per_process
                         else path.name + ".tmp")
    try:
        with naming(tmp), open(tmp, "w", encoding="utf-8", newline=newline) as f:
            if callable(text):
                text(f)
            else:
                f.write(text)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):  # e.g. the folder is gone: report the first error
            tmp.unlink(missing_ok=True)
        raise
