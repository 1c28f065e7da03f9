"""The pmap and mesh drivers on 8 simulated CPU devices give the numbers of one device.

Two subprocesses run at the same time. One, with
XLA_FLAGS=--xla_force_host_platform_device_count=8, trains the tiny BERT (dropout off) on a
slice of BBC News with every driver setting (mesh, pmap, gradient accumulation with both,
fsdp 2 and 4), runs the CLI entry point `train.main` on bad batch sizes, and records how
the fsdp mesh places the frozen base. The other trains the same config with
`python -m spafit_jax.train` on one device. Losses (metrics.jsonl), final state (trainable
parameters and optimizer state, read from the final checkpoint) and eval metrics must agree
to 1e-5.
"""

import json
import sys
import time

import jax
import pytest

from spafit_jax.training import parallel
from spafit_jax.errors import ConfigError
from spafit_jax.config.schema import PARALLEL_MODES, ParallelConfig
from tests.parallel_worker import PYTHON, ROOT, Procs, assert_same_run, dropout_free_copy, env, once, tail, tiny_run

pytestmark = pytest.mark.xdist_group("parallel")  # and `once` shares the runs if xdist splits the module
TIMEOUT = 600  # seconds for the whole module's subprocesses (a loaded 2-core machine; normally ~1 min)


RUNS_8 = {
    "mesh": ["parallel.mode=mesh"],
    "pmap": ["parallel.mode=pmap"],
    "mesh_accum": ["parallel.mode=mesh", "train.grad_accum=2"],
    "pmap_accum": ["parallel.mode=pmap", "train.grad_accum=2"],
    "fsdp2": ["parallel.mode=mesh", "parallel.fsdp=2"],
    "fsdp4": ["parallel.mode=mesh", "parallel.fsdp=4"],
}
ERRORS_8 = {
    "uneven": ["train.batch_size=12"],
    "zero_per_device": ["train.batch_size=4"],
    "zero_per_micro_batch": ["train.batch_size=8", "train.grad_accum=2"],
    "uneven_eval": ["train.eval_batch_size=20"],
}


def run_suite(tmp, model_dir):
    model = dropout_free_copy(model_dir, tmp / "tiny_no_dropout")
    tokens = tmp / "token_cache"
    spec = {"base": str(tmp / "d8"), "common": tiny_run(model), "runs": RUNS_8, "errors": ERRORS_8,
            "model": str(model), "fsdp": [2, 4]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    with Procs() as procs:
        eight = procs.start([PYTHON, str(ROOT / "tests" / "parallel_worker.py"), "suite", str(tmp / "spec.json"),
                             str(tmp / "out.json")], env(8, tokens), tmp / "d8.txt")
        one = procs.start([PYTHON, "-m", "spafit_jax.train", "--workdir", str(tmp / "one_device"), *tiny_run(model)],
                          env(1, tokens), tmp / "d1.txt")
        deadline = time.monotonic() + TIMEOUT
        assert procs.wait(eight, deadline) == 0, tail(tmp / "d8.txt")
        assert procs.wait(one, deadline) == 0, tail(tmp / "d1.txt")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_model_dir):
    tmp = once(tmp_path_factory, "parallel", lambda folder: run_suite(folder, tiny_model_dir))
    return {"tmp": tmp, "out": json.loads((tmp / "out.json").read_text())}


def test_the_runs_used_the_devices_and_drivers_asked_for(suite):
    assert suite["out"]["devices"] == 8
    assert {n: (r["devices"], r["parallel"]) for n, r in suite["out"]["runs"].items()} == {
        n: (8, "pmap" if n.startswith("pmap") else "mesh") for n in RUNS_8}
    one = json.loads((suite["tmp"] / "one_device" / "results.json").read_text())
    assert (one["devices"], one["processes"], one["parallel"]) == (1, 1, "mesh")


@pytest.mark.parametrize("name", ["mesh", "pmap"])
def test_driver_on_8_devices_matches_one_device(suite, name):
    assert_same_run(suite["tmp"] / "d8" / name, suite["tmp"] / "one_device")


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_gradient_accumulation_matches_one_big_batch(suite, mode):
    assert_same_run(suite["tmp"] / "d8" / f"{mode}_accum", suite["tmp"] / "d8" / mode)


@pytest.mark.parametrize("fsdp", [2, 4])
def test_fsdp_matches_replication(suite, fsdp):
    assert_same_run(suite["tmp"] / "d8" / f"fsdp{fsdp}", suite["tmp"] / "d8" / "mesh")


@pytest.mark.parametrize("fsdp", [2, 4])
def test_fsdp_shards_the_frozen_base(suite, fsdp):
    leaves = suite["out"]["fsdp"][str(fsdp)]
    assert all(leaf["equal"] for leaf in leaves.values())  # placing never changes a value
    emb = leaves["['bert']['embeddings']['word_embeddings']['embedding']"]  # [30522, 32]
    # Largest axis that fsdp divides: the vocabulary for 2, the hidden size for 4 (30522 = 2 x 15261).
    assert emb["spec"] == (["fsdp", None] if fsdp == 2 else [None, "fsdp"])
    assert emb["shard"] == ([30522 // 2, 32] if fsdp == 2 else [30522, 32 // 4])
    query = leaves["['bert']['encoder']['layer']['0']['attention']['self']['query']['kernel']"]  # [32, 32]
    assert "fsdp" in query["spec"] and query["shard"][0] * query["shard"][1] == 32 * 32 // fsdp
    small = leaves["['bert']['encoder']['layer']['0']['attention']['output']['LayerNorm']['scale']"]
    assert small["spec"] == [None] and small["shard"] == small["shape"]  # below MIN_SHARD_SIZE: replicated
    sharded = [k for k, v in leaves.items() if "fsdp" in v["spec"]]
    assert len(sharded) >= 3 * 6 + 2  # every layer's kernels and the embeddings


@pytest.mark.parametrize("name, words", [
    ("uneven", ["train.batch_size=12", "8 devices", "multiple of 8", "train.batch_size=16"]),
    ("zero_per_device", ["train.batch_size=4", "0 examples", "multiple of 8", "train.batch_size=8"]),
    ("zero_per_micro_batch", ["train.batch_size=8", "train.grad_accum=2", "0 examples", "multiple of 16"]),
    ("uneven_eval", ["train.eval_batch_size=20", "multiple of 8", "train.eval_batch_size=24"]),
])
def test_bad_batch_sizes_are_a_config_error_naming_the_field_and_the_fix(suite, name, words):
    err = suite["out"]["errors"][name]
    assert err["rc"] == 2 and "Traceback" not in err["stderr"], err["stderr"]
    errors = [line for line in err["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err["stderr"]
    line = errors[0]
    for word in words:
        assert word in line, (word, line)


def test_check_batch(monkeypatch):
    monkeypatch.setattr(parallel.jax, "device_count", lambda: 8)
    assert parallel.check_batch(16) == 2
    assert parallel.check_batch(32, grad_accum=2) == 2
    assert parallel.check_batch(8) == 1
    with pytest.raises(ConfigError, match=r"train.batch_size=12 does not split evenly over 8 devices; "
                                          r"set train.batch_size to a multiple of 8 \(e.g. train.batch_size=16\)"):
        parallel.check_batch(12)
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is smaller than the 8 devices: each device would get "
                                          r"0 examples; set train.batch_size to a multiple of 8 \(e.g. "
                                          r"train.batch_size=8\)"):
        parallel.check_batch(4)
    with pytest.raises(ConfigError, match=r"x train.grad_accum=4 micro-batches.*of 32.*lower train.grad_accum"):
        parallel.check_batch(16, grad_accum=4)
    with pytest.raises(ConfigError, match="train.eval_batch_size=0"):
        parallel.check_batch(0, "train.eval_batch_size")


def test_bad_parallel_settings_fail_in_the_config_and_the_mesh():
    with pytest.raises(ConfigError, match="parallel.mode must be one of mesh | pmap"):
        ParallelConfig(mode="dp")
    with pytest.raises(ConfigError, match="parallel.fsdp needs parallel.mode=mesh"):
        ParallelConfig(mode="pmap", fsdp=2)
    n = jax.device_count()
    with pytest.raises(ConfigError, match=f"parallel.fsdp={n + 1} does not divide the {n} devices"):
        parallel.make_mesh(n + 1)


def test_one_device_drivers_give_host_copies():
    import numpy as np

    for mode in PARALLEL_MODES:  # one driver for every mode the config accepts
        driver = parallel.make_driver(ParallelConfig(mode=mode), None, None, is_regression=False)
        assert driver.mode == mode
        tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(2.0)}
        back = driver.host_state(driver.put_state(tree))
        assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(back))
        np.testing.assert_array_equal(back["a"], tree["a"])
        assert back["b"] == 2.0 and back["b"].shape == ()
        rows = [{"x": np.arange(4, dtype=np.float32) + 4 * i} for i in range(2)]
        outputs = [driver.put_batch(r)["x"] for r in rows]
        np.testing.assert_array_equal(driver.gather(outputs), np.arange(8, dtype=np.float32))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
