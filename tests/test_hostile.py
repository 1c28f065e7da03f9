"""More hostile cases for the trainer (issue 10): absurd sizes, odd workdirs, damaged model folders, bad
data files, resumes with another model or plan. Each runs the CLI's entry point in-process and asserts
exit status 2, stderr one line (no traceback) and that the finished run in the workdir (run with
--overwrite, which must not touch it before everything is checked) or the stopped one (resumed) is
unchanged byte for byte."""

import json
import pickle
import shutil
from pathlib import Path

import pytest

from spafit_jax.training import rundir
from spafit_jax.train import main
from tests.test_faults import small, snapshot


def only_line(err: str) -> str:
    """stderr holds one line, an error, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished run (results.json, checkpoints, config.yaml, ...)."""
    work = tmp_path_factory.mktemp("finished")
    assert main(["--workdir", str(work), *small(tiny_model_dir)]) == 0
    return work


def refused(work, args, capsys, *, overwrite=True):
    """Runs main on `work` (a run folder); asserts exit 2, one line, and every file of `work` kept."""
    before = snapshot(work) if Path(work).exists() else None
    capsys.readouterr()
    assert main(["--workdir", str(work), *(["--overwrite"] if overwrite else []), *args]) == 2
    line = only_line(capsys.readouterr().err)
    if before is not None:
        assert snapshot(work) == before
        assert not (Path(work) / rundir.LOCK).exists() and not list(Path(work).glob(".overwritten-*"))
    return line


# ------------------------------------------------------------------ settings: absurd, empty, malformed

SETTINGS = [
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["train.batch_size=-8"], "train.batch_size must be > 0"),
    (["train.batch_size=1000000000"], "lower train.batch_size"),
    (["train.grad_accum=1000000000"], "train.grad_accum"),
    (["train.epochs=0"], "train.epochs must be > 0"),
    (["train.max_steps=0"], "train.max_steps must be >= 1"),
    (["data.limit_train=0"], "data.limit_train must be >= 1"),
    (["data.limit_eval=0"], "data.limit_eval must be >= 1"),
    (["data.max_length=7"], "data.max_length must be >= 8"),
    (["data.max_length=1000000000"], "max_position_embeddings"),
    (["method.name=lora", "method.lora_rank=1000000000"], "method.lora_rank=1000000000 is above 32"),
    (["method.lora_rank=33"], "method.lora_rank=33 is above 32"),
    (["method.rank_pattern={layer: 100000}"], "rank_pattern['layer']=100000 is above 32"),
    (["train.lr=.nan"], "train.lr must be a number, got float nan"),
    (["train.max_grad_norm=.nan"], "train.max_grad_norm"),
    (["train.warmup_ratio=2"], "train.warmup_ratio must be in [0, 1]"),
    (["method.n1=100", "method.n2=200"], "method.n1=100 exceeds the 3 layers"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["train.lr"], "has no '='"),
    (["nosuch.key=1"], "unknown config section 'nosuch'"),
    (["train.nosuch=1"], "unknown config key 'train.nosuch'"),
    (["--config", "/nonexistent/run.yaml"], "not found"),
]


@pytest.mark.parametrize("args,expect", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_bad_settings_are_one_line_and_the_finished_run_is_kept(finished, tiny_model_dir, capsys, args, expect):
    line = refused(finished, [*small(tiny_model_dir), *args], capsys)
    assert expect in line, line


def test_a_config_file_that_is_not_a_mapping_is_one_line(finished, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert "must hold a mapping" in refused(finished, ["--config", str(bad), *small(tiny_model_dir)], capsys)


def test_an_absurd_eval_batch_is_capped_not_allocated(tiny_model_dir, tmp_path, capsys):
    """train.eval_batch_size=10**9: the last eval batch is padded only up to the split (8 examples)."""
    assert main(["--workdir", str(tmp_path), *small(tiny_model_dir, "train.eval_batch_size=1000000000")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["eval"]["accuracy"] is not None


def local_data(tmp_path, train: str | bytes, name="train.csv"):
    f = tmp_path / name
    f.write_bytes(train if isinstance(train, bytes) else train.encode())
    e = tmp_path / "eval.csv"
    e.write_text("text,label\nfine,0\ngood,1\n")
    return ["data.task=local", f"data.train_file={f}", f"data.eval_file={e}", "data.limit_train=null",
            "data.limit_eval=null", "train.batch_size=2", "train.eval_batch_size=2"]


TRAIN_FILES = [
    ("empty", b"", "train.csv", ""),
    ("header only", b"text,label\n", "train.csv", "has a header (text, label) but no rows"),
    ("no label column", b"text,lab\na,0\nb,1\n", "train.csv", "no column 'label'"),
    ("no text column", b"txt,label\na,0\nb,1\n", "train.csv", "no column 'text'"),
    ("one class", b"text,label\na,0\nb,0\n", "train.csv", "at least 2"),
    ("bad jsonl line", b'{"text": "a", "label": 0}\n{"text": "b", "lab\n', "train.jsonl", "line 2"),
    ("unsupported type", b"text,label\na,0\n", "train.xlsx", "unsupported file type"),
    ("too many classes", b"text,label\na,0\nb,1\n", "train.csv", "larger than the whole embedding table"),
]


@pytest.mark.parametrize("name,content,fname,expect", TRAIN_FILES, ids=[t[0] for t in TRAIN_FILES])
def test_bad_train_files_are_one_line_and_the_finished_run_is_kept(finished, tiny_model_dir, tmp_path, capsys, name,
                                                                   content, fname, expect):
    extra = ["data.num_labels=1000000000"] if name == "too many classes" else []
    line = refused(finished, [*small(tiny_model_dir), *local_data(tmp_path, content, fname), *extra], capsys)
    assert expect in line and (name == "too many classes" or fname in line), line


def test_a_missing_or_folder_train_file_is_one_line(finished, tiny_model_dir, tmp_path, capsys):
    args = [*small(tiny_model_dir), *local_data(tmp_path, "x")]
    for path in (tmp_path / "missing.csv", tmp_path):
        args[-6] = f"data.train_file={path}"
        assert "does not exist" in refused(finished, args, capsys)


# ------------------------------------------------------------------ damaged model folders


def _torch_pickle(folder):
    class Code:
        def __reduce__(self):
            return (print, ("this would run",))

    (folder / "flax_model.msgpack").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings.word_embeddings.weight": Code()}))


def _truncate(name, size=100):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:size])
    return damage


def _config(change):
    def damage(folder):
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(change(raw)))
    return damage


MODELS = [
    ("pickle in pytorch_model.bin", _torch_pickle, "pickle that names code to run"),
    ("config.json missing", lambda f: (f / "config.json").unlink(), "no config.json"),
    ("config.json corrupt", lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    ("config.json a list", lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    ("model_type gpt2", _config(lambda r: {**r, "model_type": "gpt2"}), "gpt2"),
    ("hidden_size changed", _config(lambda r: {**r, "hidden_size": 64, "intermediate_size": 64}), "shape"),
    ("weights missing", lambda f: (f / "flax_model.msgpack").unlink(), "has no weights"),
    ("weights truncated", _truncate("flax_model.msgpack"), "truncated or corrupt"),
    ("safetensors garbage", lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00" * 50), "truncated or corrupt"),
    ("vocab missing", lambda f: [(f / n).unlink() for n in ("vocab.txt", "tokenizer.json")], "without a vocabulary"),
]


@pytest.mark.parametrize("name,damage,expect", MODELS, ids=[m[0] for m in MODELS])
def test_damaged_model_folders_are_one_line_and_the_finished_run_is_kept(finished, tiny_model_dir, tmp_path, capsys,
                                                                         name, damage, expect):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    args = [*small(tiny_model_dir), f"model.name={folder}"]
    assert expect in refused(finished, args, capsys)


@pytest.mark.parametrize("name", ["a file", "missing"])
def test_a_model_name_that_is_no_folder_is_one_line(finished, tiny_model_dir, tmp_path, capsys, name):
    path = tmp_path / "file"
    if name == "a file":
        path.write_text("x")
    assert str(path) in refused(finished, [*small(tiny_model_dir), f"model.name={path}"], capsys)


# ------------------------------------------------------------------ odd workdirs


@pytest.mark.parametrize("where", ["/proc/self/nope", "/proc", "/dev/null", "under a file", "newline", "empty"])
def test_odd_workdirs_are_one_line(tiny_model_dir, tmp_path, capsys, where):
    (tmp_path / "file").write_text("kept")
    workdir = {"under a file": str(tmp_path / "file" / "run"), "newline": str(tmp_path / "run") + "\n",
               "empty": ""}.get(where, where)
    capsys.readouterr()
    assert main(["--workdir", workdir, *small(tiny_model_dir)]) == 2
    line = only_line(capsys.readouterr().err)
    assert "workdir" in line.lower() or where in line, line
    assert (tmp_path / "file").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------ resuming with other settings


@pytest.fixture(scope="module")
def stopped(tiny_model_dir, tmp_path_factory):
    """A run stopped at step 2 of 6 (checkpoint saved), as a preemption leaves it."""
    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    work = tmp_path_factory.mktemp("stopped")
    cfg = config_lib.load_config([], small(tiny_model_dir, "train.max_steps=6", "train.epochs=10"))
    assert train_and_evaluate(cfg, work, stop_after=2).step == 2
    return work


def _other_model(tiny_model_dir, folder):
    """The tiny model with other weights (every kernel scaled)."""
    import numpy as np
    from flax.serialization import msgpack_restore, msgpack_serialize
    from flax.traverse_util import flatten_dict, unflatten_dict

    shutil.copytree(tiny_model_dir, folder)
    tree = flatten_dict(msgpack_restore((folder / "flax_model.msgpack").read_bytes()))
    tree = {k: np.asarray(v) * 1.5 if k[-1] == "kernel" else v for k, v in tree.items()}
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(tree)))
    return folder


RESUMES = [
    ("other base model", None, "different base model"),
    ("other strata", ["method.n1=0", "method.n2=2"], "different trainability plan"),
    ("other method", ["method.name=bitfit"], "different trainability plan"),
    ("other lora rank", ["method.lora_rank=4"], "does not fit this run's state"),
]


@pytest.mark.parametrize("name,args,expect", RESUMES, ids=[r[0] for r in RESUMES])
def test_resuming_with_another_model_or_plan_is_refused_and_config_yaml_kept(stopped, tiny_model_dir, tmp_path,
                                                                            capsys, name, args, expect):
    if args is None:
        args = [f"model.name={_other_model(tiny_model_dir, tmp_path / 'other')}"]
    line = refused(stopped, small(tiny_model_dir, "train.max_steps=6", "train.epochs=10", *args), capsys,
                   overwrite=False)
    assert expect in line, line
