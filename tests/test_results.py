"""results.json as one typed record: written by the trainer, read back by the report and `load_run`."""

import json

import pytest

from spafit_jax.training import results


def record(**kw):
    base = dict(task="bbc_news", method="spafit", model="minilm", trainable_params=10, total_params=100,
                eval={"accuracy": 0.5}, steps=4, best=results.Best(4, "accuracy", 0.5), n1=1, n2=2,
                eval_splits={"validation": {"accuracy": 0.5}}, layer_kinds=["frozen", "bias only", "LoRA + bias"],
                train_seconds=float("nan"))
    return results.Results(**{**base, **kw})


def test_write_then_read_gives_the_record_back(tmp_path):
    path = record(train_seconds=1.5).write(tmp_path)
    assert path == tmp_path / "results.json" and not list(tmp_path.glob("*.tmp"))
    back = results.read(tmp_path)
    assert back == record(train_seconds=1.5) and back.best.metric == "accuracy"
    assert back.splits == {"validation": {"accuracy": 0.5}}
    assert results.read(path) == back


def test_non_finite_numbers_are_written_as_null_and_old_files_read_with_defaults(tmp_path):
    record().write(tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["train_seconds"] is None and raw["best"] == {"step": 4, "metric": "accuracy", "value": 0.5}
    old = {k: v for k, v in raw.items() if k not in ("layer_kinds", "eval_splits", "padding_efficiency")}
    (tmp_path / "results.json").write_text(json.dumps({**old, "a_field_from_later": 1}))
    back = results.read(tmp_path)
    assert back.layer_kinds is None and back.splits == {"eval": {"accuracy": 0.5}}


@pytest.mark.parametrize("text,words", [
    (None, "cannot read it"), ("{", "cannot read it"), ("[]", "holds a JSON list"), ("{}", "lacks task, method"),
    ('{"task": "t", "method": "m", "model": "x", "trainable_params": 1, "total_params": 2, "steps": 1, '
     '"eval": [1]}', "field eval is not a mapping"),
    ('{"task": "t", "method": "m", "model": "x", "trainable_params": 1, "total_params": 2, "steps": 1, '
     '"eval": {}, "best": 3}', "field best is not"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, text, words):
    if text is not None:
        (tmp_path / "results.json").write_text(text)
    with pytest.raises(results.ResultsError, match=words) as e:
        results.read(tmp_path)
    assert str(tmp_path / "results.json") in str(e.value) and "\n" not in str(e.value)


def test_code_version_is_the_checkouts_commit_and_old_files_without_it_still_load(tmp_path):
    import subprocess
    from pathlib import Path

    import spafit_jax

    root = Path(results.__file__).resolve().parent.parent
    code = results.code_version()
    assert code["version"] == spafit_jax.__version__
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout
        assert code["commit"] == git.stdout.strip() and code["dirty"] == bool(status.strip())
    else:
        assert code["commit"] is None and code["dirty"] is None
    record(code=code).write(tmp_path)
    assert results.read(tmp_path).code == code
    raw = json.loads((tmp_path / "results.json").read_text())
    del raw["code"]
    (tmp_path / "results.json").write_text(json.dumps(raw))
    assert results.read(tmp_path).code is None
