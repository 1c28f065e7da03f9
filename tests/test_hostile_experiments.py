"""Hostile cases of the experiment runner with `select:` (issue 31): damaged files in an experiment folder, a folder
holding the user's own files, an experiment changed between runs, an edited test file, mixed commits, bad grids
and metrics. Each asserts exit status 2, one `error:` line without a traceback (in --dry-run too), and that every
file of the experiment folder and of the user's folder is unchanged byte for byte. One tiny experiment, run once
for the module, is copied for each case."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from spafit_jax import experiment
from tests.test_hostile_after import refused, state

TINY_RUN = {"data.limit_train": 48, "data.limit_eval": 24, "data.max_length": 32, "train.batch_size": 8,
            "train.eval_batch_size": 8, "train.log_every": 1, "train.max_steps": 2}


def experiment_file(folder: Path, tiny_model_dir, **change) -> Path:
    data = {"overrides": {"model.name": str(tiny_model_dir), **TINY_RUN}, "tasks": ["bbc_news"],
            "methods": {"bitfit": {"method.name": "bitfit"}}, "seeds": 2,
            "select": {"grid": {"train.lr": [1.0e-3, 1.0e-2]}, "dev": {"size": 40, "seed": 3}, "extend": 0}}
    for key, value in change.items():
        where, name = (data["select"], key[len("select_"):]) if key.startswith("select_") else (data, key)
        where[name] = value
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished experiment: 2 search cells, the choice, 2 seeds scored on test."""
    root = tmp_path_factory.mktemp("hostile_experiments")
    path = experiment_file(root, tiny_model_dir)
    assert experiment.main(["--config", str(path), "--workdir", str(root / "EXP"), "--no-report"]) == 0
    return root / "EXP"


@pytest.fixture
def exp(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "EXP", symlinks=True)
    return tmp_path / "EXP"


def check(exp_dir: Path, config: Path, capsys, *extra, watch=()) -> str:
    """Refused in --dry-run and in a real run, the same one line both times; nothing changed."""
    lines = [refused(experiment.main, ["--config", config, "--workdir", exp_dir, *extra, *dry], capsys, exp_dir,
                     config.parent, *watch) for dry in (["--dry-run"], [])]
    assert lines[0] == lines[1], lines
    return lines[0]


def _chosen_seed(exp_dir: Path) -> Path:
    return exp_dir / "runs/bbc_news/bitfit/seed1"


def _truncate(rel):
    def damage(exp_dir):
        path = exp_dir / rel if not callable(rel) else rel(exp_dir)
        path.write_text(path.read_text()[:7])
        return path.name
    return damage


DAMAGED = [
    ("search results", _truncate("search/runs/bbc_news/bitfit@lr=0.001/seed0/results.json"), "move"),
    ("a choice", _truncate("choices/bbc_news/bitfit.json"), "delete it"),
    ("split.json", _truncate("data/bbc_news/split.json"), "carves the splits again"),
    ("selection.json", _truncate("selection.json"), "writes it again"),
    ("test.json", _truncate(lambda e: _chosen_seed(e) / "test.json"), "scores the seed again"),
    ("experiment.json", _truncate("experiment.json"), "restore it"),
]


@pytest.mark.parametrize("name,damage,fix", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_damaged_json_file_is_one_line_naming_it_and_the_fix(exp, tiny_model_dir, capsys, name, damage, fix):
    file = damage(exp)
    line = check(exp, experiment_file(exp.parent, tiny_model_dir), capsys)
    assert f"{file}: not valid JSON" in line and fix in line, line


CHANGES = [
    ("another grid", {"select_grid": {"train.lr": [1.0e-3, 3.0e-2]}}, [], "bitfit.search"),
    ("another metric", {"select_metric": "macro_f1"}, [], "select.metric changed"),
    ("another step budget", {"overrides": None}, [], "train.max_steps changed (was 2, now 3)"),
    ("a method added", {"methods": {"bitfit": {"method.name": "bitfit"}, "lora": {"method.name": "lora"}}}, [],
     "bbc_news/lora was added"),
    ("a seed taken away", {"seeds": [0]}, [], "seed 1 was taken away"),
    ("an override on the command line", {}, ["train.warmup_ratio=0.5"], "train.warmup_ratio changed"),
    ("another extension limit", {"select_extend": 2}, [], "select.extend changed"),
]


@pytest.mark.parametrize("name,change,argv,expect", CHANGES, ids=[c[0] for c in CHANGES])
def test_an_experiment_changed_between_runs_is_refused(exp, tiny_model_dir, capsys, name, change, argv, expect):
    if "overrides" in change:
        change = {"overrides": {"model.name": str(tiny_model_dir), **TINY_RUN, "train.max_steps": 3}}
    config = experiment_file(exp.parent, tiny_model_dir, **change)
    line = check(exp, config, capsys, *argv)
    assert expect in line and "new --workdir" in line, line


def test_adding_seeds_is_safe_and_recorded(exp, tiny_model_dir, capsys):
    config = experiment_file(exp.parent, tiny_model_dir, seeds=3)
    before = state(exp)
    assert experiment.main(["--config", str(config), "--workdir", str(exp), "--dry-run"]) == 0
    assert "to record: seeds added: 2" in capsys.readouterr().out and state(exp) == before
    kept = state(exp / "search", exp / "runs/bbc_news/bitfit/seed1")
    assert experiment.main(["--config", str(config), "--workdir", str(exp), "--no-report"]) == 0
    history = json.loads((exp / "experiment.json").read_text())["history"]
    assert [h["change"] for h in history] == ["seeds added: 2"] and (exp / "experiment.yaml").read_text() == config.read_text()
    assert (exp / "runs/bbc_news/bitfit/seed2/test.json").is_file()
    assert state(exp / "search", exp / "runs/bbc_news/bitfit/seed1") == kept  # nothing trained before is touched


def test_an_edited_test_file_is_refused(exp, tiny_model_dir, capsys):
    test = exp / "data/bbc_news/test.jsonl"
    test.write_text(test.read_text() + '{"text": "one more", "label": 0}\n')
    line = check(exp, experiment_file(exp.parent, tiny_model_dir), capsys)
    assert "test.jsonl differs from the split carved into split.json" in line


def test_a_test_score_of_another_test_file_is_refused(exp, tiny_model_dir, capsys):
    path = _chosen_seed(exp) / "test.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "sha256": "0" * 64}))
    line = check(exp, experiment_file(exp.parent, tiny_model_dir), capsys)
    assert "scored another test.jsonl" in line


def test_an_edited_copy_of_the_experiment_file_is_left_alone(exp, tiny_model_dir, capsys):
    (exp / "experiment.yaml").write_text("# my notes\n")
    line = check(exp, experiment_file(exp.parent, tiny_model_dir), capsys)
    assert "is not the copy this experiment wrote" in line


def test_cells_of_another_commit_are_refused_unless_allowed(exp, tiny_model_dir, capsys):
    path = exp / "search/runs/bbc_news/bitfit@lr=0.001/seed0/results.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "code": {"version": "0.0.1", "commit": "f" * 40, "dirty": False}}))
    config = experiment_file(exp.parent, tiny_model_dir)
    line = check(exp, config, capsys)
    assert f"ran on commit {'f' * 12}" in line and "--allow-mixed-commits" in line
    before = state(exp)
    assert experiment.main(["--config", str(config), "--workdir", str(exp), "--dry-run", "--allow-mixed-commits"]) == 0
    assert state(exp) == before


def test_a_seed_trained_at_another_value_than_its_choice_is_refused(exp, tiny_model_dir, capsys):
    path = exp / "choices/bbc_news/bitfit.json"
    choice = json.loads(path.read_text())
    other = next(c for c in choice["candidates"] if c["label"] != choice["label"])
    path.write_text(json.dumps({**choice, "chosen": other["point"], "label": other["label"]}))
    line = check(exp, experiment_file(exp.parent, tiny_model_dir), capsys)
    assert "runs/bbc_news/bitfit/seed1 was trained at train.lr=" in line and "move that folder away" in line


@pytest.mark.parametrize("plain", [False, True], ids=["select", "plain grid"])
def test_a_users_own_experiment_yaml_is_never_replaced(tiny_model_dir, tmp_path, capsys, plain):
    config = experiment_file(tmp_path, tiny_model_dir, **({"select": None} if plain else {}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "experiment.yaml").write_text("# the experiment I am planning\n")
    (mine / "notes.txt").write_text("keep\n")
    line = check(mine, config, capsys)
    assert "experiment.yaml exists and is not this experiment's file" in line


def test_a_folder_with_the_users_own_selection_json_is_refused(tiny_model_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "selection.json").write_text('{"mine": true}\n')
    line = check(mine, experiment_file(tmp_path, tiny_model_dir), capsys)
    assert "selection.json exists but this folder holds no experiment.yaml" in line


UP_FRONT = [
    ("duplicate values in select.grid", {"select_grid": {"train.lr": [1.0e-3, 0.001]}}, "lists the value 0.001 twice"),
    ("duplicate values in a method's grid", {"select_methods": {"bitfit": {"train.lr": [0.01, 0.01]}}},
     "lists the value 0.01 twice"),
    ("an unknown select.metric", {"select_metric": "f2"}, "select.metric='f2' is not a metric of task bbc_news"),
    ("a negative select.extend", {"select_extend": -1}, "select.extend: must be a count >= 0"),
]


@pytest.mark.parametrize("name,change,expect", UP_FRONT, ids=[u[0] for u in UP_FRONT])
def test_bad_grids_and_metrics_are_refused_before_anything_trains(tiny_model_dir, tmp_path, capsys, name, change,
                                                                  expect):
    line = check(tmp_path / "EXP", experiment_file(tmp_path, tiny_model_dir, **change), capsys)
    assert expect in line and not (tmp_path / "EXP").exists(), line
