"""The frozen-stratum cache (`train.cache_frozen`): the split model, the cache, and training from it.

With dropout off, training from the cache must give the losses, parameters, optimizer state and
eval metrics of training without it (to 1e-5): on one device, with length-grouped batches, after
a resume, with the mesh and pmap drivers on 8 simulated CPU devices, and on 2 processes x 2 CPU
devices (each process builds its cache); the subprocess runs are compared with the one-device run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafit_jax.config import files as config_lib
from spafit_jax.data import batching
from spafit_jax.training import frozen
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.errors import ConfigError
from spafit_jax.train import main
from spafit_jax.training.trainer import train_and_evaluate
from tests.parallel_worker import (PYTHON, ROOT, Procs, assert_same_run, dropout_free_copy, env, free_ports, tail,
                                   tiny_run)

TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=24,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_lower_then_upper_is_the_whole_model_whatever_the_padding_holds(model_type):
    model = BertForSequenceClassification(BertConfig(**TINY, model_type=model_type), num_labels=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 7)))
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
    ids = jnp.where(mask > 0, ids, 1 if model_type == "roberta" else 0)
    variables = model.init(jax.random.key(0), ids, mask)
    whole = model.apply(variables, ids, mask)
    for n1 in (1, 2, 4):
        hidden = model.apply(variables, ids, mask, n1=n1, method="lower")
        assert hidden.shape == (2, 7, 16)
        zeroed = hidden.at[1, 4:].set(0.0)  # the cache pads with zeros
        np.testing.assert_allclose(model.apply(variables, zeroed, mask, n1=n1, method="upper"), whole, atol=1e-6)


def run_cfg(model_dir, *extra):
    """Bucketed batching (data.packing=false): the cache on packed rows is tests/test_packing.py's."""
    return config_lib.load_config([], [*tiny_run(model_dir), "data.packing=false", *extra])


@pytest.fixture(scope="module")
def nodrop(tiny_model_dir, tmp_path_factory):
    return dropout_free_copy(tiny_model_dir, tmp_path_factory.mktemp("nodrop") / "tiny")


@pytest.fixture(scope="module")
def reference(nodrop, tmp_path_factory):
    """The uncached runs: plain and length-grouped."""
    out = {}
    for name, extra in {"plain": [], "grouped": ["data.group_by_length=true", "data.bucket_multiple=8"]}.items():
        out[name] = tmp_path_factory.mktemp(name)
        train_and_evaluate(run_cfg(nodrop, *extra), out[name])
    return out


def test_cached_training_equals_uncached_without_dropout(nodrop, reference, tmp_path):
    run = train_and_evaluate(run_cfg(nodrop, "train.cache_frozen=true"), tmp_path / "cached")
    assert_same_run(tmp_path / "cached", reference["plain"])
    assert run.results.steps == 4 and run.results.frozen_cache["n1"] == 1
    assert run.results.frozen_cache["bytes"] > 0 and run.results.frozen_cache["seconds"] > 0


def test_cached_training_with_length_grouping(nodrop, reference, tmp_path):
    extra = ["data.group_by_length=true", "data.bucket_multiple=8", "train.cache_frozen=true"]
    train_and_evaluate(run_cfg(nodrop, *extra), tmp_path / "cached")
    assert_same_run(tmp_path / "cached", reference["grouped"])


def test_resume_rebuilds_the_cache(nodrop, reference, tmp_path):
    cfg = run_cfg(nodrop, "train.cache_frozen=true")
    first = train_and_evaluate(cfg, tmp_path / "run", stop_after=2)
    assert first.results is None and first.step == 2
    train_and_evaluate(cfg, tmp_path / "run")
    assert_same_run(tmp_path / "run", reference["plain"])


def test_bfloat16_cache_trains_close_to_float32(nodrop, tmp_path):
    run = train_and_evaluate(run_cfg(nodrop, "train.cache_frozen=true", "train.cache_dtype=bfloat16"), tmp_path)
    assert run.results.steps == 4 and np.isfinite(run.results.eval["accuracy"])


def test_cache_holds_real_lengths_and_its_batches_the_right_rows(nodrop):
    from spafit_jax.training import loading

    cfg = run_cfg(nodrop)
    run = loading.load_for_training(cfg)
    buckets = cfg.data.bucket_lengths()
    cache = frozen.build_cache(run.model, run.plan, run.params, run.task.train, cfg.train, 16, buckets)
    enc = run.task.train
    assert cache.n1 == 1 and cache.flat.shape == (int(enc.lengths.sum()), 32) and cache.flat.dtype == np.float32
    first = next(cache.attach(batching.train_batches(enc, 16, seed=0, epoch=1, buckets=buckets, start=2,
                                                     process_index=1, process_count=2, group_by_length=True,
                                                     with_rows=True)))
    rows = batching.train_order(enc.lengths, 16, seed=0, epoch=1, group_by_length=True)[2][8:]
    hidden = run.model.apply({"params": run.params}, first["input_ids"], first["attention_mask"],
                             first["token_type_ids"], n1=1, method="lower")
    real = first["attention_mask"][..., None] > 0
    assert first["hidden"].shape == hidden.shape and np.all(first["hidden"][~real[..., 0]] == 0)
    np.testing.assert_allclose(np.where(real, first["hidden"], 0), np.where(real, hidden, 0), atol=1e-5)
    np.testing.assert_array_equal(first["input_ids"], enc.input_ids[rows, :first["input_ids"].shape[1]])


@pytest.mark.parametrize("extra, words", [
    (["method.name=full"], "method full trains them"),
    (["method.name=spafit", "method.n1=0"], "with n1=0"),
    (["train.cache_max_gb=1e-9"], "above train.cache_max_gb=1e-09"),
])
def test_refusals_are_one_line(nodrop, tmp_path, capsys, extra, words):
    argv = [*tiny_run(nodrop), "data.packing=false", "train.cache_frozen=true", *extra]
    assert main(["--workdir", str(tmp_path), *[f"{a}" for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "train.cache" in err, err


def test_bad_cache_settings_fail_in_the_config():
    with pytest.raises(ConfigError, match="train.cache_dtype"):
        config_lib.load_config([], ["train.cache_dtype=float16"])
    with pytest.raises(ConfigError, match="train.cache_max_gb"):
        config_lib.load_config([], ["train.cache_max_gb=0"])


def test_mesh_and_pmap_on_8_devices_match_one_device_without_cache(nodrop, reference, tmp_path):
    runs = {"mesh": ["parallel.mode=mesh"], "pmap": ["parallel.mode=pmap", "train.grad_accum=2"]}
    with Procs() as procs:
        started = {name: procs.start([PYTHON, "-m", "spafit_jax.train", "--workdir", str(tmp_path / name),
                                      *tiny_run(nodrop), "data.packing=false", "train.cache_frozen=true", *extra],
                                     env(8, tmp_path / "tokens"), tmp_path / f"{name}.txt")
                   for name, extra in runs.items()}
        deadline = time.monotonic() + 600
        for name, proc in started.items():
            assert procs.wait(proc, deadline) == 0, tail(tmp_path / f"{name}.txt")
    for name in runs:
        res = (tmp_path / name / "results.json").read_text()
        assert '"devices": 8' in res and f'"parallel": "{name}"' in res
        assert_same_run(tmp_path / name, reference["plain"])


def test_two_processes_each_with_its_cache_match_one_device_without_cache(nodrop, reference, tmp_path):
    port = free_ports(1)[0]
    dist = ["distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2", "distributed.initialization_timeout=300"]
    with Procs() as procs:
        pair = [procs.start([PYTHON, str(ROOT / "tests" / "parallel_worker.py"), "train", "--workdir",
                             str(tmp_path / "two"), *tiny_run(nodrop), "data.packing=false", "train.cache_frozen=true", *dist,
                             f"distributed.process_id={i}"], env(2, tmp_path / "tokens"), tmp_path / f"p{i}.txt")
                for i in range(2)]
        deadline = time.monotonic() + 600
        for i, proc in enumerate(pair):
            assert procs.wait(proc, deadline) == 0, tail(tmp_path / f"p{i}.txt")
    res = (tmp_path / "two" / "results.json").read_text()
    assert '"processes": 2' in res and '"devices": 4' in res
    assert_same_run(tmp_path / "two", reference["plain"])
