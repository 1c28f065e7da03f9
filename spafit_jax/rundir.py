"""The run folder: where a run's config, metrics, checkpoints and results live.

`<workdir>/config.yaml` (the resolved config), `metrics.jsonl` and `tensorboard/` (written by
process 0 through `MetricsWriter`), `checkpoints/` (Orbax, see `checkpoint`) and `results.json`
(the summary, written last, atomically). A folder with `results.json` holds a finished run;
`--overwrite` moves it to `.overwritten-<time>/` until the new run has written a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

from spafit_jax import config as config_lib
from spafit_jax.errors import ConfigError, SpafitError

log = logging.getLogger("spafit_jax")

CONFIG, METRICS, RESULTS, TENSORBOARD, CHECKPOINTS, LOCK = (
    "config.yaml", "metrics.jsonl", "results.json", "tensorboard", "checkpoints", ".lock")
TOKENIZER, TASK = "tokenizer", "task.json"  # what `run.save_assets` writes: the folder alone reloads the run
ERROR = "error.txt"  # the one-line error of an experiment cell that failed
OVERWRITTEN = ".overwritten-"  # + time: a finished run replaced by --overwrite, until the new one has a checkpoint


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


def choose(workdir: str | os.PathLike | None, cfg: config_lib.Config, *, overwrite: bool, processes: int) -> Path:
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


class Lock:
    """`with Lock(workdir, enabled=...)`: `<workdir>/.lock` holds {"host", "boot", "pid"} of the one
    process (process 0) that runs in the folder, from before anything is written to the end
    (exceptions included). A lock of this host whose process is gone, or that was taken before
    the host last booted, is stale and taken over with a warning; any other lock is a WorkdirError
    naming its holder. The host is `$SPAFIT_LOCK_HOST` when set (tpu_scripts/launch.sh sets the
    TPU node and worker, which outlive a preempted and re-created VM), else the host name. A
    folder that the lock created and that is still empty at the end is removed again.
    """

    def __init__(self, workdir: Path, *, enabled: bool):
        self.workdir, self.enabled, self.path = Path(workdir), enabled, Path(workdir) / LOCK
        self.me = {"host": os.environ.get("SPAFIT_LOCK_HOST") or socket.gethostname(), "boot": _boot_id(),
                   "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.created = False

    def __enter__(self) -> Lock:
        if not self.enabled:
            return self
        self.created = not self.workdir.exists()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._take_over(self._holder())
                    continue
                try:
                    with naming(self.path), os.fdopen(fd, "w") as f:
                        json.dump(self.me, f)
                except OSError:
                    self.path.unlink(missing_ok=True)  # a full disk: leave no empty lock behind
                    raise
                return self
        except OSError as e:
            raise WorkdirError(f"cannot use {self.workdir} as the run folder: {describe_os_error(e)}") from None
        raise WorkdirError(f"{self.workdir}: another run keeps taking {self.path}; run one at a time")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _take_over(self, holder: dict | None) -> None:
        """Removes a stale lock; raises WorkdirError for a live (or unknown) holder."""
        if holder is None:  # being written just now, or damaged: stale only once it is old
            try:
                if time.time() - self.path.stat().st_mtime < 10:
                    raise WorkdirError(f"{self.workdir} is being taken by another run ({self.path}); run one at a time")
            except FileNotFoundError:
                return
            log.warning("%s: removing an unreadable lock file", self.path)
        elif holder.get("host") != self.me["host"] or (_alive(holder["pid"]) and not _rebooted(holder, self.me)):
            raise WorkdirError(
                f"{self.workdir} is in use by pid {holder['pid']} on {holder.get('host')} (since {holder.get('since')}); "
                f"wait for that run to end, use another --workdir, or delete {self.path} if that run is gone")
        else:
            log.warning("%s: taking over the stale lock of pid %d on %s (%s)", self.path, holder["pid"],
                        holder.get("host"), "taken before this machine booted" if _rebooted(holder, self.me)
                        else "that process is gone")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc_info) -> None:
        if not self.enabled or self._holder() != self.me:
            return
        self.path.unlink(missing_ok=True)
        if self.created and not any(self.workdir.iterdir()):
            self.workdir.rmdir()  # nothing was written: leave no trace


def _boot_id() -> str | None:
    """This boot of this machine (Linux), so a lock from before a reboot or a re-created VM is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _rebooted(holder: dict, me: dict) -> bool:
    """Whether the holder's lock was taken before this machine's current boot (both boots known)."""
    return None not in (holder.get("boot"), me["boot"]) and holder.get("boot") != me["boot"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def check_resume_settings(workdir: Path, cfg: config_lib.Config) -> None:
    """Refuses (writing nothing) a resume whose config forms batches otherwise than the run's config.yaml:
    the batch order and shapes must stay those of the steps already taken."""
    import yaml

    try:
        saved = yaml.safe_load((workdir / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # no readable config.yaml: nothing recorded to hold the resume to
    data = saved.get("data") if isinstance(saved, dict) else None
    data = data if isinstance(data, dict) else {}
    fmt = lambda v: config_lib.format_value(list(v) if isinstance(v, tuple) else v)  # noqa: E731
    changed = [(f"data.{key}", fmt(data.get(key, before)), fmt(getattr(cfg.data, key)))
               for key, before in BATCH_FIELDS.items() if fmt(data.get(key, before)) != fmt(getattr(cfg.data, key))]
    if changed:
        was, now = (", ".join(f"{c[0]}={c[i]}" for c in changed) for i in (1, 2))
        fix = " ".join(f"{c[0]}={c[1].replace(' ', '')}" for c in changed)
        raise ConfigError(f"{workdir} was trained with {was} ({workdir / CONFIG}), but this resume sets {now}, which "
                          f"forms other batches; resume with {fix}, or train in a new --workdir",
                          changed[0][0].split(".", 1)[1])


def save_config(workdir: Path, cfg: config_lib.Config) -> Path:
    """config.yaml, written atomically once the run is accepted (a refused resume keeps the old one)."""
    path = workdir / CONFIG
    write_atomic(path, config_lib.config_yaml(cfg, path))
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


def write_results(workdir: Path, results: dict) -> Path:
    """results.json, written atomically (a crash leaves the old file or none)."""
    path = workdir / RESULTS
    write_atomic(path, json.dumps(finite_json(results), indent=2, allow_nan=False))
    return path


def write_atomic(path: Path, text: str, *, per_process: bool = False) -> None:
    """`path` holds `text` or what it held before (a full disk leaves no half file, and no tmp file).

    `per_process`: the temporary file is named after this host and process, for files that several
    processes (shards on one mounted folder) may write at once; the last rename wins.
    """
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp" if per_process
                         else path.name + ".tmp")
    try:
        with naming(tmp), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):  # e.g. the folder is gone: report the first error
            tmp.unlink(missing_ok=True)
        raise


class MetricsWriter:
    """metrics.jsonl and TensorBoard events, written by process 0 only (`enabled`).

    Opening drops the records logged after `resume_step` (a run resumed from that checkpoint
    logs them again) and a torn last line (what a crash or a full disk leaves), with a warning.
    An eval record of a step and split already kept is not written again (resuming from the
    final checkpoint re-runs the same final evaluation), so no record is ever duplicated.
    """

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter

        path = workdir / METRICS
        self.path, self.evals = path, set()
        if path.exists():
            kept = [(line, r) for line, r in read_metrics(path) if r["step"] <= resume_step]
            write_atomic(path, "".join(line + "\n" for line, _ in kept))
            self.evals = {(r["step"], r.get("split")) for _, r in kept if r.get("kind") == "eval"}
        with naming(path):
            self.jsonl = open(path, "a", encoding="utf-8")
        # Events are written in this thread (tensorboardX's EventsWriter, not SummaryWriter, whose
        # background thread dies on a full disk and then blocks the trainer for ever).
        with naming(workdir / TENSORBOARD):
            (workdir / TENSORBOARD).mkdir(exist_ok=True)
            self.tb = EventsWriter(str(workdir / TENSORBOARD / "events"))
        self.tb_path = Path(self.tb._file_name)  # events.out.tfevents.<time>.<host>, named in errors

    def write(self, record: dict) -> None:
        """Appends one record (a dict with "step") to metrics.jsonl and its numbers to TensorBoard."""
        if not self.enabled:
            return
        if record.get("kind") == "eval" and (record["step"], record.get("split")) in self.evals:
            return
        record = finite_json(record)  # NaN / inf as null: every line stays valid JSON
        with naming(self.path):  # a full disk: the caller stops; a torn line is dropped on resume
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self.jsonl.flush()
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        prefix = "/".join(str(record[k]) for k in ("kind", "split") if k in record) or "train"
        with naming(self.tb_path):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    summary = scalar(f"{prefix}/{key}", float(value))
                    self.tb.write_event(Event(wall_time=time.time(), step=record["step"], summary=summary))
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            try:
                with naming(self.tb_path):
                    self.tb.close()
            finally:
                with naming(self.path):
                    self.jsonl.close()


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each record of a metrics.jsonl. A torn last line is dropped with a
    warning; any other line that is not a JSON object with an integer "step" is a WorkdirError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise WorkdirError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); move it aside to "
                           "start the log afresh") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    out = []
    for i, line in numbered:
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            out.append((line, record))
        elif i == numbered[-1][0]:
            log.warning("%s: dropping the torn last line %d (a crash or a full disk cut it short): %.60r",
                        path, i, line)
        else:
            raise WorkdirError(f"{path} line {i} is not a metrics record ({line[:60]!r}); fix or delete that "
                               "line, or move the file aside")
    return out
