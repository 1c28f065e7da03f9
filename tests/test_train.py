"""End-to-end runs of `python -m spafit_jax.train` on a tiny BERT and on MiniLM with BBC News slices."""

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from spafit_jax.config import files as config_lib
from spafit_jax.training import results
from spafit_jax.errors import CheckpointError
from spafit_jax.methods import FROZEN
from spafit_jax.train import main
from spafit_jax.training.trainer import train_and_evaluate
from tests.parallel_worker import signal_after_records



def small(model_dir, *extra):
    return [f"model.name={model_dir}", "data.limit_train=64", "data.limit_eval=24", "data.max_length=32",
            "train.batch_size=8", "train.eval_batch_size=8", "method.n1=1", "method.n2=2", "train.log_every=2",
            *extra]


def cfg(model_dir, *extra):
    return config_lib.load_config([], small(model_dir, *extra))


def data_labels():
    from spafit_jax.data import tasks

    return list(tasks.get_task("bbc_news").label_names)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} read back from the event files in `folder` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(folder.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value or (v.tensor.float_val or [0.0])[0]))
    return out


def test_short_run_writes_results_metrics_config_and_tensorboard(tiny_model_dir, tmp_path, capsys):
    run = train_and_evaluate(cfg(tiny_model_dir, "train.max_steps=6", "train.eval_every=4"), tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("task", "method", "trainable_params", "total_params", "eval", "train_seconds", "examples_per_second"):
        assert key in res, key
    assert res["task"] == "bbc_news" and res["method"] == "spafit" and res["steps"] == 6
    assert 0 < res["trainable_params"] < res["total_params"] and set(res["eval"]) == {"accuracy", "macro_f1"}
    assert res["compiled_shapes"] <= len(res["buckets"])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "kind" not in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all({"loss", "learning_rate"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [4, 6] and "accuracy" in evals[0]
    assert res["eval"]["accuracy"] == evals[-1]["accuracy"]
    assert config_lib.load_config([str(tmp_path / "config.yaml")]).train.max_steps == 6
    assert f"--config {tmp_path / 'config.yaml'}\n" in (tmp_path / "config.yaml").read_text()  # names itself
    assert not list(tmp_path.glob("*.tmp"))
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [(step, v) for step, v in scalars["train/loss"]] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert scalars["eval/validation/accuracy"] == [(r["step"], pytest.approx(r["accuracy"])) for r in evals]
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()  # the folder alone reloads the run
    assert json.loads((tmp_path / "task.json").read_text())["label_names"] == data_labels()
    out = capsys.readouterr().out
    assert "trainable" in out and "accuracy" in out and "examples/s" in out
    assert run.results == results.read(tmp_path) and run.results.to_json() == res


@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "head_only"])
def test_baselines_run_from_the_same_entry_point(tiny_model_dir, tmp_path, method):
    res = train_and_evaluate(cfg(tiny_model_dir, f"method.name={method}", "train.max_steps=2"), tmp_path).results
    counts = res.params_by_label
    assert res.method == method
    if method == "full":
        assert FROZEN not in counts and counts["weight"] > 0
    elif method == "head_only":
        assert set(counts) == {"head", "pooler", "frozen"}
    else:
        assert ("lora" in counts) == (method == "lora") and ("bias" in counts) == (method == "bitfit")


def test_minilm_on_a_slice_of_bbc_news_learns(tmp_path):
    c = config_lib.load_config([], ["data.limit_train=96", "data.limit_eval=48", "data.max_length=64",
                                    "train.batch_size=16", "train.eval_batch_size=16", "train.max_steps=6",
                                    "train.lr=2e-3", "method.n1=2", "method.n2=4", "train.log_every=1"])
    res = train_and_evaluate(c, tmp_path).results
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "kind" not in r]
    assert losses[-1] < losses[0]
    assert res.eval["accuracy"] > 0.4  # 5 classes: chance is 0.2


def test_resume_is_exact(tiny_model_dir, tmp_path):
    """20 steps straight == 10 steps, interrupt, resume 10 (params, optimizer state, step)."""
    c = cfg(tiny_model_dir, "train.max_steps=20", "train.epochs=4")
    straight = train_and_evaluate(c, tmp_path / "a")
    stopped = train_and_evaluate(c, tmp_path / "b", stop_after=10)
    assert (stopped.results, stopped.step, stopped.interrupted) == (None, 10, False)
    assert not (tmp_path / "b/results.json").exists()
    resumed = train_and_evaluate(c, tmp_path / "b")
    assert int(resumed.state.step) == 20
    leaves = lambda s: jax.tree_util.tree_leaves((s.trainable, s.opt_state, s.step))  # noqa: E731
    for a, b in zip(leaves(straight.state), leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.results.eval == straight.results.eval


def test_resume_with_another_base_model_is_refused(tiny_model_dir, tmp_path, capsys):
    train_and_evaluate(cfg(tiny_model_dir, "train.max_steps=8"), tmp_path, stop_after=2)
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config_yaml = (tmp_path / "config.yaml").read_text()
    other = small("minilm", "train.max_steps=8")
    assert main(["--workdir", str(tmp_path), *other]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "different base model" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    with pytest.raises(CheckpointError, match="plan"):
        train_and_evaluate(cfg(tiny_model_dir, "train.max_steps=8", "method.n1=0"), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == config_yaml  # a refused resume keeps the run's config
    assert not (tmp_path / ".lock").exists()


def test_resume_that_forms_other_batches_is_refused(tiny_model_dir, tmp_path, capsys):
    """A resume keeps the run's batching: other settings are one line naming the field; a config.yaml written
    before grouping and fitted shapes (or packing) became the defaults holds the run to the older ones."""
    old = ["train.max_steps=8", "data.packing=false", "data.group_by_length=false", "data.max_shapes=null"]
    train_and_evaluate(cfg(tiny_model_dir, *old), tmp_path, stop_after=1)
    capsys.readouterr()
    config_yaml = (tmp_path / "config.yaml").read_text()
    for changed, field in ((["data.group_by_length=true"], "data.group_by_length"),
                           (["data.max_shapes=4"], "data.max_shapes"), (["data.buckets=[16,32]"], "data.buckets")):
        assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, *old, *changed)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path} was trained with {field}=") and err.count("\n") == 1, err
    assert (tmp_path / "config.yaml").read_text() == config_yaml
    # A config.yaml from before the fields' defaults changed: absent fields mean the older defaults.
    assert "  packing: false\n" in config_yaml
    (tmp_path / "config.yaml").write_text(config_yaml.replace("  max_shapes: null\n", "").replace(
        "  group_by_length: false\n", "").replace("  packing: false\n", ""))
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=8")]) == 2
    err = capsys.readouterr().err
    assert "with data.max_shapes=null, data.group_by_length=false, data.packing=false (" in err
    assert "resume with data.max_shapes=null data.group_by_length=false data.packing=false," in err
    assert train_and_evaluate(cfg(tiny_model_dir, *old), tmp_path, stop_after=1).step == 2


def test_finished_run_is_not_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    args = ["--workdir", str(tmp_path), *small(tiny_model_dir, "train.max_steps=2")]
    assert main(args) == 0
    first = (tmp_path / "results.json").read_text()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == first
    assert main([*args, "--overwrite"]) == 0


def test_config_errors_exit_2_before_loading_anything(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "train.lr=-1"]) == 2
    assert main(["--workdir", str(tmp_path), "trian.lr=1"]) == 2
    assert main(["--workdir", str(tmp_path), "data.task=nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)
    assert not list(tmp_path.iterdir())


def test_bad_rows_are_a_clear_error(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nfine text,0\n,1\n")
    rc = main(["--workdir", str(tmp_path / "run"), f"model.name={tiny_model_dir}", "data.task=local",
               f"data.train_file={train}", f"data.eval_file={train}"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.csv" in err and "row 2" in err


def test_sigterm_saves_a_loadable_checkpoint_and_the_rerun_finishes(tiny_model_dir, tmp_path):
    rc, err = signal_after_records(
        tmp_path, small(tiny_model_dir, "train.max_steps=400", "train.epochs=100", "train.log_every=1"), signal.SIGTERM)
    assert rc == 0, err
    assert "checkpoint saved" in err
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and not (tmp_path / "results.json").exists()
    # the rerun resumes from that checkpoint (fewer steps left) and finishes
    res = train_and_evaluate(cfg(tiny_model_dir, "train.max_steps=400", "train.epochs=100", "train.log_every=1"),
                             tmp_path, stop_after=1)
    assert res.results is None and res.step == max(steps) + 1


def test_the_command_line_keeps_compiled_steps_in_a_user_cache_unless_told_otherwise(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.parallel_worker import env, tiny_run

    # No cache folder chosen by the environment: the command line picks its own, under XDG_CACHE_HOME.
    e = {k: v for k, v in env(1).items() if k not in ("JAX_COMPILATION_CACHE_DIR", "SPAFIT_COMPILE_CACHE")}
    e.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def cli(name):
        argv = [sys.executable, "-m", "spafit_jax.train", *tiny_run(tiny_model_dir), "train.max_steps=2",
                "--workdir", str(tmp_path / name)]
        done = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    default = tmp_path / "xdg" / "spafit_jax" / "jax"
    probe = "from spafit_jax.training.compiling import use_compile_cache; print(use_compile_cache())"
    for setting, expect in (("off", "None"), (str(tmp_path / "mine"), str(tmp_path / "mine")), ("", str(default))):
        out = subprocess.run([sys.executable, "-c", probe], env={**e, "SPAFIT_COMPILE_CACHE": setting},
                             capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == expect, out.stderr[-2000:]
    assert not default.exists()  # nothing compiled yet
    cli("default")
    entries = {p.name for p in default.iterdir()}
    assert any(n.endswith("-cache") for n in entries), entries  # JAX's cache entries
    cli("again")  # the same shapes: loaded, nothing new written
    assert {p.name for p in default.iterdir()} == entries
