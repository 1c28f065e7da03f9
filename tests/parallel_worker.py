"""Helpers and subprocess entry points of tests/test_parallel.py and tests/test_multihost.py.

The test process has initialised JAX with one device, so runs on 8 simulated CPU devices
(or on several processes) happen in subprocesses started with `env(devices)`:

    python tests/parallel_worker.py suite SPEC.json OUT.json
        In one process: train every run of the spec with train_and_evaluate (checkpoints and
        metrics.jsonl land in <base>/<name>), run the CLI entry point `train.main` on bad
        batch sizes, and record how `put_frozen` shards the frozen base for each fsdp size.
    python tests/parallel_worker.py train [--stop-after N] [--heartbeat-timeout S] CLI-ARGS...
        Like `python -m spafit_jax.train CLI-ARGS`, but it can stop after N steps (as a
        preemption would: checkpoint, then exit 0), and it starts the distributed runtime
        itself with a short heartbeat timeout, after which the survivors of a dead process
        give up.

The helpers below (tiny model, environment, reading metrics and checkpoints, free ports,
process cleanup) are imported by the two test files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# ------------------------------------------------------------------------------------ helpers


def dropout_free_copy(model_dir: Path, dest: Path) -> Path:
    """A copy of a model folder whose config.json turns dropout off (so every driver sees the same model)."""
    if not (dest / "config.json").exists():
        shutil.copytree(model_dir, dest, dirs_exist_ok=True)
        config = json.loads((dest / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def tiny_run(model_dir) -> list[str]:
    """Overrides of a short, deterministic run of the tiny model on a slice of BBC News (4 steps of 16)."""
    return [f"model.name={model_dir}", "data.task=bbc_news", "data.limit_train=64", "data.limit_eval=32",
            "data.max_length=32", "train.batch_size=16", "train.eval_batch_size=16", "train.max_steps=4",
            "train.lr=1e-2", "method.name=spafit", "method.n1=1", "method.n2=2", "train.log_every=1"]


def env(devices: int, token_cache: Path | None = None) -> dict:
    """Environment of a subprocess that sees `devices` CPU devices."""
    e = dict(os.environ)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
    )
    # The persistent XLA cache that tests/conftest.py sets up, shared with the subprocesses:
    # the tiny model's programs then compile once per machine, not once per process.
    e.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if token_cache is not None:
        e["SPAFIT_CACHE"] = str(token_cache)
    return e


def once(tmp_path_factory, name: str, build) -> Path:
    """A folder filled by `build(folder)` once per test session, also when pytest-xdist spreads a
    module's tests over several workers (which then share the result instead of redoing it)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this session's folder, shared by its workers
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".done").write_text("")
    return folder


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nobody listens on now (for coordinators on 127.0.0.1)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class Procs:
    """Subprocesses with their output in files; `close()` kills whatever still runs (use as a context)."""

    def __init__(self):
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], env: dict, log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append((p, log))
        return p

    def wait(self, p: subprocess.Popen, deadline: float) -> int:
        """The exit status of `p`; kills every process and fails when `deadline` (time.monotonic) passes."""
        try:
            return p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log = dict((id(q), l) for q, l in self.procs)[id(p)]
            self.close()
            raise AssertionError(f"{p.args[:4]}... did not finish in time; its output:\n{tail(log)}") from None

    def close(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and its children
                p.wait()

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def signal_after_records(workdir: Path, args: list[str], signum: int, records: int = 3) -> tuple[int, str]:
    """Runs `python -m spafit_jax.train --workdir workdir *args`, sends `signum` once metrics.jsonl holds
    `records` lines, and returns (exit status, stderr)."""
    cmd = [PYTHON, "-m", "spafit_jax.train", "--workdir", str(workdir), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, log = time.time() + 240, Path(workdir) / "metrics.jsonl"
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= records):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def tail(path: Path, n: int = 4000) -> str:
    text = Path(path).read_text(errors="replace") if Path(path).exists() else "(no output)"
    return text[-n:]


def records(workdir: Path, kind: str = "train") -> list[dict]:
    """The records of one kind ("train" or "eval") in metrics.jsonl."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind", "train") == kind]


def train_losses(workdir: Path) -> dict[int, float]:
    """{step: loss} of the train records of metrics.jsonl."""
    steps = [r["step"] for r in records(workdir)]
    assert len(steps) == len(set(steps)), f"metrics.jsonl of {workdir} repeats steps {steps}: written twice?"
    return {r["step"]: r["loss"] for r in records(workdir)}


def eval_metrics(workdir: Path) -> dict[tuple, float]:
    """{(step, split, metric): value} of the eval records of metrics.jsonl and of results.json."""
    out = {(r["step"], r["split"], k): v for r in records(workdir, "eval") for k, v in r.items()
           if k not in ("kind", "step", "split")}
    res = json.loads((Path(workdir) / "results.json").read_text())
    out.update({("final", k): v for k, v in res["eval"].items()})
    return out


def final_state(workdir: Path) -> dict:
    """{path: numpy array} of the latest checkpoint's state (trainable params, optimizer state, step, rng)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    folder = Path(workdir).resolve() / "checkpoints"
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    path = folder / str(step) / "state"
    ckpt = ocp.PyTreeCheckpointer()
    meta = ckpt.metadata(path).item_metadata
    meta = getattr(meta, "tree", meta)
    tree = ckpt.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_run(workdir: Path, reference: Path, atol: float = 1e-5) -> None:
    """Same losses at every logged step, same final state and same eval metrics (every eval), to `atol`."""
    import numpy as np

    losses, ref_losses = train_losses(workdir), train_losses(reference)
    assert list(losses) == list(ref_losses), (losses, ref_losses)
    np.testing.assert_allclose(list(losses.values()), list(ref_losses.values()), rtol=0, atol=atol,
                               err_msg=f"losses of {workdir} vs {reference}")
    state, ref_state = final_state(workdir), final_state(reference)
    assert state.keys() == ref_state.keys()
    for key, ref in ref_state.items():
        np.testing.assert_allclose(state[key], ref, rtol=0, atol=atol, err_msg=f"{key} of {workdir} vs {reference}")
    evals, ref_evals = eval_metrics(workdir), eval_metrics(reference)
    assert evals.keys() == ref_evals.keys()
    for key, value in ref_evals.items():
        assert abs(evals[key] - value) <= atol, (key, evals[key], value)
    # Not a vacuous comparison: the LoRA B matrices start at zero and must have moved.
    lora_b = [np.abs(v).max() for k, v in state.items() if k.startswith("['trainable']") and "lora_b" in k]
    assert lora_b and min(lora_b) > 1e-3, lora_b


# ------------------------------------------------------------------------------------ entry points


def _suite(spec_path: str, out_path: str) -> int:
    import jax
    import numpy as np

    from spafit_jax.config import files as config_lib
    from spafit_jax.models import hf
    from spafit_jax.training import optimizer, parallel
    from spafit_jax import train
    from spafit_jax.training import trainer
    from spafit_jax.training.plan import make_plan
    from spafit_jax.config.schema import MethodConfig

    spec = json.loads(Path(spec_path).read_text())
    base, common = Path(spec["base"]), spec["common"]
    out: dict = {"devices": jax.device_count(), "runs": {}, "errors": {}, "fsdp": {}}
    for name, overrides in spec.get("runs", {}).items():
        t0 = time.perf_counter()
        run = trainer.train_and_evaluate(config_lib.load_config([], common + overrides), base / name)
        out["runs"][name] = {"seconds": time.perf_counter() - t0, "devices": run.results.devices,
                             "parallel": run.results.parallel}
    for name, overrides in spec.get("errors", {}).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = train.main(["--workdir", str(base / name), *common, *overrides])
        out["errors"][name] = {"rc": rc, "stderr": err.getvalue()}
    if spec.get("fsdp"):
        model, params = hf.load_pretrained(spec["model"], num_labels=5)
        plan = make_plan(MethodConfig(name="bitfit"), model.config.num_hidden_layers).label(params)
        trainable, frozen = plan.split(params)
        tx = optimizer.make_optimizer(plan, config_lib.TrainConfig(), 4)
        for fsdp in spec["fsdp"]:
            driver = parallel.make_driver(config_lib.ParallelConfig(fsdp=fsdp), model.apply, tx, is_regression=False)
            placed = driver.put_frozen(frozen)
            out["fsdp"][str(fsdp)] = {
                jax.tree_util.keystr(p): {"spec": [None if s is None else str(s) for s in x.sharding.spec]
                                          + [None] * (x.ndim - len(x.sharding.spec)),
                                          "shape": list(x.shape),
                                          "shard": list(x.addressable_shards[0].data.shape),
                                          "equal": bool(np.array_equal(np.asarray(x), np.asarray(host)))}
                for (p, x), host in zip(jax.tree_util.tree_flatten_with_path(placed)[0],
                                        jax.tree_util.tree_leaves(frozen))
            }
    Path(out_path).write_text(json.dumps(out, indent=1))
    return 0


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="parallel_worker.py train")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--heartbeat-timeout", type=int, default=None)
    args, rest = parser.parse_known_args(argv)

    import jax

    from spafit_jax import cli as cli_lib
    from spafit_jax.training import trainer
    from spafit_jax.errors import SpafitError

    try:
        cfg, cli = cli_lib.parse_args(rest)
        d = cfg.distributed
        if d.enabled and args.heartbeat_timeout is not None:
            # train._init_distributed does nothing once the runtime is up.
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                process_id=d.process_id, initialization_timeout=d.initialization_timeout,
                heartbeat_timeout_seconds=args.heartbeat_timeout, shutdown_timeout_seconds=args.heartbeat_timeout,
            )
        run = trainer.train_and_evaluate(cfg, cli.workdir, overwrite=cli.overwrite, stop_after=args.stop_after)
    except SpafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"process {jax.process_index()}/{jax.process_count()}: {'finished' if run.results else run.step}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["suite"] and len(argv) == 3:
        return _suite(argv[1], argv[2])
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
