"""Seeded kill -9 suite (issue 10): runs of the CLI are killed with SIGKILL at seeded random moments
(during training steps, while Orbax writes a checkpoint, during evaluation, around the final
results write), re-run after each kill, and finally let finish; metrics.jsonl (timing fields aside),
results.json and the final trained state must then equal those of an uninterrupted run bit for bit.

Everything is watched from outside, as a user would see it: files and folders appearing in the
workdir and records appearing in metrics.jsonl. No hook in the trainer.

Time: process start (imports, ~7 s) and tracing dominate. The uninterrupted reference run is a
real `python -m spafit_jax.train`; the killed runs are forked from a "zygote" process
(`python tests/test_kill.py zygote`) that has done the imports once, and each child runs the
CLI's entry point `spafit_jax.train.main(argv)` exactly as `python -m spafit_jax.train argv`
does (its exit status is main's). Two chains of kills run side by side in separate workdirs.
SPAFIT_KILL_SEED picks another seed.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SPAFIT_KILL_SEED", "10"))
TOTAL, CKPT_EVERY, EVAL_EVERY, LOG_EVERY = 8, 2, 3, 3  # 2 steps an epoch; logs at 3, 6, 8
SAVES = sorted({k for k in range(1, TOTAL + 1) if k % CKPT_EVERY == 0 or k % EVAL_EVERY == 0} | {TOTAL})
EVALS = [k for k in range(EVAL_EVERY, TOTAL, EVAL_EVERY)] + [TOTAL]
TIMING = ("examples_per_second",)  # the only per-record field that measures time
RESULTS_TIMING = ("train_seconds", "eval_seconds", "examples_per_second", "compile_seconds", "compiled_shapes",
                  "frozen_cache")
CLASSES = ("train", "checkpoint", "eval", "results")


def overrides(model_dir: Path, data: Path) -> list[str]:
    return [f"model.name={model_dir}", "data.task=local", f"data.train_file={data / 'train.csv'}",
            f"data.eval_file={data / 'eval.csv'}", "data.max_length=32", "data.padding=max_length",
            "train.batch_size=8", "train.eval_batch_size=8", f"train.max_steps={TOTAL}", "train.epochs=100",
            f"train.log_every={LOG_EVERY}", f"train.eval_every={EVAL_EVERY}", f"checkpoint.every={CKPT_EVERY}",
            "method.n1=1", "method.n2=2", "train.lr=1e-2"]


def write_data(folder: Path) -> Path:
    """16 train and 8 eval rows of varied length (so padding efficiency is not always 1)."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", 16), ("eval.csv", 8)):
        rows = [f"{' '.join(rng.choices(words, k=rng.randint(2, 40)))},{i % 2}" for i in range(n)]
        (folder / name).write_text("text,label\n" + "\n".join(rows) + "\n")
    return folder


def env(cache: Path) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             SPAFIT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # also the model init's many small programs
    return e


# ------------------------------------------------------------------------------------ the zygote


def zygote() -> None:
    """Imports what the CLI imports, then, for each JSON line {"argv", "log"} on stdin, forks a child
    that runs `spafit_jax.train.main(argv)` with stdout and stderr in `log`, writes its exit status
    to `log`.rc and exits with it; prints the child's pid. Children are reaped by the kernel."""
    import spafit_jax.train as train
    import datasets  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import tensorboardX  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    os.write(1, b"ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = 1
            try:
                rc = train.main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                atexit._run_exitfuncs()
                Path(req["log"] + ".rc").write_text(str(rc))
                os._exit(rc)
        os.write(1, f"{pid}\n".encode())


class Zygote:
    def __init__(self, environ: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "zygote"], cwd=ROOT, env=environ, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()
        self.ready = threading.Thread(target=self.proc.stdout.readline)
        self.ready.start()

    def start(self, argv: list[str], log: Path) -> Child:
        self.ready.join()
        with self.lock:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"zygote died: {line!r} {self.proc.stderr.read() if not line else ''}"
        return Child(int(line), log)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Child:
    def __init__(self, pid: int, log: Path):
        self.pid, self.log = pid, log

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        while self.alive():
            time.sleep(0.005)

    def wait(self, timeout: float = 180) -> int:
        deadline = time.time() + timeout
        while self.alive():
            assert time.time() < deadline, f"pid {self.pid} still running after {timeout} s:\n{self.output()}"
            time.sleep(0.02)
        rc = Path(str(self.log) + ".rc")
        assert rc.exists(), f"pid {self.pid} died without an exit status:\n{self.output()}"
        return int(rc.read_text())

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no output)"


# ------------------------------------------------------------------------------------ watching


def log_records(workdir: Path) -> list[dict]:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def finished_steps(workdir: Path) -> list[int]:
    ck = workdir / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def tmp_dirs(workdir: Path) -> list[str]:
    ck = workdir / "checkpoints"
    return sorted(p.name for p in ck.iterdir() if "tmp" in p.name) if ck.is_dir() else []


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def log_inode(workdir: Path):
    try:
        return (workdir / "metrics.jsonl").stat().st_ino
    except FileNotFoundError:
        return None


def condition(workdir: Path, trigger: tuple, inode_before):
    """A test of whether `trigger` has happened in the run just started. Every trigger waits until the run
    has opened its log (rewritten on resume, so a new inode): by then it has cut the log back to its
    checkpoint and Orbax has deleted the temporary folders the killed run left, so what follows is its own."""
    kind, k = trigger
    opened = lambda: log_inode(workdir) not in (None, inode_before)  # noqa: E731
    if kind == "log_opened":  # it compiles and runs its first step
        return opened
    if kind == "ckpt_tmp":  # Orbax writes step k into a new temporary folder (it may delete old ones in the background)
        since = time.time_ns()
        return lambda: opened() and any(name.startswith(f"{k}.") and _mtime(workdir / "checkpoints" / name) >= since
                                        for name in tmp_dirs(workdir))
    if kind == "ckpt_done":  # step k is finalised: the run trains step k + 1 (or, at the end, writes results)
        return lambda: opened() and k in finished_steps(workdir)
    if kind == "record":  # the train record of step k is logged: evaluation follows
        return lambda: opened() and any(r.get("step") == k and "kind" not in r for r in log_records(workdir))
    raise ValueError(kind)


def pick(rng: random.Random, cls: str, resume: int) -> tuple[tuple, float]:
    """A trigger for a kill of class `cls` in a run resuming from step `resume`, and a delay after it."""
    if cls == "train":
        ahead = [k for k in SAVES if resume < k < TOTAL][:2]
        if not ahead or rng.random() < 0.4:
            return ("log_opened", None), rng.uniform(0.0, 1.5)
        return ("ckpt_done", rng.choice(ahead)), rng.uniform(0.0, 0.05)
    if cls == "checkpoint":
        return ("ckpt_tmp", rng.choice([k for k in SAVES if k > resume][:2])), rng.uniform(0.0, 0.1)
    if cls == "eval":  # the first evaluation of the process (compiling it takes long enough to land in it)
        return ("record", min(k for k in EVALS if k > resume)), rng.uniform(0.0, 0.05)
    return ("ckpt_done", TOTAL), 0.0


def observed(workdir: Path) -> str:
    """What the workdir says the killed run was doing (several things: Orbax finishes a save in the
    background while the run goes on)."""
    if (workdir / "results.json").exists() or TOTAL in finished_steps(workdir):
        return "results"
    doing = ["checkpoint"] if tmp_dirs(workdir) else []
    recs = [r for r in log_records(workdir) if r.get("kind") != "epoch"]
    if recs and "kind" not in recs[-1] and recs[-1]["step"] in EVALS:  # a step evaluated after, not yet logged
        doing.insert(0, "eval")
    return "+".join(doing) or "train"


def chain(zygote: Zygote, workdir: Path, argv: list[str], classes: list[str], rng: random.Random, logs: Path,
          name: str) -> list[dict]:
    """Kills a run once per class in `classes` (re-running after each), then lets it finish."""
    kills = []
    for i, cls in enumerate(classes):
        resume = max(finished_steps(workdir), default=0)
        if resume >= TOTAL:
            break
        trigger, delay = pick(rng, cls, resume)
        ready = condition(workdir, trigger, log_inode(workdir))
        child = zygote.start(["--workdir", str(workdir), *argv], logs / f"{name}-{i}.log")
        t0 = time.time()
        while not ready():
            assert child.alive(), f"{name} run {i} ended before {trigger}:\n{child.output()}"
            assert time.time() - t0 < 240, f"{name} run {i}: no {trigger} after 240 s:\n{child.output()}"
            time.sleep(0.01)
        time.sleep(delay)
        child.kill()
        kills.append({"chain": name, "class": cls, "trigger": trigger, "delay": round(delay, 3), "resume": resume,
                      "observed": observed(workdir), "seconds": round(time.time() - t0, 1)})
    t0 = time.time()
    child = zygote.start(["--workdir", str(workdir), *argv], logs / f"{name}-final.log")
    rc = child.wait()
    out = child.output()
    if kills and kills[-1]["observed"] == "results" and rc == 2:  # killed after results.json: the run was done
        assert "holds a finished run" in out and "Traceback" not in out, out
    else:
        assert rc == 0 and "Traceback" not in out, out
    kills.append({"chain": name, "class": "finish", "rc": rc, "seconds": round(time.time() - t0, 1)})
    return kills


# ------------------------------------------------------------------------------------ comparing


def comparable_log(workdir: Path) -> list[dict]:
    text = (workdir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


def comparable_results(workdir: Path) -> dict:
    res = json.loads((workdir / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in RESULTS_TIMING}


def final_state(workdir: Path) -> dict:
    """{path: array} of the final checkpoint's state (trainable parameters, optimizer state, step, rng)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from spafit_jax.training import checkpoint

    with checkpoint.Checkpointer(workdir / "checkpoints", fingerprint={}, keep=2, keep_best=False,
                                 best_metric=None) as ck:
        saved = ck._mngr.item_metadata(TOTAL)["state"]
        saved = getattr(saved, "tree", saved)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        state = ck._mngr.restore(TOTAL, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
    return ocp.tree.to_flat_dict(state["state"], sep="/")


def test_seeded_kill_9_chains_end_equal_to_an_uninterrupted_run(tiny_model_dir, tmp_path):
    t_start = time.time()
    data, logs = write_data(tmp_path / "data"), tmp_path / "logs"
    logs.mkdir()
    environ = env(tmp_path / "tokens")
    argv = overrides(tiny_model_dir, data)
    reference = tmp_path / "reference"
    ref = subprocess.Popen([sys.executable, "-m", "spafit_jax.train", "--workdir", str(reference), *argv], cwd=ROOT,
                           env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    zyg = Zygote(environ)  # imports while the reference run starts
    try:
        # The chains start once the reference run has compiled (and cached) its step and its evaluation:
        # three processes compiling the same programs at once would take three times as long.
        while not any(r.get("kind") == "eval" for r in log_records(reference)):
            assert ref.poll() is None, ref.communicate()[0]
            assert time.time() - t_start < 300, "the reference run has not evaluated after 300 s"
            time.sleep(0.05)
        t_warm = time.time() - t_start
        rng = random.Random(SEED)
        plans = []
        for _ in range(2):  # each chain: train, checkpoint, eval and one more, shuffled; a results kill last
            classes = [*CLASSES[:3], rng.choice(CLASSES[:3])]
            rng.shuffle(classes)
            plans.append([*classes, "results"])
        results: dict[str, list] = {}
        threads = [threading.Thread(target=lambda n=n, p=p, r=random.Random(SEED * 100 + n): results.__setitem__(
            n, chain(zyg, tmp_path / f"chain{n}", argv, p, r, logs, f"chain{n}"))) for n, p in enumerate(plans)]
        for t in threads:
            t.start()
        ref_out, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0 and "Traceback" not in ref_out, ref_out
        t_ref = time.time() - t_start
        for t in threads:
            t.join(timeout=600)
        assert sorted(results) == [0, 1], "a chain failed (see its assertion above)"
    finally:
        ref.kill()
        zyg.close()
    t_chains = time.time() - t_start
    steps = [k for n in sorted(results) for k in results[n]]
    for k in steps:
        print(k)
    print(f"reference compiled after {t_warm:.1f} s, done after {t_ref:.1f} s; chains done after {t_chains:.1f} s")
    kills = [k for k in steps if k["class"] != "finish"]
    assert len(kills) >= 10, kills
    assert {c for k in kills for c in k["observed"].split("+")} >= set(CLASSES), kills  # every moment was hit
    want_log, want_res, want_state = comparable_log(reference), comparable_results(reference), final_state(reference)
    assert [r["step"] for r in want_log if "kind" not in r] == [3, 6, 8]
    for n in sorted(results):
        work = tmp_path / f"chain{n}"
        assert comparable_log(work) == want_log
        assert comparable_results(work) == want_res
        got = final_state(work)
        assert got.keys() == want_state.keys()
        for path, want in want_state.items():
            assert (got[path].dtype, got[path].shape, got[path].tobytes()) == (want.dtype, want.shape, want.tobytes()), path
        assert not list((work / "checkpoints").glob("*tmp*"))
    print(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    zygote()
