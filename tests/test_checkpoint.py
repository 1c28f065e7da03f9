"""Tests of spafit_jax.checkpoint (Orbax checkpoints + base/plan fingerprint)."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spafit_jax.checkpoint import Checkpointer, fingerprint
from spafit_jax.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    opt_state: optax.OptState
    rng: jax.Array


def _params(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "bert": {
            "encoder": {
                "layer": {
                    str(i): {
                        "attention": {"self": {"query": {"kernel": f(4, 4), "bias": f(4)}}},
                        "output": {"LayerNorm": {"scale": f(4), "bias": f(4)}},
                    }
                    for i in range(2)
                }
            }
        },
        "classifier": {"kernel": f(4, 3), "bias": f(3)},
    }


def _labels(params):
    def label(path, _):
        keys = [getattr(p, "key", "") for p in path]
        if keys[0] == "classifier":
            return "head"
        if keys[-1] == "bias" and "LayerNorm" not in keys and keys[3] == "1":
            return "bias"
        return "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def _split(params, labels):
    trainable = jax.tree.map(lambda p, l: None if l == "frozen" else p, params, labels)
    frozen = jax.tree.map(lambda p, l: p if l == "frozen" else None, params, labels)
    return trainable, frozen


def _state(seed=0, step=0):
    params = _params(seed)
    trainable, _ = _split(params, _labels(params))
    tx = optax.adam(1e-3)
    opt_state = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        trainable=trainable,
        opt_state=opt_state,
        rng=jax.random.fold_in(jax.random.key(0), seed),
    )


def _fp(seed=0, labels_fn=_labels, model="tiny"):
    params = _params(seed)
    labels = labels_fn(params)
    return fingerprint(_split(params, labels)[1], labels, model_name=model)


def _plain(tree):
    """Typed keys -> key data, so trees compare with np.testing."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree,
    )


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(_plain(a)), jax.tree.leaves(_plain(b))):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _ckpt(tmp_path, fp=None, **kw):
    kw.setdefault("keep_best", False)
    return Checkpointer(tmp_path / "ckpt", fingerprint=fp or _fp(), **kw)


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_skips_none():
    fp = _fp()
    assert set(fp) == {"base", "plan", "model"} and fp["model"] == "tiny"
    assert len(fp["base"]) == 64 and len(fp["plan"]) == 64
    assert _fp() == fp
    params = _params()
    labels = _labels(params)
    frozen = _split(params, labels)[1]
    # Host numpy leaves hash like device arrays; dict insertion order does not matter.
    as_numpy = jax.tree.map(np.asarray, frozen)
    reordered = dict(reversed(list(frozen.items())))
    assert fingerprint(as_numpy, labels, model_name="tiny")["base"] == fp["base"]
    assert fingerprint(reordered, labels, model_name="tiny")["base"] == fp["base"]
    # Trainable leaves (None in the frozen tree) do not enter the base hash.
    params2 = _params()
    params2["classifier"]["kernel"] = params2["classifier"]["kernel"] + 1.0
    assert fingerprint(_split(params2, labels)[1], labels, model_name="x")["base"] == fp["base"]


def test_fingerprint_changes_with_bytes_shape_dtype_and_plan():
    params = _params()
    labels = _labels(params)
    frozen = _split(params, labels)[1]
    base = fingerprint(frozen, labels, model_name="m")["base"]

    def variant(fn):
        f2 = jax.tree.map(lambda x: x, frozen)
        q = f2["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
        q["kernel"] = fn(q["kernel"])
        return fingerprint(f2, labels, model_name="m")["base"]

    assert variant(lambda k: k.at[0, 0].add(1e-6)) != base
    assert variant(lambda k: k.reshape(2, 8)) != base
    assert variant(lambda k: k.astype(jnp.bfloat16)) != base  # bfloat16 hashes too
    other_plan = _fp(labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p))
    assert other_plan["plan"] != _fp()["plan"]
    assert _fp(seed=1)["base"] != _fp()["base"] and _fp(seed=1)["plan"] == _fp()["plan"]


# ----------------------------------------------------------------------------- save/restore


def test_round_trip_train_state_and_extra(tmp_path):
    state = _state(seed=3, step=7)
    extra = {"epoch": 1, "batch_in_epoch": 12, "seed": 3, "metrics": {"loss": np.float32(0.25)}}
    with _ckpt(tmp_path) as ck:
        assert ck.latest_step() is None
        assert ck.save(7, state, extra=extra)
        ck.wait()
        assert ck.latest_step() == 7
    # A fresh Checkpointer (a new process on resume) sees the step and restores it.
    with _ckpt(tmp_path) as ck:
        assert ck.latest_step() == 7
        template = _state(seed=0, step=0)
        restored, got_extra = ck.restore(template)
    _assert_tree_equal(restored, state)
    assert isinstance(restored, TrainState)
    assert restored.rng.dtype == state.rng.dtype  # typed key comes back typed
    assert restored.trainable["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"][
        "kernel"
    ] is None
    assert got_extra == {"epoch": 1, "batch_in_epoch": 12, "seed": 3, "metrics": {"loss": 0.25}}
    # The random stream continues exactly.
    np.testing.assert_array_equal(
        jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,))
    )


def test_restore_host_leaves_and_abstract_template(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "n": 5, "x": np.float32(1.5), "k": jax.random.key(9)}
    with _ckpt(tmp_path) as ck:
        ck.save(1, state, extra={})
        ck.wait()
        abstract = {
            "w": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=state["w"].sharding),
            "n": 0,
            "x": np.float32(0),
            "k": jax.eval_shape(lambda: jax.random.key(0)),
        }
        got, _ = ck.restore(abstract)
    assert isinstance(got["n"], int) and got["n"] == 5
    assert isinstance(got["x"], np.float32) and got["x"] == 1.5
    np.testing.assert_array_equal(got["w"], state["w"])
    np.testing.assert_array_equal(jax.random.key_data(got["k"]), jax.random.key_data(state["k"]))


def test_save_is_safe_against_donation_and_skips_existing_steps(tmp_path):
    with _ckpt(tmp_path) as ck:
        state = {"w": jnp.arange(1000.0)}
        assert ck.save(1, state, extra={"a": 1})
        state["w"].delete()  # what a donating train step does to the old buffers
        ck.wait()
        got, extra = ck.restore({"w": jnp.zeros(1000)})
        np.testing.assert_array_equal(got["w"], np.arange(1000.0))
        assert not ck.save(1, got, extra={"a": 2})  # exists: nothing written
        assert ck.restore({"w": jnp.zeros(1000)})[1] == {"a": 1}


def test_restore_specific_step_and_missing_step(tmp_path):
    with _ckpt(tmp_path, keep=3) as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ck.restore({"w": jnp.zeros(2)})
        for s in (1, 2):
            ck.save(s, {"w": jnp.full(2, float(s))}, extra={"s": s})
        ck.wait()
        got, extra = ck.restore({"w": jnp.zeros(2)}, step=1)
        assert extra == {"s": 1} and float(got["w"][0]) == 1.0
        with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
            ck.restore({"w": jnp.zeros(2)}, step=5)


def test_keep_last_n(tmp_path):
    with _ckpt(tmp_path, keep=2) as ck:
        for s in range(1, 6):
            assert ck.save(s, {"w": jnp.full(2, float(s))}, extra={})
        ck.wait()
        assert ck.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "5"]


@pytest.mark.parametrize("mode,scores,best", [("max", [0.9, 0.5, 0.6, 0.7, 0.8], 1),
                                              ("min", [0.5, 0.2, 0.9, 0.8, 0.7], 2)])
def test_best_is_kept_beyond_last_n(tmp_path, mode, scores, best):
    kw = dict(keep=2, keep_best=True, best_metric="acc", best_mode=mode)
    with _ckpt(tmp_path, **kw) as ck:
        for s, v in enumerate(scores[:3], start=1):
            ck.save(s, {"w": jnp.full(2, float(s))}, extra={}, metrics={"acc": v, "loss": 1.0})
        ck.wait()
    # Resume in a new Checkpointer: the ranking is read back from disk.
    with _ckpt(tmp_path, **kw) as ck:
        for s, v in enumerate(scores[3:], start=4):
            ck.save(s, {"w": jnp.full(2, float(s))}, extra={}, metrics={"acc": v})
        ck.save(6, {"w": jnp.full(2, 6.0)}, extra={})  # no metrics: kept only as recent
        ck.save(7, {"w": jnp.full(2, 7.0)}, extra={}, metrics={"loss": 0.1})  # no "acc"
        ck.wait()
        assert ck.all_steps() == sorted({best, 6, 7})
        assert ck.best_step() == best
        assert ck.metrics(best)["acc"] == scores[best - 1]
        got, _ = ck.restore({"w": jnp.zeros(2)}, step=best)
        assert float(got["w"][0]) == best


def test_keep_best_needs_metric(tmp_path):
    with pytest.raises(ValueError, match="best_metric"):
        Checkpointer(tmp_path, fingerprint=_fp(), keep_best=True)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, fingerprint=_fp(), keep=0, keep_best=False)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("other", [
    dict(seed=1, model="bert-base"),  # other weights, other name
    dict(seed=1, model="minilm"),  # same name (a local folder), other weights
    dict(seed=1, model="bert-base", labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p)),
])
def test_other_base_model_is_refused(tmp_path, other):
    with _ckpt(tmp_path, fp=_fp(seed=0, model="minilm")) as ck:
        ck.save(1, _state(), extra={})
    with _ckpt(tmp_path, fp=_fp(**other)) as ck:
        with pytest.raises(CheckpointError) as err:
            ck.restore(_state())
    msg = str(err.value)
    assert "different base model (minilm)" in msg
    assert str(tmp_path / "ckpt") in msg and "new --workdir" in msg and "\n" not in msg


def test_other_plan_is_refused(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, _state(), extra={})
    # Same model; another plan also freezes other leaves, so "base" differs as well.
    other = _fp(labels_fn=lambda p: jax.tree.map(lambda _: "frozen", p))
    assert other["base"] != _fp()["base"]
    with _ckpt(tmp_path, fp=other) as ck:
        with pytest.raises(CheckpointError, match="different trainability plan.*n1 / n2 / LoRA"):
            ck.restore(_state())
        with pytest.raises(CheckpointError, match="trainability plan"):
            ck.read_meta()


def test_state_that_does_not_fit_is_refused(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(2)}, extra={})
        ck.wait()
        with pytest.raises(CheckpointError, match=r"a is float32\[2, 3\] there but float32\[3, 2\]"):
            ck.restore({"a": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match=r"lacks \['c'\]"):
            ck.restore({"a": jnp.zeros((2, 3)), "b": jnp.zeros(2), "c": jnp.zeros(1)})
        with pytest.raises(CheckpointError, match=r"extra leaves \['b'\]"):
            ck.restore({"a": jnp.zeros((2, 3))})


def test_corrupt_checkpoint_is_an_error_with_its_path(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": jnp.arange(64.0)}, extra={})
        ck.save(2, {"w": jnp.arange(64.0)}, extra={})
    step1 = tmp_path / "ckpt" / "1"
    step2 = tmp_path / "ckpt" / "2"
    for root, _, files in os.walk(step2 / "state"):
        for name in files:
            if "ocdbt" in root or os.path.basename(root) == "d" or name.endswith(".ocdbt"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\x00garbage")
    (step1 / "meta" / "metadata").write_text("{not json")
    with _ckpt(tmp_path) as ck:
        with pytest.raises(CheckpointError, match=f"checkpoint {step2} is unreadable"):
            ck.restore({"w": jnp.zeros(64)})
        with pytest.raises(CheckpointError, match=f"checkpoint {step1} is unreadable"):
            ck.restore({"w": jnp.zeros(64)}, step=1)

    # Broken saved metrics already fail when the folder is opened, naming the step.
    kw = dict(keep_best=True, best_metric="acc")
    with Checkpointer(tmp_path / "b", fingerprint=_fp(), **kw) as ck:
        ck.save(3, {"w": jnp.ones(2)}, extra={}, metrics={"acc": 0.5})
    (tmp_path / "b" / "3" / "metrics" / "metrics").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'b' / '3'} is unreadable"):
        Checkpointer(tmp_path / "b", fingerprint=_fp(), **kw)


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    with _ckpt(tmp_path) as ck:
        ck.save(1, {"w": jnp.ones(2)}, extra={"s": 1})
    # What a crash mid-save leaves behind: a temporary folder, never renamed.
    tmp = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half_written").write_bytes(b"\x00")
    with _ckpt(tmp_path) as ck:
        assert ck.latest_step() == 1
        assert ck.restore({"w": jnp.zeros(2)})[1] == {"s": 1}
        ck.save(2, {"w": jnp.full(2, 2.0)}, extra={"s": 2})
        ck.wait()
        assert ck.latest_step() == 2 and ck.restore({"w": jnp.zeros(2)})[1] == {"s": 2}
    assert not tmp.exists()


# ----------------------------------------------------------------------------- sharding

_SHARDED = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from spafit_jax.checkpoint import Checkpointer
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    fp = {"base": "b", "plan": "p", "model": "m"}
    w = jnp.arange(32.0).reshape(8, 4)
    state = {"w": w, "b": jnp.arange(4.0), "step": jnp.int32(3), "rng": jax.random.key(5)}
    # Saved from one device (the default placement) ...
    assert len(state["w"].sharding.device_set) == 1
    with Checkpointer(sys.argv[1], fingerprint=fp, keep_best=False) as ck:
        ck.save(3, state, extra={"n": 1})
        ck.wait()
        # ... restored onto a 4x2 mesh, from concrete and from abstract templates.
        sh = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model")),
              "step": NamedSharding(mesh, P()), "rng": NamedSharding(mesh, P())}
        concrete = {k: jax.device_put(v, sh[k]) for k, v in
                    {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4), "step": jnp.int32(0),
                     "rng": jax.random.key(0)}.items()}
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k])
                    for k, v in concrete.items()}
        for template in (concrete, abstract):
            got, extra = ck.restore(template)
            assert extra == {"n": 1}
            for k in sh:
                assert got[k].sharding.is_equivalent_to(sh[k], got[k].ndim), (k, got[k].sharding)
            assert len(got["w"].addressable_shards) == 8
            assert {s.data.shape for s in got["w"].addressable_shards} == {(2, 2)}
            np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(w))
            np.testing.assert_array_equal(np.asarray(got["b"]), np.arange(4.0))
            np.testing.assert_array_equal(jax.random.key_data(got["rng"]),
                                          jax.random.key_data(state["rng"]))
    print("SHARDED-OK")
    """
)


def test_restore_honours_template_sharding_on_8_devices(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
