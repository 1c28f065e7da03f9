"""Tests of spafit_jax.training.checkpoint (Orbax checkpoints + base/plan fingerprint)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from spafit_jax.training.checkpoint import FORMAT, Checkpointer, fingerprint
from spafit_jax.errors import CheckpointError
from spafit_jax.training.steps import TrainState

REPO = Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "fixtures" / "old_checkpoint" / "checkpoints"
OLD_EXTRA = {"best": 0.5, "train_seconds": 1.5, "epoch": 1, "batch_in_epoch": 0}


def tiny_params(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: np.asarray(r.normal(size=s), np.float32)  # noqa: E731
    layer = lambda: {"attention": {"self": {"query": {"kernel": f(4, 4), "bias": f(4)}}},  # noqa: E731
                     "output": {"LayerNorm": {"scale": f(4), "bias": f(4)}}}
    return {"bert": {"encoder": {"layer": {str(i): layer() for i in range(2)}}},
            "classifier": {"kernel": f(4, 3), "bias": f(3)}}


def tiny_labels(params):
    """classifier: head; the query bias of layer 1: bias; everything else frozen."""
    def label(path, _):
        keys = [getattr(k, "key", "") for k in path]
        if keys[0] == "classifier":
            return "head"
        return "bias" if keys[3] == "1" and keys[-2:] == ["query", "bias"] else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def _split(params, labels):
    trainable = jax.tree.map(lambda p, l: None if l == "frozen" else p, params, labels)
    frozen = jax.tree.map(lambda p, l: p if l == "frozen" else None, params, labels)
    return trainable, frozen


def tiny_base(seed=0, labels_fn=tiny_labels):
    """(frozen params, labels) of the tiny model."""
    params = tiny_params(seed)
    labels = labels_fn(params)
    return _split(params, labels)[1], labels


def tiny_state(seed=0, updates=0):
    """A host TrainState shaped like the trainer's: None for frozen leaves, partitioned optax state
    with MaskedNode / EmptyState placeholders, uint32 key data; `updates` Adam steps on ones."""
    params = tiny_params(seed)
    labels = tiny_labels(params)
    decay = lambda t: jax.tree.map(lambda x: x.ndim >= 2, t)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.partition(
        {"bias": optax.adam(1e-2), "head": optax.adamw(1e-2, weight_decay=0.01, mask=decay)},
        jax.tree.map(lambda l: None if l == "frozen" else l, labels)))
    trainable = _split(params, labels)[0]
    state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable),
                       jax.random.key_data(jax.random.key(seed)))
    for _ in range(updates):
        grads = jax.tree.map(jnp.ones_like, state.trainable)
        upd, opt_state = tx.update(grads, state.opt_state, state.trainable)
        state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, upd),
                              opt_state=opt_state)
    return jax.device_get(state)


def _fp(seed=0, labels_fn=tiny_labels, model="tiny"):
    return fingerprint(*tiny_base(seed, labels_fn), model_name=model)


def _assert_host_equal(got, want):
    """Same structure; every leaf a numpy array equal to want's, with want's dtype."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(x, np.ndarray) and x.dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, np.asarray(y))


def _ckpt(path, fp=None, **kw):
    kw = {"keep": 2, "keep_best": False, "best_metric": None, **kw}
    return Checkpointer(path, fingerprint=fp or _fp(), **kw)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_skips_trainable_leaves():
    fp = _fp()
    assert set(fp) == {"base", "plan", "model"} and fp["model"] == "tiny"
    assert len(fp["base"]) == 64 and len(fp["plan"]) == 64 and _fp() == fp
    frozen, labels = tiny_base()
    # Device arrays hash like host ones; dict insertion order does not matter.
    assert fingerprint(jax.device_put(frozen), labels, model_name="tiny") == fp
    assert fingerprint(dict(reversed(list(frozen.items()))), labels, model_name="tiny") == fp
    # Trainable leaves (None in the frozen tree) do not enter the base hash.
    params = tiny_params()
    params["classifier"]["kernel"] = params["classifier"]["kernel"] + 1.0
    assert fingerprint(_split(params, labels)[1], labels, model_name="x")["base"] == fp["base"]


def test_fingerprint_changes_with_bytes_shape_dtype_and_plan():
    frozen, labels = tiny_base()
    base = fingerprint(frozen, labels, model_name="m")["base"]

    def variant(fn):
        f2 = jax.tree.map(lambda x: x, frozen)
        q = f2["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
        q["kernel"] = fn(q["kernel"])
        return fingerprint(f2, labels, model_name="m")["base"]

    assert variant(lambda k: k + np.float32(1e-6) * (k == k[0, 0])) != base
    assert variant(lambda k: k.reshape(2, 8)) != base
    assert variant(lambda k: jnp.asarray(k, jnp.bfloat16)) != base  # bfloat16 hashes too
    assert _fp(labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p))["plan"] != _fp()["plan"]
    assert _fp(seed=1)["base"] != _fp()["base"] and _fp(seed=1)["plan"] == _fp()["plan"]


# ----------------------------------------------------------------------------- save/restore


@pytest.mark.parametrize("place", [jax.device_put, np.asarray], ids=["device", "host"])
def test_round_trip_train_state_and_extra(tmp_path, place):
    state = tiny_state(seed=3, updates=2)
    extra = {"epoch": 1, "batch_in_epoch": 12, "best": np.float32(0.25), "w": jnp.arange(2)}
    with _ckpt(tmp_path) as ck:
        assert ck.latest_step() is None
        assert ck.save(7, jax.tree.map(place, state), extra=extra)
        ck.wait()
        assert ck.latest_step() == 7
    # A fresh Checkpointer (a new process on resume) finds the step and restores it as host arrays.
    with _ckpt(tmp_path) as ck:
        assert ck.latest_step() == 7
        restored, got_extra = ck.restore(tiny_state(seed=0))
    assert isinstance(restored, TrainState)
    _assert_host_equal(restored, state)
    assert restored.trainable["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] is None
    assert got_extra == {"epoch": 1, "batch_in_epoch": 12, "best": 0.25, "w": [0, 1]}
    assert json.loads((tmp_path / "7" / "meta" / "metadata").read_text())["format"] == FORMAT == 2


def test_save_is_safe_against_donation_and_skips_existing_steps(tmp_path):
    with _ckpt(tmp_path) as ck:
        state = {"w": jnp.arange(1000.0)}
        assert ck.save(1, state, extra={"a": 1})
        state["w"].delete()  # what a donating train step does to the old buffers
        ck.wait()
        got, _ = ck.restore({"w": np.zeros(1000, np.float32)})
        np.testing.assert_array_equal(got["w"], np.arange(1000.0))
        assert not ck.save(1, got, extra={"a": 2})  # exists: nothing written
        assert ck.restore({"w": np.zeros(1000, np.float32)})[1] == {"a": 1}


def test_restore_specific_step_and_missing_step(tmp_path):
    w = {"w": np.zeros(2, np.float32)}
    with _ckpt(tmp_path, keep=3) as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in .*train from scratch"):
            ck.restore(w)
        for s in (1, 2):
            ck.save(s, {"w": np.full(2, s, np.float32)}, extra={"s": s})
        ck.wait()
        got, extra = ck.restore(w, step=1)
        assert extra == {"s": 1} and got["w"][0] == 1.0
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*found: \[1, 2\]"):
            ck.restore(w, step=5)


def test_keep_last_n(tmp_path):
    with _ckpt(tmp_path, keep=2) as ck:
        for s in range(1, 6):
            assert ck.save(s, {"w": np.full(2, s, np.float32)}, extra={})
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_best_is_kept_beyond_last_n(tmp_path):
    kw = {"keep": 2, "keep_best": True, "best_metric": "acc"}
    w = lambda s: {"w": np.full(2, s, np.float32)}  # noqa: E731
    with _ckpt(tmp_path, **kw) as ck:
        for s, acc in [(1, 0.5), (2, 0.9), (3, 0.6)]:
            ck.save(s, w(s), extra={"s": s}, metrics={"acc": acc, "loss": 1.0})
    # Resume in a new Checkpointer: the ranking is read back from disk.
    with _ckpt(tmp_path, **kw) as ck:
        ck.save(4, w(4), extra={}, metrics={"acc": float("nan")})  # NaN: never best
        ck.save(5, w(5), extra={}, metrics={"acc": 0.7})
        ck.save(6, w(6), extra={})  # no metrics: kept only as recent
        ck.save(7, w(7), extra={}, metrics={"loss": 0.1})  # no "acc"
        ck.wait()
        assert sorted(os.listdir(tmp_path)) == ["2", "6", "7"]
        got, extra = ck.restore({"w": np.zeros(2, np.float32)}, step=2)
    assert extra == {"s": 2} and got["w"][0] == 2.0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="best_metric"):
        _ckpt(tmp_path, keep_best=True)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        _ckpt(tmp_path, keep=0)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("other", [
    dict(seed=1, model="bert-base"),  # other weights, other name
    dict(seed=1, model="minilm"),  # same name (a local folder), other weights
    dict(seed=1, model="bert-base", labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p)),
])
def test_other_base_model_is_refused(tmp_path, other):
    with _ckpt(tmp_path, fp=_fp(model="minilm")) as ck:
        ck.save(1, tiny_state(), extra={})
    with _ckpt(tmp_path, fp=_fp(**other)) as ck:
        with pytest.raises(CheckpointError) as err:
            ck.restore(tiny_state())
    msg = str(err.value)
    assert "different base model (minilm)" in msg
    assert str(tmp_path) in msg and "new --workdir" in msg and "\n" not in msg


def test_other_plan_is_refused(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, tiny_state(), extra={})
    # Same model; another plan also freezes other leaves, so "base" differs as well.
    other = _fp(labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p))
    assert other["base"] != _fp()["base"]
    with _ckpt(tmp_path, fp=other) as ck:
        with pytest.raises(CheckpointError, match="different trainability plan.*n1 / n2 / LoRA"):
            ck.restore(tiny_state())


def test_state_that_does_not_fit_is_refused(tmp_path):
    a, b = np.zeros((2, 3), np.float32), np.zeros(2, np.float32)
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"a": a, "b": {"c": b}}, extra={})
        ck.wait()
        where = f"checkpoint {tmp_path / '1'} does not fit this run's state"
        for template, why in [
            ({"a": a.T, "b": {"c": b}}, r"a is float32\[2, 3\] there but float32\[3, 2\] here"),
            ({"a": a.astype(np.float16), "b": {"c": b}}, r"a is float32\[2, 3\] there but float16\[2, 3\]"),
            ({"a": a, "b": {"c": b}, "d": b}, r"it lacks \['d'\]"),
            ({"a": a}, r"it has extra leaves \['b/c'\]"),
        ]:
            with pytest.raises(CheckpointError, match=f"{where}: {why}.*new --workdir"):
                ck.restore(template)


def test_meta_from_elsewhere_is_refused(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": np.ones(2, np.float32)}, extra={})
    meta = tmp_path / "1" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "format": FORMAT + 1}))
    with _ckpt(tmp_path) as ck:
        with pytest.raises(CheckpointError, match=f"has format {FORMAT + 1}, newer .*upgrade spafit_jax"):
            ck.restore({"w": np.zeros(2, np.float32)})
    meta.write_text(json.dumps({"step": 1}))
    with _ckpt(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="not written by spafit_jax"):
            ck.restore({"w": np.zeros(2, np.float32)})


def test_corrupt_checkpoint_is_an_error_with_its_path(tmp_path, caplog):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": np.arange(64.0)}, extra={})
        ck.save(2, {"w": np.arange(64.0)}, extra={})
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            if "ocdbt" in root or os.path.basename(root) == "d" or name.endswith(".ocdbt"):
                Path(root, name).write_bytes(b"\x00garbage")
    (tmp_path / "1" / "meta" / "metadata").write_text("{not json")
    fix = "delete that folder to resume from an earlier step, or use a new --workdir"
    with _ckpt(tmp_path) as ck:
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / '2'} is unreadable .*{fix}"):
            ck.restore({"w": np.zeros(64)}, step=2)
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / '1'} is unreadable .*{fix}"):
            ck.restore({"w": np.zeros(64)}, step=1)
        # the latest: 2 is unreadable (a warning names it and the fallback), then 1 is too: its error
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / '1'} is unreadable .*{fix}"):
            ck.restore({"w": np.zeros(64)})
    assert any(f"{tmp_path / '2'} is unreadable" in r.getMessage() and "step 1" in r.getMessage()
               for r in caplog.records)


def test_an_unreadable_latest_step_falls_back_to_an_older_one(tmp_path, caplog):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": np.arange(64.0)}, extra={"at": 1})
        ck.save(2, {"w": np.arange(64.0) * 2}, extra={"at": 2})
    (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
    with _ckpt(tmp_path) as ck:
        state, extra = ck.restore({"w": np.zeros(64)})
    np.testing.assert_array_equal(state["w"], np.arange(64.0))
    assert extra == {"at": 1}
    assert any(f"{tmp_path / '2'} is unreadable" in r.getMessage() for r in caplog.records)


def test_broken_metrics_fail_on_open_naming_the_step(tmp_path):
    kw = {"keep_best": True, "best_metric": "acc"}
    with _ckpt(tmp_path, **kw) as ck:
        ck.save(3, {"w": np.ones(2)}, extra={}, metrics={"acc": 0.5})
    (tmp_path / "3" / "metrics" / "metrics").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path / '3'} is unreadable \(JSONDecodeError") as err:
        _ckpt(tmp_path, **kw)
    assert "\n" not in str(err.value) and "delete that folder to resume from an earlier step" in str(err.value)


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": np.ones(2)}, extra={"s": 1})
    # What a crash mid-save leaves behind: a temporary folder, never renamed.
    tmp = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half_written").write_bytes(b"\x00")
    with _ckpt(tmp_path) as ck:  # opening starts the cleanup in the background
        assert ck.latest_step() == 1 and ck.restore({"w": np.zeros(2)})[1] == {"s": 1}
        ck.save(2, {"w": np.full(2, 2.0)}, extra={"s": 2})
        ck.wait()
        assert ck.latest_step() == 2 and ck.restore({"w": np.zeros(2)})[1] == {"s": 2}
    assert not tmp.exists()


# ----------------------------------------------------------------------------- old format


def test_format_1_checkpoint_resumes(tmp_path):
    """tests/fixtures/old_checkpoint was written by the format-1 code (see make_old_checkpoint.py)."""
    shutil.copytree(OLD, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "2" / "meta" / "metadata").read_text())["format"] == 1
    kw = {"keep": 2, "keep_best": True, "best_metric": "accuracy"}
    with _ckpt(tmp_path / "ckpt", **kw) as ck:
        assert ck.latest_step() == 2
        restored, extra = ck.restore(tiny_state(seed=5))
        assert extra == OLD_EXTRA
        want = tiny_state(seed=0, updates=2)
        assert isinstance(restored, TrainState) and jax.tree.structure(restored) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
            assert isinstance(x, np.ndarray) and x.dtype == y.dtype
            np.testing.assert_allclose(x, y, rtol=1e-6)
        assert int(restored.step) == 2
        # The run continues in the same folder in the current format; the old step stays the best.
        for s in (3, 4):
            ck.save(s, restored.replace(step=np.asarray(s, np.int32)), extra={"s": s}, metrics={"accuracy": 0.1})
        ck.wait()
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3", "4"]
        assert int(ck.restore(tiny_state())[0].step) == 4
    # Another plan is refused with the usual one line.
    other = _fp(labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p))
    with _ckpt(tmp_path / "ckpt", fp=other) as ck:
        with pytest.raises(CheckpointError, match="different trainability plan"):
            ck.restore(tiny_state(), step=2)


def test_parallel_worker_reads_the_saved_state(tmp_path):
    from tests.parallel_worker import final_state

    state = tiny_state(seed=1, updates=1)
    with _ckpt(tmp_path / "checkpoints") as ck:
        ck.save(1, state, extra={})
    got = final_state(tmp_path)
    # Keyed by keystr of each leaf's path in Orbax's on-disk tree (dicts and lists).
    assert "['step']" in got and "['opt_state'][1]['inner_states']['head']['inner_state'][0]['count']" in got
    got = {"/".join(re.findall(r"\['?([^'\]]+)'?\]", k)): v for k, v in got.items()}
    want = ocp.tree.to_flat_dict(state, sep="/")
    assert got.keys() == want.keys() and len(got) == 13
    for key, x in want.items():
        np.testing.assert_array_equal(got[key], x)


# ----------------------------------------------------------------------------- sharded save

_SHARDED = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from spafit_jax.training.checkpoint import Checkpointer
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    host = {"w": np.arange(32.0, dtype=np.float32).reshape(8, 4), "b": np.arange(4, dtype=np.float32),
            "step": np.int32(3), "rng": np.array([0, 5], np.uint32)}
    specs = {"w": P("data", "model"), "b": P(), "step": P(), "rng": P()}
    state = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    assert len(state["w"].addressable_shards) == 8
    with Checkpointer(sys.argv[1], fingerprint={"base": "b", "plan": "p", "model": "m"}, keep=1,
                      keep_best=False, best_metric=None) as ck:
        ck.save(3, state, extra={"n": 1})
        ck.wait()
        got, extra = ck.restore({k: np.zeros_like(v) for k, v in host.items()})
    assert extra == {"n": 1}
    for k, v in host.items():
        assert isinstance(got[k], np.ndarray) and got[k].dtype == np.asarray(v).dtype, (k, type(got[k]))
        np.testing.assert_array_equal(got[k], v)
    print("SHARDED-OK")
    """
)


def test_state_sharded_over_a_mesh_restores_on_the_host(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


_TWO_PROCESSES = textwrap.dedent(
    """
    import os, sys, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    pid, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from spafit_jax.training.checkpoint import Checkpointer
    from tests.test_checkpoint import _fp, tiny_state
    host = tiny_state(seed=3, updates=2)
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
    mesh = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i]), host)
    assert jax.process_count() == 2 and not mesh.step.is_fully_addressable
    with Checkpointer(folder, fingerprint=_fp(), keep=1, keep_best=True, best_metric="acc") as ck:
        ck.save(1, mesh, extra={"s": 1}, metrics={"acc": 0.3})  # mesh mode: arrays over both processes
        ck.save(2, host, extra={"s": 2}, metrics={"acc": 0.1})  # pmap mode: host numpy on each process
        ck.save(3, host, extra={"s": 3})
        ck.wait()
        for step in (1, 3):
            got, extra = ck.restore(tiny_state(seed=0), step=step)
            assert extra == {"s": step}, extra
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(host)):
                assert isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    print(pid, "TWO-OK", sorted(os.listdir(folder)))
    """
)


def test_two_processes_save_and_restore_together(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(pid), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
        # Both processes see step 1 (the best) and step 3 (the latest); step 2 was pruned.
        assert p.returncode == 0 and f"{pid} TWO-OK ['1', '3']" in out, err[-3000:]
