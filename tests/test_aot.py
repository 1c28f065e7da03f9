"""Tests of `python -m spafit_jax.aot`: the trainer's steps compiled for TPU topologies on the CPU.

Compiling for a TPU needs libtpu (`make test` installs it). Without it these tests skip, unless
SPAFIT_REQUIRE_REFERENCE=1 (CI), where a missing libtpu fails. A tiny model (dimensions that are
multiples of 128, so the TPU's tiled layouts pad little), few programs: one single-host topology
(v5e:2x2, 4 chips) in process, one multi-host topology (v4:2x2x2, 8 chips on 2 hosts) through the
command line.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
REQUIRE = os.environ.get("SPAFIT_REQUIRE_REFERENCE") == "1"
TINY = dict(model_type="bert", vocab_size=1024, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=256, max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu")
ARGS = ["data.packing=false", "data.max_length=64", "data.buckets=[32,64]", "train.batch_size=16", "train.eval_batch_size=16"]


@pytest.fixture
def libtpu():
    """Skips (or, under SPAFIT_REQUIRE_REFERENCE=1, fails) when libtpu is not installed."""
    if not HAVE_LIBTPU:
        if REQUIRE:
            pytest.fail(f"SPAFIT_REQUIRE_REFERENCE=1 but libtpu is not installed: {tpu_specs.install_hint()}")
        pytest.skip(f"libtpu is not installed ({tpu_specs.install_hint()}; `make test` installs it)")
    tpu_specs.prepare()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aot_tiny")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def _cfg(tiny_dir, *overrides):
    from spafit_jax.config.files import load_config

    return load_config([], [f"model.name={tiny_dir}", "data.task=sst2", *ARGS, *overrides])


@pytest.fixture(scope="module")
def spafit_v5e(tiny_dir):
    """SPAFIT's train and eval steps at the longest bucket on v5e:2x2 (4 chips, 1 host)."""
    if not HAVE_LIBTPU:
        return None
    from spafit_jax.tpu import ahead

    tpu_specs.prepare()
    return ahead.run(_cfg(tiny_dir), "v5e:2x2", shapes="largest")


def _param_bytes(setup, which):
    """Unpadded float32 bytes of the trainable or frozen parameters, counted from the shapes and labels."""
    import jax
    import numpy as np

    trainable, frozen = setup.plan.split(setup.params)
    tree = trainable if which == "trainable" else frozen
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def test_topology_names_and_errors():
    assert tpu_specs.parse_topology("v5litepod-8")[1] == "v5e:2x4"
    assert tpu_specs.parse_topology("v4-8")[1] == "v4:2x2x1"  # 8 TensorCores, 4 megacore chips
    assert tpu_specs.parse_topology("v5p-128")[1] == "v5p:4x4x4"
    assert tpu_specs.parse_topology("V5E:16x16")[0].name == "v5e"
    for bad in ("v5e:2x2x1", "v9-8", "v4-12", "gpu"):
        with pytest.raises(ConfigError, match="topology"):
            tpu_specs.parse_topology(bad)


def test_model_flops_counts_forward_and_backward(tiny_dir):
    import jax
    import jax.numpy as jnp

    from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
    from spafit_jax.training.plan import make_plan
    from spafit_jax.config.schema import MethodConfig

    config = BertConfig.from_dict(TINY)
    b, t, d, i, c = 4, 16, 128, 256, 2
    forward = 3 * (2 * b * t * (4 * d * d + 2 * d * i) + 4 * b * t * t * d) + 2 * b * (d * d + d * c)
    counts = {}
    for name in ("full", "spafit", "bitfit"):
        plan = make_plan(MethodConfig(name=name), 3)
        model = BertForSequenceClassification(config, lora=plan.lora, num_labels=c)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        plan = plan.label(params)
        counts[name] = [tpu_specs.model_flops(params, plan, config, b, t, train=train) for train in (False, True)]
    assert counts["full"][0] == forward
    assert counts["full"][1] == 3 * forward  # activation and weight gradients of every matrix
    assert counts["bitfit"][1] < counts["full"][1]  # no weight gradients of frozen kernels
    assert counts["spafit"][1] < counts["bitfit"][1]  # no backward pass below layer n1


def test_prepare_says_what_to_install(monkeypatch):
    monkeypatch.setattr(tpu_specs, "libtpu_version", lambda: None)
    with pytest.raises(tpu_specs.AotError, match=r"libtpu.*not installed.*pip install \"jax\[tpu\]=="):
        tpu_specs.prepare()


def test_prepare_refuses_a_libtpu_that_does_not_match_jax(monkeypatch, libtpu):
    monkeypatch.setattr(tpu_specs, "libtpu_version", lambda: "0.0.1")
    with pytest.raises(tpu_specs.AotError, match="libtpu 0.0.1 does not match jax"):
        tpu_specs.prepare()


def test_single_host_figures_match_the_shapes(libtpu, spafit_v5e):
    rows, setup, _ = spafit_v5e
    assert [r["program"] for r in rows] == ["train[B=16,T=64]", "eval[B=16,T=64]"]
    frozen, trainable = _param_bytes(setup, "frozen"), _param_bytes(setup, "trainable")
    for r in rows:
        assert (r["chips"], r["hosts"], r["fits"]) == (4, 1, True)
        # XLA's own argument size is exactly what the arguments' shapes hold, padded to the TPU's tiles
        assert r["argument_bytes"] == r["frozen_bytes"] + r["trainable_bytes"] + r["optimizer_bytes"] + r["batch_bytes"]
        assert frozen <= r["frozen_bytes"] <= 1.1 * frozen  # replicated: every chip holds all of it
        assert trainable <= r["trainable_bytes"]
        assert r["model_flops_per_chip"] <= r["flops_per_chip"]  # XLA also counts element-wise work
        assert r["hbm_per_chip_bytes"] >= r["argument_bytes"] and r["est_step_seconds"] > 0
    train, evaluate = rows
    assert evaluate["optimizer_bytes"] == 0 and train["optimizer_bytes"] >= 2 * trainable  # Adam's mu and nu
    assert train["flops_per_chip"] > evaluate["flops_per_chip"]


def test_too_large_batch_is_refused_and_full_needs_far_more_optimizer_state(libtpu, spafit_v5e, tiny_dir, capsys,
                                                                             monkeypatch):
    from spafit_jax import aot

    real = tpu_specs.prepare  # main turns the persistent compile cache off: not in this shared test process
    monkeypatch.setattr(tpu_specs, "prepare", lambda compile_cache=True: real())
    code = aot.main(["--topology", "v5e:2x2", "--shapes", "largest", "--steps", "train", "--json", f"model.name={tiny_dir}",
                     "data.task=sst2", "method.name=full", *ARGS, "train.batch_size=4194304"])
    out, err = capsys.readouterr()
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: train[B=4194304,T=64] does not fit on v5e:2x2") and "train.batch_size" in line
    full = json.loads(out.splitlines()[0])
    spafit = spafit_v5e[0][0]
    assert not full["fits"] and full["hbm_per_chip_bytes"] > full["hbm_capacity_bytes"]
    assert spafit["optimizer_bytes"] < 0.1 * full["optimizer_bytes"]
    assert full["trainable_bytes"] >= _param_bytes(spafit_v5e[1], "frozen")  # full trains what spafit freezes


def test_multi_host_command_line(libtpu, tiny_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.run([sys.executable, "-m", "spafit_jax.aot", "--topology", "v4:2x2x2", "--json", "--shapes",
                           "largest", f"model.name={tiny_dir}", "data.task=sst2", *ARGS],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["program"] for r in rows] == ["train[B=16,T=64]", "eval[B=16,T=64]"]
    for r in rows:
        assert (r["chips"], r["hosts"], r["rows_per_host"]) == (8, 2, 8)  # 16 rows: 8 per host, 2 per chip
        assert (r["model"], r["method"]) == (str(tiny_dir), "spafit")  # which run each JSON line describes
        assert r["argument_bytes"] == r["frozen_bytes"] + r["trainable_bytes"] + r["optimizer_bytes"] + r["batch_bytes"]
        assert r["fits"] and r["hbm_capacity_bytes"] == tpu_specs.CHIPS["v4"].hbm_bytes


def _stand_in(monkeypatch, need, cap, chips=4, grad_accum=2):
    """A setup whose compiler is a stand-in: HBM per chip `need(batch)`, capacity `cap`; and the batches compiled."""
    from types import SimpleNamespace

    from spafit_jax.tpu import ahead

    calls = []

    def fake_compile(s, kind, batch, length):
        calls.append(batch)
        return {"global_batch": batch, "hbm_per_chip_bytes": need(batch), "fits": need(batch) <= cap}

    monkeypatch.setattr(ahead, "compile_program", fake_compile)
    s = SimpleNamespace(topo=SimpleNamespace(devices=[0] * chips, chip=SimpleNamespace(hbm_bytes=cap)),
                        cfg=SimpleNamespace(train=SimpleNamespace(grad_accum=grad_accum)))
    return s, fake_compile, calls


@pytest.mark.parametrize("fixed, per_row, power", [(3e9, 2.5e6, 1.0), (1e9, 7.3e6, 1.3), (2e7, 8e6, 0.8)])
def test_max_batch_finds_the_largest_multiple_that_fits(monkeypatch, fixed, per_row, power):
    """The search on a stand-in compiler whose HBM grows with the batch linearly, faster (power 1.3) or slower
    (0.8, as XLA's TPU compile of the tiny model did: 11.8 GiB at 56,712 rows, 17.1 at 113,396)."""
    from spafit_jax.tpu import ahead

    cap, unit = 15 * 2**30, 8
    need = lambda b: fixed + per_row * b ** power  # noqa: E731
    s, fake_compile, calls = _stand_in(monkeypatch, need, cap)
    best, probes, bounded = ahead.max_batch(s, 128, known=fake_compile(s, "train", 32, 128), probes=12)
    expected = max(b for b in range(unit, 4 * ahead.MAX_ROWS_PER_CHIP + 1, unit) if need(b) <= cap)
    assert best == expected and not bounded
    assert len(calls) <= 13 and (power != 1.0 or len(calls) <= 5)  # a linear need: the line, then one unit up
    assert [p["global_batch"] for p in probes] == sorted(set(calls))


def test_max_batch_stops_at_its_bound_and_says_so(monkeypatch):
    """A model so small that every batch fits: the search stops at MAX_ROWS_PER_CHIP per chip, never above."""
    from spafit_jax.tpu import ahead

    s, fake_compile, calls = _stand_in(monkeypatch, lambda b: 1e6 + 100 * b, 15 * 2**30)
    best, probes, bounded = ahead.max_batch(s, 64, known=fake_compile(s, "train", 16, 64))
    assert bounded and best == 4 * ahead.MAX_ROWS_PER_CHIP and max(calls) == best and len(calls) <= 3


def test_max_batch_of_a_batch_that_does_not_fit_is_zero(monkeypatch):
    from spafit_jax.tpu import ahead

    s, fake_compile, calls = _stand_in(monkeypatch, lambda b: 20 * 2**30, 15 * 2**30)
    assert ahead.max_batch(s, 64, known=fake_compile(s, "train", 16, 64))[::2] == (0, False)
