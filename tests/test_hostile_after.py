"""Hostile cases after training (issue 21): export, predict, the reloaded run's API, PEFT import, task.json
and the experiment file, tried as a new user would. Each asserts exit status 2 (or the one SpafitError of an
API call), one `error:` line without a traceback, and that every user file around it -- the run folder, its
base model, the inputs, the outputs already there -- is unchanged byte for byte. One tiny run, trained once
for the module, serves every case; all commands run in-process."""

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from spafit_jax import experiment, export, predict
from spafit_jax.after_training import exporting
from spafit_jax.models import hf, peft_io, weights
from spafit_jax.after_training import outputs
from spafit_jax.errors import SpafitError
from spafit_jax.train import main as train_main
from tests.test_faults import small
from tests.test_hostile import _other_model, only_line


def state(*paths) -> list:
    """Every file (bytes) and folder under each path, or None where nothing is: what must not change."""
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p.read_bytes())
        elif p.is_dir():
            out.append({str(q.relative_to(p)): q.read_bytes() if q.is_file() else "dir" for q in sorted(p.rglob("*"))})
        else:
            out.append(None)
    return out


def refused(main, argv, capsys, *watch) -> str:
    """Runs `main(argv)`; asserts exit 2, one error line, and every path of `watch` unchanged."""
    before = state(*watch)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    line = only_line(capsys.readouterr().err)
    assert state(*watch) == before
    return line


def raised(call, *watch) -> str:
    """Calls `call()`; asserts one SpafitError with a one-line message, and every path of `watch` unchanged."""
    before = state(*watch)
    with pytest.raises(SpafitError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and message, message
    assert state(*watch) == before
    return message


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A finished tiny SPAFIT run (LoRA on layer 2's query and value) on the tiny base model."""
    work = tmp_path_factory.mktemp("after") / "run"
    assert train_main(["--workdir", str(work), *small(tiny_model_dir)]) == 0
    return work


@pytest.fixture(scope="module")
def loaded(run):
    from spafit_jax.after_training.run import load_run

    return load_run(run)


@pytest.fixture
def user(tmp_path):
    """The user's own folder: a text input, a csv input, and an earlier output they keep."""
    (tmp_path / "in.txt").write_text("the market fell\na good film\n")
    (tmp_path / "in.csv").write_text("text\nthe bank won\nold phone\n")
    (tmp_path / "kept.jsonl").write_text('{"mine": 1}\n')
    return tmp_path


# ------------------------------------------------------------------ predict: outputs


def _proc(user):
    return "/proc/self/out.jsonl"


OUTPUTS = [
    ("output is the txt input", lambda u: u / "in.txt", "in.txt", "is the --input file"),
    ("output is the csv input", lambda u: u / "in.csv", "in.csv", "is the --input file"),
    ("output is the input spelled otherwise", lambda u: u / "sub" / ".." / "in.csv", "in.csv", "is the --input file"),
    ("output existing", lambda u: u / "kept.jsonl", "in.txt", "--overwrite"),
    ("output existing csv", lambda u: u / "in.csv", "in.txt", "--overwrite"),
    ("output a folder", lambda u: u, "in.txt", "is a folder"),
    ("output in /proc", _proc, "in.txt", "pseudo-filesystem"),
    ("output in /sys", lambda u: "/sys/out.jsonl", "in.txt", "pseudo-filesystem"),
    ("output in /dev", lambda u: "/dev/out.jsonl", "in.txt", "pseudo-filesystem"),
    ("output under a file", lambda u: u / "kept.jsonl" / "out.jsonl", "in.txt", "is a file, not a folder"),
    ("output unknown suffix", lambda u: u / "out.xlsx", "in.txt", "unknown output type '.xlsx'"),
    ("output no suffix", lambda u: u / "out", "in.txt", "unknown output type"),
    ("output with a newline", lambda u: str(u / "out.jsonl") + "\n", "in.txt", "control character"),
]


@pytest.mark.parametrize("name,output,source,expect", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_predict_bad_outputs_are_one_line_and_nothing_is_written(run, user, capsys, name, output, source, expect):
    (user / "sub").mkdir()
    line = refused(predict.main, ["--workdir", run, "--input", user / source, "--output", output(user)], capsys,
                   user, run)
    assert expect in line, line


def test_predict_output_is_the_input_through_a_link(run, user, capsys):
    (user / "link.txt").symlink_to(user / "in.txt")
    line = refused(predict.main, ["--workdir", run, "--input", user / "in.txt", "--output", user / "link.txt",
                                  "--overwrite"], capsys, user, run)
    assert "is the --input file" in line


# ------------------------------------------------------------------ predict: inputs and arguments


def _write(name, data: bytes):
    def make(u):
        (u / name).write_bytes(data)
        return u / name
    return make


INPUTS = [
    ("input missing", lambda u: u / "nope.csv", [], "--input", "does not exist"),
    ("input a folder", lambda u: u, [], "--input", "is a folder"),
    ("input unknown type", _write("in.xlsx", b"x"), [], "in.xlsx", "unsupported file type '.xlsx'"),
    ("latin-1 txt", _write("l1.txt", "caf\xe9\n".encode("latin-1")), [], "l1.txt", "--encoding"),
    ("latin-1 csv", _write("l1.csv", "text\ncaf\xe9\n".encode("latin-1")), [], "l1.csv", "--encoding"),
    ("unknown encoding", lambda u: u / "in.txt", ["--encoding", "klingon"], "--encoding 'klingon'", "utf-8"),
    ("batch size 0", lambda u: u / "in.txt", ["--batch-size", "0"], "--batch-size 0", ">= 1"),
    ("batch size negative", lambda u: u / "in.txt", ["--batch-size", "-3"], "--batch-size -3", ">= 1"),
    ("checkpoint 2.7", lambda u: u / "in.txt", ["--checkpoint", "2.7"], "checkpoint='2.7'", "step number"),
    ("checkpoint -1", lambda u: u / "in.txt", ["--checkpoint", "-1"], "checkpoint='-1'", "step number"),
    ("checkpoint abc", lambda u: u / "in.txt", ["--checkpoint", "abc"], "checkpoint='abc'", "step number"),
    ("checkpoint missing step", lambda u: u / "in.txt", ["--checkpoint", "99"], "step 99", "found: [2]"),
    ("jsonl number text", _write("n.jsonl", b'{"text": 5}\n'), [], "n.jsonl row 1", "not text"),
    ("jsonl list text", _write("l.jsonl", b'{"text": ["a", "b"]}\n{"text": ["c"]}\n'), [], "l.jsonl row 1", "not text"),
    ("jsonl null text", _write("z.jsonl", b'{"text": "a"}\n{"text": null}\n'), [], "z.jsonl row 2", "empty text"),
    ("jsonl broken line", _write("b.jsonl", b'{"text": "a"}\n{"text": "b\n'), [], "b.jsonl line 2", "fix the file"),
    ("csv blank text", _write("e.csv", b"text,id\na,1\n  ,2\n"), [], "e.csv row 2", "empty text"),
    ("csv no text column", _write("c.csv", b"body\na\n"), [], "no column 'text'", "--text-column"),
    ("csv header only", _write("h.csv", b"text\n"), [], "h.csv", "no rows"),
    ("csv named column missing", lambda u: u / "in.csv", ["--text-column", "body"], "no column 'body'",
     "--text-column"),
    ("empty txt", _write("empty.txt", b""), [], "empty.txt", "no rows"),
    ("pair column for a single-text run", lambda u: u / "in.csv", ["--text-pair-column", "text"],
     "--text-pair-column text", "takes single texts"),
]


@pytest.mark.parametrize("name,make,args,where,expect", INPUTS, ids=[i[0] for i in INPUTS])
def test_predict_bad_inputs_are_one_line_and_name_the_file_and_the_fix(run, user, capsys, name, make, args, where,
                                                                       expect):
    source = make(user)
    line = refused(predict.main, ["--workdir", run, "--input", source, "--output", user / "out.jsonl", *args],
                   capsys, user, run)
    assert where in line and expect in line, line
    assert "data.encoding" not in line and "data.train_file" not in line, line  # train's settings, not predict's


@pytest.mark.parametrize("stdin", ["none", "closed"])
def test_predict_from_a_closed_stdin_is_one_line(run, user, capsys, monkeypatch, stdin):
    stream = None if stdin == "none" else io.StringIO("a\n")
    if stream is not None:
        stream.close()
    monkeypatch.setattr(sys, "stdin", stream)
    line = refused(predict.main, ["--workdir", run, "--input", "-"], capsys, user, run)
    assert "stdin is closed" in line


@pytest.mark.parametrize("where", ["missing", "not a run"])
def test_predict_on_a_folder_that_is_no_run_is_one_line(user, capsys, where):
    workdir = user / "nope" if where == "missing" else user
    line = refused(predict.main, ["--workdir", workdir, "--input", user / "in.txt"], capsys, user)
    assert "not a run folder" in line


def _copy(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


TASK_JSON = [
    ("truncated", lambda t: t[: len(t) // 2], "not readable JSON"),
    ("a list", lambda t: "[1, 2]", "holds a JSON list"),
    ("unknown key", lambda t: json.dumps({**json.loads(t), "colour": "red"}), "unknown field 'colour'"),
    ("missing key", lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "num_labels"}),
     "'num_labels' is missing"),
    ("num_labels a string", lambda t: json.dumps({**json.loads(t), "num_labels": "5"}), "'num_labels'"),
    ("label_names too few", lambda t: json.dumps({**json.loads(t), "label_names": ["a"]}), "1 label_names"),
]


@pytest.mark.parametrize("name,damage,expect", TASK_JSON, ids=[t[0] for t in TASK_JSON])
def test_a_damaged_task_json_is_one_line(run, user, capsys, name, damage, expect):
    copy = _copy(run, user)
    (copy / "task.json").write_text(damage((copy / "task.json").read_text()))
    line = refused(predict.main, ["--workdir", copy, "--input", user / "in.txt"], capsys, user)
    assert "task.json" in line and expect in line and "delete it" in line, line


def test_a_changed_base_model_says_to_restore_it_not_to_use_a_new_workdir(run, tiny_model_dir, user, capsys):
    copy = _copy(run, user)
    other = _other_model(tiny_model_dir, user / "other")
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace(str(tiny_model_dir), str(other)))
    line = refused(predict.main, ["--workdir", copy, "--input", user / "in.txt"], capsys, user)
    assert "other base weights" in line and str(other) in line and "new --workdir" not in line, line


# ------------------------------------------------------------------ the reloaded run's API


API = [
    ("predict None in the list", lambda r: r.predict([None]), "texts[0] is NoneType"),
    ("predict a number", lambda r: r.predict(5), "got int"),
    ("predict bytes", lambda r: r.predict(b"abc"), "got bytes"),
    ("predict a mixed list", lambda r: r.predict(["a", 3]), "texts[1] is int"),
    ("predict a dict", lambda r: r.predict({"text": "a"}), "got dict"),
    ("predict pairs for a single-text task", lambda r: r.predict(["a"], ["b"]), "single texts"),
    ("batch size 0", lambda r: r.predict(["a"], batch_size=0), "batch_size=0"),
    ("batch size 2.5", lambda r: r.predict(["a"], batch_size=2.5), "batch_size=2.5"),
    ("batch size True", lambda r: r.predict(["a"], batch_size=True), "batch_size=True"),
]


@pytest.mark.parametrize("name,call,expect", API, ids=[a[0] for a in API])
def test_the_run_api_refuses_bad_arguments_in_one_line(loaded, run, name, call, expect):
    assert expect in raised(lambda: call(loaded), run)


@pytest.mark.parametrize("step", [2.7, True, "2.7", -2, None])
def test_load_run_refuses_a_step_that_is_no_whole_number(run, step):
    from spafit_jax.after_training.run import load_run

    assert "step number" in raised(lambda: load_run(run, step), run)


def test_one_string_is_one_text(loaded):
    one = loaded.predict("the market fell today")
    assert one.shape == (1, loaded.spec.num_labels)
    assert (loaded.predict(["the market fell today"]) == one).all()


# ------------------------------------------------------------------ export: never over what it did not write


def _user_model(u):
    folder = u / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"my weights")
    (folder / "notes.md").write_text("my notes")
    return folder


def _notes(u):
    (u / "notes").mkdir()
    (u / "notes" / "a.txt").write_text("mine")
    return u / "notes"


def _added_to_export(u):
    (u / "exp" / "readme.txt").write_text("I added this")
    return u / "exp"


EXPORTS = [
    ("the base model, flax", lambda u, r, b: b, "flax", [], "the run's base model"),
    ("the base model, hf", lambda u, r, b: b, "hf", [], "the run's base model"),
    ("the base model with --overwrite", lambda u, r, b: b, "flax", ["--overwrite"], "the run's base model"),
    ("the base model through a link", lambda u, r, b: (u / "ln").symlink_to(b) or u / "ln", "hf", [],
     "the run's base model"),
    ("the run folder", lambda u, r, b: r, "hf", ["--overwrite"], "the run folder"),
    ("the run's checkpoints", lambda u, r, b: r / "checkpoints", "hf", [], "checkpoints"),
    ("inside the run's checkpoints", lambda u, r, b: r / "checkpoints" / "x", "hf", [], "is inside"),
    ("the run's tokenizer", lambda u, r, b: r / "tokenizer", "flax", [], "tokenizer"),
    ("a folder holding the run", lambda u, r, b: r.parent, "hf", ["--overwrite"], "holds the run folder"),
    ("another model's folder", lambda u, r, b: shutil.copytree(b, u / "other"), "flax", [], "no export wrote"),
    ("the user's config and weights", lambda u, r, b: _user_model(u), "hf", ["--overwrite"], "no export wrote"),
    ("a folder of notes", lambda u, r, b: _notes(u), "peft", [], "no export wrote"),
    ("an existing file", lambda u, r, b: u / "kept.jsonl", "hf", [], "is a file"),
    ("under a file", lambda u, r, b: u / "kept.jsonl" / "out", "hf", [], "is a file, not a folder"),
    ("under /proc", lambda u, r, b: "/proc/self/exported", "hf", [], "pseudo-filesystem"),
    ("under /sys", lambda u, r, b: "/sys/exported", "flax", [], "pseudo-filesystem"),
    ("an earlier export without --overwrite", lambda u, r, b: u / "exp", "hf", [], "--overwrite"),
    ("an export the user added to", lambda u, r, b: _added_to_export(u), "hf", ["--overwrite"], "readme.txt"),
    ("an empty name", lambda u, r, b: "", "hf", [], "--out is empty"),
    ("a name with a tab", lambda u, r, b: f"{u}/a\tb", "hf", [], "control character"),
]


@pytest.fixture(scope="module")
def earlier(run, tmp_path_factory):
    """An earlier peft export of the run (a template copied into each case's folder)."""
    from spafit_jax.after_training.run import load_run

    out = tmp_path_factory.mktemp("earlier") / "exp"
    exporting.export(load_run(run), out, "peft")
    return out


@pytest.mark.parametrize("name,where,fmt,args,expect", EXPORTS, ids=[e[0] for e in EXPORTS])
def test_export_never_writes_over_what_it_did_not_write(run, tiny_model_dir, earlier, user, capsys, name, where, fmt,
                                                        args, expect):
    shutil.copytree(earlier, user / "exp")
    out = where(user, run, tiny_model_dir)
    line = refused(export.main, ["--workdir", run, "--out", out, "--format", fmt, *args], capsys, user, run,
                   tiny_model_dir)
    assert expect in line, line
    assert not list(user.glob(".*.new-*")) and not list(user.glob(".*.old-*"))


@pytest.mark.parametrize("checkpoint", ["2.7", "last2", "-5"])
def test_export_refuses_a_checkpoint_that_is_no_step_number(run, user, capsys, checkpoint):
    line = refused(export.main, ["--workdir", run, "--out", user / "new", "--format", "hf", "--checkpoint",
                                 checkpoint], capsys, user, run)
    assert "step number" in line and not (user / "new").exists()


# ------------------------------------------------------------------ PEFT import: every field and tensor checked


def _config(change):
    def damage(folder):
        path = folder / peft_io.PEFT_CONFIG
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return damage


def _drop(which):
    def damage(folder):
        from safetensors.numpy import load_file, save_file

        path = folder / peft_io.PEFT_WEIGHTS
        state = load_file(str(path))
        save_file({k: v for k, v in state.items() if not which(k)}, str(path), metadata={"format": "pt"})
    return damage


ADAPTERS = [
    ("config a list", lambda f: (f / peft_io.PEFT_CONFIG).write_text("[1]"), "holds a JSON list"),
    ("config truncated", lambda f: (f / peft_io.PEFT_CONFIG).write_text('{"r": 4'), "not readable JSON"),
    ("target_modules a bad regex", _config(lambda c: {**c, "target_modules": "query("}), "target_modules"),
    ("target_modules a number", _config(lambda c: {**c, "target_modules": 5}), "target_modules"),
    ("rank_pattern a bad regex", _config(lambda c: {**c, "rank_pattern": {"la[yer": 2}}), "rank_pattern"),
    ("rank_pattern a string rank", _config(lambda c: {**c, "rank_pattern": {"layer": "2"}}), "rank_pattern"),
    ("rank_pattern a list", _config(lambda c: {**c, "rank_pattern": ["layer"]}), "rank_pattern"),
    ("lora_dropout a string", _config(lambda c: {**c, "lora_dropout": "0.1"}), "lora_dropout"),
    ("lora_dropout above one", _config(lambda c: {**c, "lora_dropout": 1.5}), "lora_dropout"),
    ("use_rslora the string false", _config(lambda c: {**c, "use_rslora": "false"}), "use_rslora"),
    ("r zero", _config(lambda c: {**c, "r": 0}), "r=0"),
    ("r a string", _config(lambda c: {**c, "r": "8"}), "r=\"8\""),
    ("r missing", _config(lambda c: {k: v for k, v in c.items() if k != "r"}), "'r' is missing"),
    ("lora_alpha null", _config(lambda c: {**c, "lora_alpha": None}), "lora_alpha"),
    ("layers_to_transform a string", _config(lambda c: {**c, "layers_to_transform": "2"}), "layers_to_transform"),
    ("bias unknown", _config(lambda c: {**c, "bias": "some"}), "bias"),
    ("a lora_A missing", _drop(lambda k: "query.lora_A" in k), "lacks 1 LoRA tensor"),
    ("a lora_B missing", _drop(lambda k: "value.lora_B" in k), "lacks 1 LoRA tensor"),
    ("every adapter missing", _drop(lambda k: ".lora_" in k), "lacks 4 LoRA tensor"),
    ("weights truncated", lambda f: (f / peft_io.PEFT_WEIGHTS).write_bytes(b"\x10\x00" * 8), "truncated or corrupt"),
]


@pytest.mark.parametrize("name,damage,expect", ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_a_bad_peft_adapter_is_one_line_naming_the_field(earlier, tiny_model_dir, tmp_path, name, damage, expect):
    folder = tmp_path / "adapter"
    shutil.copytree(earlier, folder)
    damage(folder)
    message = raised(lambda: hf.load_pretrained(tiny_model_dir, num_labels=5, adapter=folder), folder, tiny_model_dir)
    assert expect in message, message


def test_the_untouched_adapter_loads_with_its_trained_tensors(earlier, tiny_model_dir, loaded):
    import numpy as np

    model, params = hf.load_pretrained(tiny_model_dir, num_labels=5, adapter=earlier)
    query = ("bert", "encoder", "layer", "2", "attention", "self", "query")
    ours, theirs = params, loaded.params
    for key in query:
        ours, theirs = ours[key], theirs[key]
    np.testing.assert_allclose(ours["lora_b"], theirs["lora_b"], atol=1e-6)
    assert np.abs(np.asarray(ours["lora_b"])).max() > 0  # trained, not the zero start


# ------------------------------------------------------------------ the experiment file


EXPERIMENTS = [
    ("duplicate method names", "methods:\n  lora: {method.name: lora}\n  lora: {method.name: head_only}\n",
     "key 'lora' appears twice"),
    ("duplicate task names", "tasks:\n  bbc_news: null\n  bbc_news: null\nmethods: [lora]\n", "appears twice"),
    ("duplicate override keys", "overrides: {train.lr: 0.1, train.lr: 0.2}\nmethods: [lora]\n", "'train.lr'"),
    ("duplicate grid keys", "methods:\n  spafit:\n    grid: {method.n1: [0, 1], method.n1: [1]}\n", "appears twice"),
    ("a method listed twice", "methods: [lora, lora]\n", "two methods are named 'lora'"),
    ("a file and a name alike", "methods: [configs/methods/lora.yaml, lora]\n", "two methods are named 'lora'"),
    ("a method named like a grid label",
     "methods:\n  spafit: {grid: {method.n1: [0, 1]}}\n  spafit@n1=1: {method.name: spafit, method.n1: 1}\n",
     "would share the run folder"),
    ("names differing only in case", "methods:\n  lora: null\n  LoRA: {method.name: lora}\n",
     "would share the run folder"),
    ("a seed listed twice", "methods: [lora]\nseeds: [0, 0]\n", "seed 0 is listed twice"),
    ("a top-level key twice", "methods: [lora]\nseeds: [0]\nseeds: [1]\n", "'seeds' appears twice"),
]


@pytest.mark.parametrize("name,text,expect", EXPERIMENTS, ids=[x[0] for x in EXPERIMENTS])
def test_an_ambiguous_experiment_file_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, name, text,
                                                                      expect):
    base = f"overrides: {{model.name: {tiny_model_dir}}}\n" if "overrides:" not in text else ""
    tasks = "tasks: [bbc_news]\n" if "tasks:" not in text else ""
    path = tmp_path / "exp.yaml"
    path.write_text(base + tasks + text)
    for dry in ([], ["--dry-run"]):
        line = refused(experiment.main, ["--config", path, "--workdir", tmp_path / "EXP", *dry], capsys, tmp_path)
        assert expect in line and not (tmp_path / "EXP").exists(), line


# ------------------------------------------------------------------ what works: the same surfaces used well


def test_predict_writes_new_outputs_atomically_and_replaces_only_with_overwrite(run, user, capsys):
    out = user / "deep" / "er" / "out.CSV"  # a missing folder is created; suffixes are read in any case
    (user / "in.txt").rename(user / "IN.TXT")
    assert predict.main(["--workdir", str(run), "--input", str(user / "IN.TXT"), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("label,label_id,probabilities") and len(lines) == 3
    before = state(user / "kept.jsonl")
    assert predict.main(["--workdir", str(run), "--input", str(user / "in.csv"), "--output",
                         str(user / "kept.jsonl"), "--overwrite"]) == 0
    assert state(user / "kept.jsonl") != before and len((user / "kept.jsonl").read_text().splitlines()) == 2
    assert not [p for p in user.rglob("*") if p.name.endswith(".tmp")]
    capsys.readouterr()
    assert predict.main(["--workdir", str(run), "--input", str(user / "in.csv"), "--output", "-"]) == 0
    assert [json.loads(line)["label_id"] for line in capsys.readouterr().out.splitlines()] == [
        json.loads(line)["label_id"] for line in (user / "kept.jsonl").read_text().splitlines()]


def test_a_failed_write_leaves_the_old_output_and_no_temporary_file(user, monkeypatch):
    def fill(f):
        f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(outputs.OutputError, match="No space left on device"):
        outputs.write_file(user / "kept.jsonl", fill)
    assert (user / "kept.jsonl").read_text() == '{"mine": 1}\n' and not list(user.glob(".*.tmp"))


def test_export_overwrite_replaces_the_folder_whole_and_keeps_it_when_the_new_export_fails(run, earlier, user,
                                                                                          capsys, monkeypatch):
    shutil.copytree(earlier, user / "exp")
    assert (user / "exp" / peft_io.PEFT_CONFIG).is_file()
    old = state(user / "exp")

    def broken(run, folder):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(exporting, "export_hf", broken)
    line = refused(export.main, ["--workdir", run, "--out", user / "exp", "--format", "hf", "--overwrite"], capsys,
                   user, run)
    assert "No space left on device" in line and state(user / "exp") == old
    monkeypatch.undo()
    assert export.main(["--workdir", str(run), "--out", str(user / "exp"), "--format", "hf", "--overwrite"]) == 0
    names = {p.name for p in (user / "exp").iterdir()}
    assert peft_io.PEFT_CONFIG not in names and peft_io.PEFT_WEIGHTS not in names  # no stale adapter beside merged weights
    assert {"config.json", weights.SAFETENSORS, outputs.MARKER} <= names
    marker = json.loads((user / "exp" / outputs.MARKER).read_text())
    assert marker["format"] == "hf" and weights.SAFETENSORS in marker["files"]
    assert not [p for p in user.iterdir() if p.name.startswith(".")]  # nothing moved aside is left


def test_export_writes_into_an_empty_folder_and_a_new_one_under_missing_parents(run, user):
    (user / "empty").mkdir()
    for out in (user / "empty", user / "a" / "b" / "flax"):
        assert export.main(["--workdir", str(run), "--out", str(out), "--format", "flax"]) == 0
        assert (out / weights.FLAX).is_file() and outputs.is_export(out)
    model, params = hf.load_pretrained(user / "empty", num_labels=5)
    assert model.config.num_hidden_layers == 3


def test_pseudo_filesystems_are_known_even_without_a_mount_table(monkeypatch):
    monkeypatch.setattr(outputs, "_mounts", lambda: [])
    assert outputs.file_system(Path("/proc/self")) == "proc" and outputs.file_system(Path("/home/x")) is None
    monkeypatch.undo()
    assert outputs.file_system(Path("/proc/self/status")) == "proc"
    assert outputs.file_system(Path(os.getcwd())) not in outputs.PSEUDO


def test_a_csv_field_above_the_csv_modules_limit_is_one_text(run, user, capsys):
    (user / "big.csv").write_text("text\n" + "word " * 30_000 + "\nsmall\n")  # 150 kB: above csv's 128 kB
    assert predict.main(["--workdir", str(run), "--input", str(user / "big.csv"), "--output",
                         str(user / "big.jsonl")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert len((user / "big.jsonl").read_text().splitlines()) == 2
