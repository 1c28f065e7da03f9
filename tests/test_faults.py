"""Hostile cases for the trainer (issue 10): divergence, torn logs, a second run on one workdir,
bad settings caught before anything is written. Each asserts the exit status, a one-line error
without a traceback, and what is left in the workdir."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spafit_jax.training import metricslog, rundir, runlock
from spafit_jax.train import main
from tests.parallel_worker import signal_after_records

ROOT = Path(__file__).resolve().parents[1]


def small(model_dir, *extra):
    return [f"model.name={model_dir}", "data.limit_train=16", "data.limit_eval=8", "data.max_length=32",
            "train.batch_size=8", "train.eval_batch_size=8", "train.max_steps=2", "method.n1=1", "method.n2=2",
            "train.log_every=1", *extra]


def one_error_line(err: str) -> str:
    """The error line of `err`; asserts it is the only one and that there is no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def restore_latest(workdir):
    """The TrainState of the newest checkpoint in `workdir`, restored as a resume would."""
    from spafit_jax.training import checkpoint, loading, optimizer, steps
    from spafit_jax.config import files as config_lib

    cfg = config_lib.load_config([str(Path(workdir) / "config.yaml")])
    loaded = loading.load_for_training(cfg)
    trainable, frozen = loaded.plan.split(loaded.params)
    tx = optimizer.make_optimizer(loaded.plan, cfg.train, cfg.train.max_steps)
    fp = checkpoint.fingerprint(frozen, loaded.plan.labels, model_name=cfg.model.name)
    with checkpoint.Checkpointer(Path(workdir) / "checkpoints", fingerprint=fp, keep=2, keep_best=False,
                                 best_metric="accuracy") as ck:
        return ck.restore(steps.init_state(trainable, tx, 0))[0]


DIVERGE = ["method.name=full", "train.lr=1e30", "train.max_grad_norm=null", "train.epochs=10"]


def test_divergence_stops_with_one_line_and_no_nan_reaches_params_or_disk(tiny_model_dir, tmp_path, capsys):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, *DIVERGE, "train.max_steps=12",
                                                "train.max_bad_steps=3", "checkpoint.every=1")]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "diverged" in line and "3 steps in a row" in line and "train.max_bad_steps" in line
    assert not (tmp_path / "results.json").exists() and not (tmp_path / rundir.LOCK).exists()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    recs = records(tmp_path)  # strict JSON: non-finite numbers are null
    assert recs[-1]["kind"] == "diverged" and recs[-1]["bad_steps"] == 3
    train = [r for r in recs if "loss" in r]
    assert train[0]["loss"] is not None and train[-1]["loss"] is None and train[-1]["bad_steps"] >= 2
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < recs[-1]["step"]  # nothing saved once the limit was reached
    import jax

    leaves = jax.tree_util.tree_leaves(restore_latest(tmp_path).trainable)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_divergence_under_pmap_is_the_same_error(tiny_model_dir, tmp_path, capsys):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, *DIVERGE, "train.max_steps=8",
                                                "train.max_bad_steps=2", "parallel.mode=pmap")]
    assert main(args) == 2
    assert "diverged" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "results.json").exists() and records(tmp_path)[-1]["kind"] == "diverged"


def test_a_few_bad_steps_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys):
    """max_bad_steps above the run length: the run finishes, its parameters finite, bad steps counted."""
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, *DIVERGE, "train.max_steps=5",
                                                "train.max_bad_steps=100")]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["bad_steps"] >= 1 and records(tmp_path)[-1]["kind"] == "eval"
    assert all(v is None or math.isfinite(v) for v in res["eval"].values())


def write_log(workdir, *lines):
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_metrics_log_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    write_log(tmp_path, '{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}', '{"step": 3, "lo')
    writer = metricslog.MetricsWriter(tmp_path, enabled=True, resume_step=2)
    writer.write({"step": 3, "loss": float("nan")})
    writer.close()
    assert "torn last line 3" in caplog.text
    assert records(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": None}]


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "NaN", '["step", 2]', '{"loss": 1.0}'])
def test_metrics_log_damaged_inside_is_one_line_naming_file_and_line(tmp_path, bad):
    write_log(tmp_path, '{"step": 1}', bad, '{"step": 3}')
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(rundir.WorkdirError) as e:
        metricslog.MetricsWriter(tmp_path, enabled=True, resume_step=3)
    msg = str(e.value)
    assert "metrics.jsonl line 2" in msg and "\n" not in msg
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost


def test_resume_over_a_torn_log_finishes_and_the_log_is_valid(tiny_model_dir, tmp_path, capsys):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=4", "train.epochs=10", "checkpoint.every=2")]
    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    train_and_evaluate(config_lib.load_config([], args[2:]), tmp_path, stop_after=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a crash mid-write
    assert main(args) == 0
    steps = [r["step"] for r in records(tmp_path) if "kind" not in r]
    assert steps == [1, 2, 3, 4]
    assert "Traceback" not in capsys.readouterr().err


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_held_during_the_run_and_released_on_exit_and_on_errors(tmp_path):
    work = tmp_path / "run"
    with runlock.Lock(work, enabled=True):
        held = json.loads((work / rundir.LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        (work / "kept").write_text("x")
    assert not (work / rundir.LOCK).exists() and (work / "kept").exists()
    with pytest.raises(ValueError):
        with runlock.Lock(work, enabled=True):
            raise ValueError("boom")
    assert not (work / rundir.LOCK).exists()
    with runlock.Lock(tmp_path / "empty", enabled=True):
        pass
    assert not (tmp_path / "empty").exists()  # created by the lock, nothing written: removed
    with runlock.Lock(tmp_path / "other", enabled=False):
        assert not (tmp_path / "other").exists()  # processes other than 0 take no lock


def test_a_second_run_on_a_workdir_in_use_fails_at_once_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01 00:00:00"}
        (tmp_path / rundir.LOCK).write_text(json.dumps(lock))
        t0 = time.time()
        assert main(["--workdir", str(tmp_path), *small(tiny_model_dir)]) == 2
        assert time.time() - t0 < 10  # at once: before the model and the data are loaded
        line = one_error_line(capsys.readouterr().err)
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in line and rundir.LOCK in line
        assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK]  # nothing written
        assert json.loads((tmp_path / rundir.LOCK).read_text()) == lock  # the holder's lock is kept
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_on_another_host_is_never_taken_over(tmp_path):
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": "elsewhere-0", "pid": dead_pid()}))
    with pytest.raises(rundir.WorkdirError, match="on elsewhere-0"):
        with runlock.Lock(tmp_path, enabled=True):
            pass


def test_a_lock_from_before_a_reboot_or_from_a_recreated_vm_is_stale(tmp_path, monkeypatch, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live pid, reused
    try:
        monkeypatch.setenv("SPAFIT_LOCK_HOST", "tpu:sst2-spafit:worker0")
        lock = {"host": "tpu:sst2-spafit:worker0", "boot": "an-earlier-boot", "pid": holder.pid}
        (tmp_path / rundir.LOCK).write_text(json.dumps(lock))
        with runlock.Lock(tmp_path, enabled=True):
            assert json.loads((tmp_path / rundir.LOCK).read_text())["host"] == "tpu:sst2-spafit:worker0"
        assert "stale lock" in caplog.text
        (tmp_path / rundir.LOCK).write_text(json.dumps({**lock, "boot": runlock._boot_id()}))  # this boot: live
        with pytest.raises(rundir.WorkdirError, match=f"in use by pid {holder.pid}"):
            with runlock.Lock(tmp_path, enabled=True):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_url_workdir_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--workdir", "gs://bucket/runs/x", *small(tiny_model_dir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is a URL" in line and "gcsfuse" in line and list(tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_model_dir, tmp_path, capsys, caplog):
    pid = dead_pid()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir)]) == 0
    assert f"stale lock of pid {pid}" in caplog.text
    assert (tmp_path / "results.json").exists() and not (tmp_path / rundir.LOCK).exists()


def test_an_unusable_workdir_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["--workdir", str(tmp_path / "file"), *small(tiny_model_dir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot use" in line and "file" in line
    assert (tmp_path / "file").read_text() == "not a folder"


def test_max_length_above_the_model_positions_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "run"
    assert main(["--workdir", str(work), *small(tiny_model_dir, "data.max_length=256")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data.max_length=256" in line and "max_position_embeddings" in line and "128" in line
    assert not work.exists()


def test_ctrl_c_saves_a_checkpoint_and_exits_130_honestly(tiny_model_dir, tmp_path):
    rc, err = signal_after_records(tmp_path, small(tiny_model_dir, "train.max_steps=400", "train.epochs=100"),
                                   signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 3 and not (tmp_path / "results.json").exists()
    assert not (tmp_path / rundir.LOCK).exists()


def test_an_unreadable_newest_checkpoint_falls_back_to_the_newest_readable_one(tiny_model_dir, tmp_path, capsys,
                                                                            caplog):
    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    extra = ("train.max_steps=6", "train.epochs=10", "checkpoint.every=2", "checkpoint.keep=3")
    cfg = config_lib.load_config([], small(tiny_model_dir, *extra))
    assert train_and_evaluate(cfg, tmp_path, stop_after=4).step == 4
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, *extra)]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert "checkpoints/4" in warning and "step 2" in warning
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 6
    train_steps = [r["step"] for r in records(tmp_path) if "kind" not in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 logged again after resuming from 2, once each


@pytest.mark.parametrize("content,expect", [
    (b"text,label\na,0\nb,1\nc,pos\n", "row 3: label 'pos' is a class name"),
    (b"text,label\na,0\nb,NaN\nc,1\n", "row 2: missing label ('NaN')"),
    (b"text,label\na,0\ncaf\xe9,1\nc,1\n", "line 3: bytes b'\\xe9"),
])
def test_bad_data_is_one_line_naming_the_file_and_nothing_is_written(tiny_model_dir, tmp_path, capsys, content,
                                                                     expect):
    f = tmp_path / "d.csv"
    f.write_bytes(content)
    work = tmp_path / "run"
    args = ["--workdir", str(work), *small(tiny_model_dir, "data.task=local", f"data.train_file={f}",
                                           f"data.eval_file={f}", "data.limit_train=null", "data.limit_eval=null")]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{f} {expect}" in line
    assert not work.exists()


def snapshot(workdir):
    """{relative path: bytes} of every file under `workdir`: what "nothing lost, nothing written" compares."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(Path(workdir).rglob("*")) if p.is_file()}


def test_resume_with_max_steps_below_the_checkpoint_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    extra = ("train.max_steps=6", "train.epochs=10")
    assert train_and_evaluate(config_lib.load_config([], small(tiny_model_dir, *extra)), tmp_path,
                              stop_after=3).step == 3
    before = snapshot(tmp_path)
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, "train.epochs=10")]) == 2  # max_steps=2
    line = one_error_line(capsys.readouterr().err)
    assert "is at step 3, past train.max_steps=2; raise train.max_steps or use a new --workdir" in line
    assert snapshot(tmp_path) == before
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=null", "train.epochs=1")]) == 2
    assert "past the 2 steps of train.epochs=1; raise train.epochs" in one_error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def disk_full_after(monkeypatch, name, writes):
    """Makes the writes of `rundir` (atomic files) and `metricslog` (metrics.jsonl) to files named `name` fail
    with ENOSPC after `writes` writes (the failing write lands half its text, as a full disk would)."""
    import builtins
    import errno

    count = [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            count[0] += 1
            if count[0] > writes:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        return Full(f) if Path(path).name == name else f

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    monkeypatch.setattr(metricslog, "open", fake_open, raising=False)


def test_a_full_disk_while_logging_is_one_line_keeps_the_checkpoint_and_a_rerun_resumes(
        tiny_model_dir, tmp_path, capsys, monkeypatch, caplog):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=4", "train.epochs=10",
                                                "checkpoint.every=2")]
    disk_full_after(monkeypatch, "metrics.jsonl", 3)  # steps 1 and 2 and epoch 1 logged; step 3 fails
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'metrics.jsonl'}: No space left on device; free disk space" in line and "resumes" in line
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / rundir.LOCK).exists()
    assert not (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # torn, as a full disk leaves it
    monkeypatch.undo()
    assert main(args) == 0
    assert "resuming from step 2" in caplog.text and "torn last line" in caplog.text
    assert [r["step"] for r in records(tmp_path) if "kind" not in r] == [1, 2, 3, 4]


def test_a_full_disk_while_writing_tensorboard_events_is_one_line_not_a_hang_and_a_rerun_resumes(
        tiny_model_dir, tmp_path, capsys, monkeypatch, caplog):
    import errno

    import tensorboardX.record_writer as record_writer

    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=4", "train.epochs=10",
                                                "checkpoint.every=2")]

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if (tmp_path / "checkpoints" / "2").exists():  # the disk fills up after the checkpoint of step 2
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    real_open = record_writer.open_file
    monkeypatch.setattr(record_writer, "open_file", lambda path: Full(real_open(path)))
    assert main(args) == 2  # tensorboardX's background thread used to die here and block the trainer for ever
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'tensorboard'}/events.out.tfevents." in line and "No space left on device" in line
    assert not (tmp_path / "results.json").exists() and not (tmp_path / rundir.LOCK).exists()
    monkeypatch.undo()
    assert main(args) == 0
    assert "resuming from step" in caplog.text
    assert [r["step"] for r in records(tmp_path) if "kind" not in r] == [1, 2, 3, 4]


def test_a_full_disk_while_writing_results_keeps_the_final_checkpoint_and_a_rerun_finishes(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir)]
    disk_full_after(monkeypatch, "results.json.tmp", 0)
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "results.json.tmp: No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "task.json", "tensorboard", "tokenizer"]  # no half file
    assert "2" in [p.name for p in (tmp_path / "checkpoints").iterdir()]
    monkeypatch.undo()
    assert main(args) == 0
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
    evals = [r for r in records(tmp_path) if r.get("kind") == "eval"]
    assert len(evals) == 1  # the final eval is logged once across the crash


def test_an_unwritable_workdir_file_is_one_line_naming_the_path(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").mkdir()  # a folder where the log goes: IsADirectoryError at open
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "metrics.jsonl") in line and "Is a directory" in line
    assert not (tmp_path / rundir.LOCK).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs. Skipped where the test cannot mount one, except in CI (SPAFIT_REQUIRE_REFERENCE=1,
    root on a machine like the developers'), where that is a failure: no silent skip there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mount.returncode:
        if os.environ.get("SPAFIT_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {mount.stderr.strip()}")
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_really_full_disk_is_one_line_keeps_the_checkpoint_and_a_rerun_resumes(tiny_model_dir, small_disk,
                                                                                 capsys, caplog):
    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    work = small_disk / "run"
    extra = ("train.max_steps=6", "train.epochs=10", "checkpoint.every=1")
    train_and_evaluate(config_lib.load_config([], small(tiny_model_dir, *extra)), work, stop_after=2)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    for size in (1 << 16, 1):  # fill the disk to the last byte
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
    os.close(fd)
    args = ["--workdir", str(work), *small(tiny_model_dir, *extra)]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line or "free disk space" in line, line
    assert not (work / rundir.LOCK).exists() and not (work / "results.json").exists()
    filler.unlink()
    caplog.clear()
    assert main(args) == 0
    assert "resuming from step 2" in caplog.text
    assert [r["step"] for r in records(work) if "kind" not in r] == [1, 2, 3, 4, 5, 6]


def test_overwrite_moves_the_old_run_aside_and_deletes_it_only_after_the_first_new_checkpoint(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    from spafit_jax.training import checkpoint

    args = ["--workdir", str(tmp_path), *small(tiny_model_dir)]
    assert main(args) == 0
    old = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("tensorboard")}
    # a new run that fails before its first checkpoint (diverged at step 2): the old run is all kept, aside
    assert main([*args, *DIVERGE, "train.max_bad_steps=1", "--overwrite"]) == 2
    assert "diverged" in one_error_line(capsys.readouterr().err)
    [aside] = tmp_path.glob(".overwritten-*")
    assert {k: v for k, v in snapshot(aside).items() if not k.startswith("tensorboard")} == old
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    seen = []  # whether the old run is still aside when the new run saves a checkpoint
    save = checkpoint.Checkpointer.save
    monkeypatch.setattr(checkpoint.Checkpointer, "save",
                        lambda self, *a, **k: seen.append(aside.exists()) or save(self, *a, **k))
    assert main(args) == 0
    assert seen[0] and not aside.exists() and not list(tmp_path.glob(".overwritten-*"))
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
