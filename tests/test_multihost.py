"""Multi-host runs: 2 local processes x 2 CPU devices each (gloo collectives over loopback).

At the same time, in subprocesses:
  * reference: `python -m spafit_jax.train` on 1 process x 4 devices;
  * two processes share one workdir. First `train_and_evaluate(..., stop_after=2)` (through
    tests/parallel_worker.py) with parallel.mode=pmap: two steps, an evaluation at step 2
    gathered across the processes, a checkpoint written by both, then both stop as on a
    preemption. Then `python -m spafit_jax.train` with distributed.* settings and the
    default mesh driver on both: it resumes from that checkpoint (checkpoints do not depend
    on the driver) and finishes;
  * two processes train a long run; once they have logged two steps, process 1 is killed,
    and process 0 must exit with an error within a bounded time instead of hanging.
The two-process run must give the reference's losses, evaluations and final state to 1e-5,
and only process 0 writes logs and results.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.parallel_worker import (PYTHON, ROOT, Procs, assert_same_run, dropout_free_copy, env, free_ports, once,
                                   records, tail, tiny_run, train_losses)

pytestmark = pytest.mark.xdist_group("multihost")  # and `once` shares the runs if xdist splits the module
TIMEOUT = 600  # seconds for the whole module's subprocesses (a loaded 2-core machine; normally ~1-2 min)
HEARTBEAT = 10  # seconds without heartbeats after which a process counts as dead
DEATH_BOUND = 60  # seconds within which the survivor must exit
WORKER = str(ROOT / "tests" / "parallel_worker.py")


def distributed(port: int, process_id: int) -> list[str]:
    return ["distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2", f"distributed.process_id={process_id}",
            "distributed.initialization_timeout=300"]


def start_pair(procs, args_of, tmp, name, tokens):
    """Processes 0 and 1 of a 2 x 2-device run; args_of(process_id) -> the command."""
    return [procs.start(args_of(i), env(2, tokens), tmp / f"{name}.p{i}.txt") for i in range(2)]


def wait_all(procs, pair, deadline):
    return [procs.wait(p, deadline) for p in pair]


def run_all(tmp, model_dir):
    """Runs everything; writes the exit statuses and the death record to summary.json."""
    model = dropout_free_copy(model_dir, tmp / "tiny_no_dropout")
    tokens = tmp / "token_cache"
    base = tiny_run(model) + ["train.eval_every=2"]
    out = {}
    with Procs() as procs:
        deadline = time.monotonic() + TIMEOUT
        ref = procs.start([PYTHON, "-m", "spafit_jax.train", "--workdir", str(tmp / "ref"), *base], env(4, tokens),
                          tmp / "ref.txt")

        port, kill_port, resume_port = free_ports(3)
        first = start_pair(procs, lambda i: [PYTHON, WORKER, "train", "--stop-after", "2", "--workdir",
                                             str(tmp / "two"), *base, "parallel.mode=pmap", *distributed(port, i)],
                           tmp, "first", tokens)

        long_run = [o for o in base if not o.startswith("train.max_steps")] + ["train.max_steps=100000",
                                                                               "train.epochs=10000"]
        doomed = start_pair(procs, lambda i: [PYTHON, WORKER, "train", "--heartbeat-timeout", str(HEARTBEAT),
                                              "--workdir", str(tmp / "doomed"), *long_run,
                                              *distributed(kill_port, i)], tmp, "doomed", tokens)

        # Kill process 1 of the long run once process 0 has logged two steps.
        metrics = tmp / "doomed" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert all(p.poll() is None for p in doomed), tail(tmp / "doomed.p0.txt") + tail(tmp / "doomed.p1.txt")
            assert time.monotonic() < deadline, "the long two-process run logged no steps in time"
            time.sleep(0.2)
        os.kill(doomed[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = doomed[0].wait(timeout=DEATH_BOUND)
        except subprocess.TimeoutExpired:  # the hang this test looks for; Procs kills it
            rc = None
        out["death"] = {"rc": rc, "seconds": time.monotonic() - killed_at,
                        "output": (tmp / "doomed.p0.txt").read_text(errors="replace")}

        out["first"] = wait_all(procs, first, deadline)
        if out["first"] == [0, 0]:
            second = start_pair(procs, lambda i: [PYTHON, "-m", "spafit_jax.train", "--workdir", str(tmp / "two"),
                                                  *base, *distributed(resume_port, i)], tmp, "second", tokens)
            out["second"] = wait_all(procs, second, deadline)
        out["ref"] = procs.wait(ref, deadline)
    (tmp / "summary.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = once(tmp_path_factory, "multihost", lambda folder: run_all(folder, tiny_model_dir))
    return {"tmp": tmp, **json.loads((tmp / "summary.json").read_text())}


def outputs(runs, name):
    return [(runs["tmp"] / f"{name}.p{i}.txt").read_text(errors="replace") for i in range(2)]


def test_the_runs_finished(runs):
    assert runs["ref"] == 0, tail(runs["tmp"] / "ref.txt")
    assert runs["first"] == [0, 0], "\n".join(outputs(runs, "first"))[-6000:]
    assert runs.get("second") == [0, 0], "\n".join(outputs(runs, "second"))[-6000:]


def test_two_processes_match_one_process_with_four_devices(runs):
    test_the_runs_finished(runs)
    assert_same_run(runs["tmp"] / "two", runs["tmp"] / "ref")


def test_checkpoints_are_written_and_resumed_by_both_processes(runs):
    test_the_runs_finished(runs)
    first, second = outputs(runs, "first"), outputs(runs, "second")
    assert all("stopped at step 2" in o for o in first), first
    assert all("resuming from step 2" in o for o in second), second
    assert {"2", "4"} <= set(os.listdir(runs["tmp"] / "two" / "checkpoints"))
    assert list(train_losses(runs["tmp"] / "two")) == [1, 2, 3, 4]  # steps 1-2 before, 3-4 after the restart
    assert [r["step"] for r in records(runs["tmp"] / "two", "eval")] == [2, 4]


def test_only_process_0_writes_logs_and_results(runs):
    test_the_runs_finished(runs)
    p0, p1 = outputs(runs, "second")
    assert "results:" in p0 and "results:" not in p1
    assert "trainable" in p0 and "trainable" not in p1  # the summary table
    train_losses(runs["tmp"] / "two")  # raises if two processes appended the same steps
    res = (runs["tmp"] / "two" / "results.json").read_text()
    assert '"processes": 2' in res and '"devices": 4' in res


def test_a_dead_process_makes_the_others_exit_with_an_error(runs):
    death = runs["death"]
    assert death["rc"] is not None, f"process 0 still ran {DEATH_BOUND} s after process 1 died:\n" + \
        death["output"][-3000:]
    assert death["rc"] != 0 and death["seconds"] < DEATH_BOUND, death["seconds"]
    assert "another task died" in death["output"] or "stopped sending heartbeats" in death["output"], \
        death["output"][-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


BOUND = 60


@pytest.mark.parametrize("scenario", ["sigterm_one", "kill_one"])
def test_cli_two_processes_sigterm_or_kill_one(tmp_path, tiny_model_dir, scenario):
    """SIGTERM to one host: all stop at the same step with a checkpoint; SIGKILL: the other exits (heartbeat)."""
    model = dropout_free_copy(tiny_model_dir, tmp_path / "tiny")
    runs = [o for o in tiny_run(model) if not o.startswith("train.max_steps")] + [
        "train.max_steps=100000", "train.epochs=10000", "distributed.heartbeat_timeout=10"]
    (port,) = free_ports(1)
    with Procs() as procs:
        pair = [procs.start([PYTHON, "-m", "spafit_jax.train", "--workdir", str(tmp_path / "w"), *runs,
                             *distributed(port, i)], env(2, tmp_path / "tok"), tmp_path / f"p{i}.txt")
                for i in range(2)]
        metrics = tmp_path / "w" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert all(p.poll() is None for p in pair), tail(tmp_path / "p0.txt") + tail(tmp_path / "p1.txt")
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(pair[1].pid, signal.SIGTERM if scenario == "sigterm_one" else signal.SIGKILL)
        t0 = time.monotonic()
        rc0 = procs.wait(pair[0], t0 + BOUND)
        seconds = time.monotonic() - t0
        out = [(tmp_path / f"p{i}.txt").read_text() for i in range(2)]
        if scenario == "sigterm_one":
            rc1 = procs.wait(pair[1], t0 + BOUND)
            assert (rc0, rc1) == (0, 0), out
            stops = [o.split("stopped at step ")[1].split(";")[0] for o in out]
            assert stops[0] == stops[1], stops  # the same step on both
            assert stops[0] in os.listdir(tmp_path / "w" / "checkpoints")
        else:
            assert rc0 != 0 and "another task died" in out[0], out[0][-2000:]
        print(scenario, "survivor exited after", round(seconds, 1), "s")
