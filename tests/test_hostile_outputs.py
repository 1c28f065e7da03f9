"""Hostile cases of issue 31 outside experiments: predict over the run's own files, report over a user's
files, resumes that change the batches, models that cannot work, damaged config.json values, damaged
checkpoints, TPU topologies beyond real slices and unreadable predict inputs. Each asserts exit status 2
(or the one SpafitError of an API call), one `error:` line without a traceback, and every user and run
file unchanged byte for byte; the allowed variants (a resume that only extends the run, a report into a
folder of other files) are checked to work and to record what they did."""

import json
import logging
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from spafit_jax.training import checkpoint, rundir
from spafit_jax.models import hf
from spafit_jax.after_training import outputs
from spafit_jax import predict, report
from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.errors import ConfigError, LoadError
from spafit_jax.train import main as train_main
from tests.test_faults import one_error_line, small, snapshot
from tests.test_hostile import _config, finished, refused as train_refused, stopped  # noqa: F401 (fixtures)
from tests.test_hostile_after import refused, run, user  # noqa: F401 (fixtures)

# ------------------------------------------------------------------ predict never writes the run's own files

RUN_FILES = [
    ("results.json", lambda r, m: r / "results.json", "the run's results.json"),
    ("metrics.jsonl", lambda r, m: r / "metrics.jsonl", "the run's metrics.jsonl"),
    ("task.json", lambda r, m: r / "task.json", "the run's task.json"),
    ("config.yaml", lambda r, m: r / "config.yaml", "the run's config.yaml"),
    ("changes.jsonl (not yet written)", lambda r, m: r / rundir.CHANGES, "the run's changes.jsonl"),
    ("in checkpoints/", lambda r, m: r / "checkpoints" / "p.jsonl", "inside the run's checkpoints/"),
    ("in tokenizer/", lambda r, m: r / "tokenizer" / "tokenizer.json", "inside the run's tokenizer/"),
    ("in the base model", lambda r, m: m / "config.json", "inside the run's base model"),
    ("the results through a link", lambda r, m: "LINK", "the run's results.json"),
]


@pytest.mark.parametrize("name,where,expect", RUN_FILES, ids=[c[0] for c in RUN_FILES])
def test_predict_never_writes_over_the_runs_own_files(run, tiny_model_dir, user, capsys, name, where, expect):
    output = where(run, tiny_model_dir)
    if output == "LINK":
        (user / "link.json").symlink_to(run / "results.json")
        output = user / "link.json"
    line = refused(predict.main, ["--workdir", run, "--input", user / "in.txt", "--output", output, "--overwrite"],
                   capsys, user, run, tiny_model_dir)
    assert expect in line and "choose" in line, line


def test_predict_writes_a_new_file_beside_the_runs_own(run, user, capsys):
    before = snapshot(run)
    assert predict.main(["--workdir", str(run), "--input", str(user / "in.txt"), "--output",
                         str(run / "predictions.jsonl")]) == 0
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    (run / "predictions.jsonl").unlink()
    assert len(rows) == 2 and snapshot(run) == before


INPUTS = [
    ("truncated jsonl", "t.jsonl", b'{"text": "a"}\n{"text": ', "invalid JSON"),
    ("empty jsonl", "e.jsonl", b"", "e.jsonl"),
    ("empty csv", "e.csv", b"", "e.csv"),
    ("header only", "h.csv", b"text\n", "no rows"),
    ("not parquet", "p.parquet", b"xx", "p.parquet"),
    ("binary txt", "b.txt", b"\xff\xfe\x00x", "--encoding"),
    ("no text column", "o.jsonl", b'{"other": "a"}\n', "--text-column"),
]


@pytest.mark.parametrize("name,file,data,expect", INPUTS, ids=[i[0] for i in INPUTS])
def test_unreadable_predict_inputs_are_one_line(run, user, capsys, name, file, data, expect):
    (user / file).write_bytes(data)
    line = refused(predict.main, ["--workdir", run, "--input", user / file], capsys, user, run)
    assert expect in line, line


# ------------------------------------------------------------------ report never replaces a user's files


@pytest.mark.parametrize("mine", ["table.md", "index.html", "summary.csv", "params_vs_metric.png"])
def test_report_never_replaces_a_users_own_file(run, tmp_path, capsys, mine):
    (tmp_path / mine).write_bytes(b"the user's own")
    (tmp_path / "notes.txt").write_text("kept")
    line = refused(report.main, [run, "--out", tmp_path], capsys, tmp_path)
    assert mine in line and ".spafit-report.json" in line, line
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")) == []


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/report", "tokenizer"])
def test_report_never_writes_inside_a_runs_own_folders(run, capsys, inside):
    line = refused(report.main, [run, "--out", run / inside], capsys, run)
    assert f"inside the run's {inside.split('/')[0]}/" in line and "choose a folder outside it" in line, line


def test_report_writes_beside_other_files_and_replaces_only_its_own(run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("kept")
    assert report.main([str(run), "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / outputs.marker_of("report")).read_text())["files"]
    assert {"table.md", "index.html", "summary.csv"} <= set(written) and "notes.txt" not in written
    (tmp_path / "stale.png").write_bytes(b"an earlier report's picture")  # listed as the report's own: deleted
    marker = tmp_path / outputs.marker_of("report")
    marker.write_text(json.dumps({"files": [*written, "stale.png"]}))
    (tmp_path / "table.md").write_text("old table")
    assert report.main([str(run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "notes.txt").read_text() == "kept" and not (tmp_path / "stale.png").exists()
    assert (tmp_path / "table.md").read_text() != "old table"
    assert set(json.loads(marker.read_text())["files"]) == set(written)


def test_report_never_replaces_its_own_file_after_the_user_edited_it(run, tmp_path, capsys):
    assert report.main([str(run), "--out", str(tmp_path)]) == 0
    (tmp_path / "table.md").write_text("my edits to the report's table")
    line = refused(report.main, [run, "--out", tmp_path], capsys, tmp_path)
    assert "table.md" in line and "changed since" in line and ".spafit-report.json" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".report-")) == []


def test_a_list_marker_of_an_earlier_version_still_counts_its_files_as_the_reports(run, tmp_path, capsys):
    assert report.main([str(run), "--out", str(tmp_path)]) == 0
    marker = tmp_path / outputs.marker_of("report")
    hashes = json.loads(marker.read_text())["files"]
    assert all(len(h) == 64 for h in hashes.values())  # {name: sha256}
    marker.write_text(json.dumps({"files": sorted(hashes)}))  # the list an earlier version wrote
    (tmp_path / "table.md").write_text("edited: no hash to tell")
    assert report.main([str(run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() != "edited: no hash to tell"
    assert set(json.loads(marker.read_text())["files"]) == set(hashes)


# ------------------------------------------------------------------ one rule for a command's files in a shared folder


def _build(files):
    def build(folder):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    return build


@pytest.mark.parametrize("command", ["report", "protocol"])
def test_report_and_protocol_refuse_in_the_same_words(tmp_path, command):
    folder = tmp_path / "out"
    outputs.write_files(folder, _build({"table.md": "t", "sub/a.csv": "a"}), command)
    assert set(json.loads((folder / f".spafit-{command}.json").read_text())["files"]) == {"table.md", "sub/a.csv"}
    (folder / "table.md").write_text("edited")
    (folder / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    shapes = {}
    for name, cause in [("table.md", "changed"), ("notes.md", "theirs")]:
        with pytest.raises(outputs.OutputError) as e:
            outputs.write_files(folder, _build({name: "new"}), command, names=[name])
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"--out {folder} already holds {name}, which {command} ")
        assert f".spafit-{command}.json" in line and "move it aside or choose another --out" in line, line
        shapes[cause] = line.replace(command, "CMD")
    assert "which CMD did not write there" in shapes["theirs"] and "changed since" in shapes["changed"]
    for where in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        (tmp_path / "a-file").write_text("x")
        with pytest.raises(outputs.OutputError, match="is a file, not a folder"):
            outputs.write_files(where, _build({"t": "t"}), command)
        (tmp_path / "a-file").unlink()
    assert snapshot(tmp_path) == before


def test_a_failed_write_leaves_everything_as_it_was(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    outputs.write_files(folder, _build({"a.md": "1", "b.md": "1", "old.png": "1"}), "report")
    before = snapshot(tmp_path)

    def broken(folder):
        (folder / "a.md").write_text("2")
        raise RuntimeError("the pictures failed")

    with pytest.raises(RuntimeError):
        outputs.write_files(folder, broken, "report")
    assert snapshot(tmp_path) == before
    real, calls = outputs.os.replace, []

    def replace(a, b):  # the last file's rename fails: the files already moved go back
        calls.append(Path(b))
        if Path(b) == folder / "c" / "new.md":
            raise OSError(28, "No space left on device", str(b))
        return real(a, b)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        outputs.write_files(folder, _build({"a.md": "3", "b.md": "3", "c/new.md": "3"}), "report")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and folder / "b.md" in calls and not (folder / "c").exists()
    with pytest.raises(RuntimeError):
        outputs.write_files(tmp_path / "new" / "deeper", broken, "report")
    assert not (tmp_path / "new").exists()  # the folders this call made are gone


# ------------------------------------------------------------------ a resume never mixes batches

RESUMES = [
    ("train.batch_size=4", "train.batch_size", "8", "4"),
    ("data.max_length=16", "data.max_length", "32", "16"),
    ("train.seed=1", "train.seed", "0", "1"),
    ("data.limit_train=12", "data.limit_train", "16", "12"),
    ("data.limit_eval=4", "data.limit_eval", "8", "4"),
]


@pytest.mark.parametrize("change,field,old,new", RESUMES, ids=[r[0] for r in RESUMES])
def test_a_resume_that_changes_the_batches_is_refused_naming_the_field(stopped, tiny_model_dir, capsys, change, field,
                                                                      old, new):
    line = train_refused(stopped, small(tiny_model_dir, "train.max_steps=6", "train.epochs=10", change), capsys,
                         overwrite=False)
    assert f"trained with {field}={old}" in line and f"sets {field}={new}" in line and f"resume with {field}={old}" \
        in line and "new --workdir" in line, line


def test_every_batch_field_names_a_config_field():
    from spafit_jax.config.files import Config

    cfg = Config()
    for name in {**rundir.BATCH_FIELDS, **rundir.SCORE_FIELDS}:
        section, key = name.split(".")
        assert hasattr(getattr(cfg, section), key), name


def test_a_safe_change_on_resume_is_recorded_with_its_step(stopped, tiny_model_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(stopped, work)
    assert train_main(["--workdir", str(work), *small(tiny_model_dir, "train.max_steps=8", "train.epochs=10")]) == 0
    changes = [json.loads(line) for line in (work / rundir.CHANGES).read_text().splitlines()]
    assert changes == [{"step": 2, "field": "train.max_steps", "old": 6, "new": 8}]
    assert json.loads((work / "results.json").read_text())["steps"] == 8
    assert "max_steps: 8" in (work / "config.yaml").read_text()


# ------------------------------------------------------------------ models that cannot work


def _small_vocab(tiny_model_dir, folder):
    """A model of 1,000 tokens (its own weights) beside MiniLM's tokenizer, whose ids reach 30,521."""
    import jax

    from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
    from tests.conftest import TINY

    config = BertConfig(**dict(TINY, vocab_size=1000))
    params = BertForSequenceClassification(config, num_labels=2).init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))
    hf.save_pretrained(folder, config, {"bert": params["params"]["bert"]})
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, folder / name)


def _deberta_tokenizer_without_files(tiny_model_dir, folder):
    """DeBERTa's tokenizer_config.json without spm.model or tokenizer.json (a 5-token tokenizer)."""
    shutil.copytree(tiny_model_dir, folder)
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        (folder / name).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]"}))


MODELS = [
    ("vocab_size below the tokenizer's ids", _small_vocab, "vocab_size is 1000"),
    ("DeBERTa tokenizer without its files", _deberta_tokenizer_without_files, "without a vocabulary"),
]


@pytest.mark.parametrize("name,make,expect", MODELS, ids=[m[0] for m in MODELS])
def test_models_that_cannot_represent_their_inputs_are_refused_before_training(finished, tiny_model_dir, tmp_path,
                                                                              capsys, name, make, expect):
    make(tiny_model_dir, tmp_path / "model")
    line = train_refused(finished, [*small(tiny_model_dir), f"model.name={tmp_path / 'model'}"], capsys)
    assert expect in line, line


def test_base_weights_holding_nan_are_refused_at_load(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    from flax.serialization import msgpack_restore, msgpack_serialize

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    tree = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
    table = tree["bert"]["embeddings"]["word_embeddings"]
    table["embedding"] = np.array(table["embedding"])
    table["embedding"][3, :2] = np.nan
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    capsys.readouterr()
    assert train_main(["--workdir", str(tmp_path / "run"), *small(tiny_model_dir, f"model.name={folder}")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "embeddings/word_embeddings/embedding holds 2 non-finite value(s)" in line and "damaged" in line, line
    assert not (tmp_path / "run").exists()


def test_a_run_whose_every_step_was_skipped_fails_and_writes_no_results(tiny_model_dir, tmp_path, capsys):
    rows = "".join(f"{'good' if i % 2 else 'bad'} text {i},{1e30 * (i + 1)}\n" for i in range(16))
    (tmp_path / "huge.csv").write_text("text,label\n" + rows)  # finite labels whose squared error overflows float32
    data = ["data.task=local", f"data.train_file={tmp_path / 'huge.csv'}", f"data.eval_file={tmp_path / 'huge.csv'}",
            "data.is_regression=true"]
    capsys.readouterr()
    assert train_main(["--workdir", str(tmp_path / "run"), *small(tiny_model_dir, *data)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "every one of the 2 steps" in line and "no results.json" in line, line
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------ config.json values of the wrong kind

CONFIGS = [
    ("hidden_size a string", {"hidden_size": "32"}, 'hidden_size="32" must be a whole number >= 1'),
    ("no attention heads", {"num_attention_heads": 0}, "num_attention_heads=0 must be a whole number >= 1"),
    ("negative size", {"intermediate_size": -5}, "intermediate_size=-5 must be a whole number >= 1"),
    ("layers a float", {"num_hidden_layers": 2.5}, "num_hidden_layers=2.5 must be a whole number >= 1"),
    ("dropout a string", {"hidden_dropout_prob": "0.1"}, 'hidden_dropout_prob="0.1" must be a finite number'),
    ("dropout above 1", {"attention_probs_dropout_prob": 1.5}, "must be a dropout rate in [0, 1)"),
    ("epsilon zero", {"layer_norm_eps": 0}, "layer_norm_eps=0 must be a number > 0"),
    ("heads not dividing", {"num_attention_heads": 5}, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ("activation a number", {"hidden_act": 3}, "hidden_act=3 must be a string"),
]


@pytest.mark.parametrize("name,change,expect", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_json_values_of_the_wrong_kind_are_one_line(finished, tiny_model_dir, tmp_path, capsys, name, change,
                                                           expect):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    _config(lambda r: {**r, **change})(folder)
    line = train_refused(finished, [*small(tiny_model_dir), f"model.name={folder}"], capsys)
    assert expect in line and "config.json" in line, line
    with pytest.raises(LoadError, match=re.escape(expect)):
        tpu_specs.model_config(str(folder))  # the same check on the way into aot


# ------------------------------------------------------------------ a damaged newest checkpoint falls back quietly


def test_closed_event_loop_reports_of_a_failed_restore_are_dropped_and_others_kept(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    logger = logging.getLogger("asyncio")
    monkeypatch.setattr(logger, "filters", [])
    checkpoint.quiet_closed_loops(str(tmp_path))
    checkpoint.quiet_closed_loops(str(tmp_path))  # idempotent: one hook, one filter
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other] and len(logger.filters) == 1

    def record(message, error):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), (type(error), error, None))

    ours = ValueError(f"OUT_OF_RANGE: Error reading local file {tmp_path}/3/state/d/x")
    assert not logger.filter(record("Task exception was never retrieved", ours))
    assert logger.filter(record("Task exception was never retrieved", ValueError("elsewhere")))
    assert logger.filter(record("something else", ours))


def test_a_truncated_newest_checkpoint_falls_back_with_one_warning(tiny_model_dir, tmp_path, capfd, caplog):
    import gc

    from spafit_jax.config import files as config_lib
    from spafit_jax.training.trainer import train_and_evaluate

    extra = ("train.max_steps=4", "train.epochs=10", "checkpoint.every=2", "checkpoint.keep=3")
    assert train_and_evaluate(config_lib.load_config([], small(tiny_model_dir, *extra)), tmp_path,
                              stop_after=3).step == 3
    for f in (tmp_path / "checkpoints" / "3" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])  # the arrays' data torn: Orbax fails while other reads are in flight
    capfd.readouterr()
    caplog.clear()
    assert train_main(["--workdir", str(tmp_path), *small(tiny_model_dir, *extra)]) == 0
    gc.collect()  # asyncio reports a failed read nobody awaited when its task is collected
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------ aot: topologies beyond real slices

TOPOLOGIES = [("v5e:0x4", "0 chips"), ("v4:64x64x64", "262144 chips"), ("v6e:2x0", "0 chips"),
              ("v5e:32x32", "1 to 256 chips"), ("v5p:64x64x64", "1 to 8960 chips"), ("v4:2x2", "not a TPU topology"),
              ("v4-0", "no known shape"), ("tpu:2x2x1", "not a TPU topology")]


@pytest.mark.parametrize("text,expect", TOPOLOGIES, ids=[t for t, _ in TOPOLOGIES])
def test_topologies_beyond_real_slices_are_one_line(text, expect):
    with pytest.raises(ConfigError) as e:
        tpu_specs.parse_topology(text)
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,name", [("v4:16x16x16", "v4:16x16x16"), ("v5e:02x4", "v5e:2x4"),
                                       ("v5p:16x20x28", "v5p:16x20x28"), ("v6e:16x16", "v6e:16x16")])
def test_the_largest_real_slices_are_accepted(text, name):
    assert tpu_specs.parse_topology(text)[1] == name


def test_the_run_places_name_every_file_the_trainer_writes(run, tiny_model_dir):
    places = outputs.run_places(run)
    assert {p.name for p in places.files} == set(rundir.OWN_FILES)
    assert {p.name for p in places.sealed} == {*rundir.OWN_FOLDERS, tiny_model_dir.name}
    written = {p.name for p in Path(run).iterdir()}
    assert written <= {p.name for p in places.files} | {p.name for p in places.sealed}, written
