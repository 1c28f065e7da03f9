"""The experiment grid on a tiny random BERT: cells, skip, resume, a failing cell, selection, the report."""

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from spafit_jax.models import hf
from spafit_jax.experiments import tables
from spafit_jax.experiment import main
from spafit_jax.experiments.grid import load_experiment, select
from spafit_jax.training.trainer import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = {"data.limit_train": 64, "data.limit_eval": 24, "data.max_length": 32, "train.batch_size": 8,
            "train.eval_batch_size": 8, "train.log_every": 1, "train.max_steps": 2}
# 2 methods x 2 seeds that train, and a method that fails at load (n1 above the 3 layers).
METHODS = {"bitfit": {"method.name": "bitfit"}, "spafit": {"method.name": "spafit", "method.n1": 1, "method.n2": 2},
           "broken": {"method.name": "spafit", "method.n1": 5, "method.n2": 6}}


def write(folder: Path, name: str = "tiny.yaml", **data) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_main(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tmp_path_factory):
    """One cell with --only, a second cell stopped after one step, then the whole grid (with its report)."""
    root = tmp_path_factory.mktemp("experiment")
    path = write(root, overrides={"model.name": str(tiny_model_dir), **TINY_RUN}, tasks=["bbc_news"],
                 methods=METHODS, seeds=2)
    exp = root / "EXP"
    only = run_main("--config", path, "--workdir", exp, "--only", "bitfit/seed0", "--no-report")
    kept = (exp / "runs/bbc_news/bitfit/seed0/results.json").stat().st_mtime_ns
    cell = next(c for c in load_experiment(path)[0] if c.name == "bbc_news/spafit/seed1")
    train_and_evaluate(cell.config(), cell.folder(exp), stop_after=1)
    whole = run_main("--config", path, "--workdir", exp)
    return {"path": path, "exp": exp, "only": only, "whole": whole, "kept": kept}


def report_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results(exp, name):
    return json.loads((exp / "runs" / name / "results.json").read_text())


def test_only_then_the_whole_grid_skips_resumes_and_records_a_failure(grid):
    exp, (rc, out) = grid["exp"], grid["whole"]
    assert grid["only"][0] == 0 and "[1/1] bbc_news/bitfit/seed0: starting" in grid["only"][1]
    assert rc == 1  # a cell failed, the others finished
    for name in ("bitfit/seed0", "bitfit/seed1", "spafit/seed0", "spafit/seed1"):
        res = results(exp, f"bbc_news/{name}")
        assert res["steps"] == 2 and res["method"] == name.split("/")[0]
    assert (exp / "runs/bbc_news/bitfit/seed0/results.json").stat().st_mtime_ns == grid["kept"]
    assert "[1/6] bbc_news/bitfit/seed0: finished before, skipped" in out
    assert "[5/6] bbc_news/spafit/seed1: resuming" in out
    error = (exp / "runs/bbc_news/broken/seed0/error.txt").read_text()
    assert error.startswith("MaskingError: method.n1=5") and error.count("\n") == 1
    assert re.search(r"\[6/6\] bbc_news/broken/seed1: FAILED \(MaskingError: .*\) in \dm\d\ds · elapsed \dm\d\ds · last cell", out)
    assert re.search(r"\[2/6\] bbc_news/spafit/seed0: accuracy 0\.\d{4} in \dm\d\ds · elapsed \dm\d\ds · about \dm\d\ds left", out)
    assert "3 trained, 1 finished before, 2 failed, 0 not run" in out
    assert (exp / "experiment.yaml").read_text() == grid["path"].read_text()


def test_report_at_the_end_holds_the_runs_numbers(grid, tiny_model_dir):
    exp = grid["exp"]
    rows = report_rows(exp / "report/summary.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [("bitfit", "0"), ("bitfit", "1"), ("spafit", "0"), ("spafit", "1")]
    for row in rows:
        res = results(exp, f"bbc_news/{row['method']}/seed{row['seed']}")
        assert int(row["trainable_params"]) == res["trainable_params"]
        assert float(row["main_value"]) == res["eval"]["accuracy"] and row["main_metric"] == "accuracy"
    # the trainable-parameter column is the plan's count of the model's parameters
    cell = next(c for c in load_experiment(grid["path"])[0] if c.name == "bbc_news/spafit/seed0")
    cfg = cell.config()
    from spafit_jax.training.plan import make_plan

    plan = make_plan(cfg.method, 3)
    _, params = hf.load_pretrained(tiny_model_dir, num_labels=5, lora=plan.lora)
    assert plan.label(params).trainable_params == results(exp, "bbc_news/spafit/seed0")["trainable_params"]
    table = (exp / "report/table.md").read_text()
    for method in ("bitfit", "spafit"):
        runs = [results(exp, f"bbc_news/{method}/seed{s}") for s in (0, 1)]
        line = next(x for x in table.splitlines() if x.startswith(f"| {method} |"))
        assert f"| {tables.count_text(runs[0]['trainable_params'])} | {runs[0]['trainable_percent']:.2f} |" in line
        mean = 50 * (runs[0]["eval"]["accuracy"] + runs[1]["eval"]["accuracy"])
        assert f"{mean:.1f} ± " in line
    ranked = table.split("Left out of this table")[0]
    assert "broken" not in ranked and "bbc_news (accuracy)" in ranked
    assert "- bbc_news/broken/seed0: failed: MaskingError" in table  # listed below the table, with its reason
    page = (exp / "report/index.html").read_text()
    assert "bbc_news/broken/seed0: failed: MaskingError" in page
    for name in ("params_vs_metric", "loss_curves", "strata"):
        assert (exp / f"report/{name}.png").stat().st_size > 1000 and f"src='{name}.svg'" in page


def test_rerun_trains_nothing_and_retries_failures(grid):
    rc, out = run_main("--config", grid["path"], "--workdir", grid["exp"], "--no-report", "train.lr=0.5")
    assert rc == 1 and "0 trained, 4 finished before, 2 failed" in out
    assert "bbc_news/spafit/seed1: finished before, skipped (its config.yaml differs in train.lr; delete" in out
    assert grid["exp"].joinpath("runs/bbc_news/bitfit/seed0/results.json").stat().st_mtime_ns == grid["kept"]


def test_fail_fast_stops_at_the_first_failure(grid):
    rc, out = run_main("--config", grid["path"], "--workdir", grid["exp"], "--only", "broken", "--fail-fast",
                       "--no-report")
    assert rc == 1 and "[1/2] bbc_news/broken/seed0: FAILED" in out and "--fail-fast" in out
    assert "[2/2]" not in out


def test_dry_run_lists_states_and_shards_cover_the_grid(grid):
    rc, out = run_main("--config", grid["path"], "--workdir", grid["exp"], "--dry-run")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 6
    assert "bbc_news/bitfit/seed0: finished" in lines[0] and "bbc_news/broken/seed0: failed before" in lines[2]
    cells = load_experiment(grid["path"])[0]
    halves = [select(cells, shard=f"{i}/2") for i in (0, 1)]
    assert sorted(c.name for h in halves for c in h) == sorted(c.name for c in cells) and len(halves[0]) == 3
    rc, out = run_main("--config", grid["path"], "--workdir", grid["exp"], "--dry-run", "--shard", "1/2", "--only", "seed1")
    assert rc == 0 and [x.split(":")[0] for x in out.splitlines()] == ["[1/1] bbc_news/spafit/seed1"]


def test_grid_labels_drops_invalid_points_and_orders_overrides(tmp_path):
    path = write(tmp_path, configs=["configs/default.yaml"], overrides={"train.max_steps": 3},
                 tasks={"bbc": {"data.task": "bbc_news"}},
                 methods={"bitfit": {"config": "configs/methods/bitfit.yaml"},
                          "spafit": {"method.name": "spafit", "grid": {"method.n1": [0, 1, 2], "method.n2": [1, 2]}}},
                 grid={"train.lr_by_label.head": [1e-3]}, seeds=[7])
    cells, notes = load_experiment(path, ["train.epochs=2"])
    assert [c.method for c in cells] == ["bitfit", "spafit@n1=0,n2=1", "spafit@n1=0,n2=2", "spafit@n1=1,n2=1",
                                         "spafit@n1=1,n2=2", "spafit@n1=2,n2=2"]
    assert len(notes) == 1 and "spafit@n1=2,n2=1" in notes[0] and "n1=2 > n2=1" in notes[0]
    bitfit, last = cells[0].config(), cells[-1].config()
    assert bitfit.train.lr == 1e-3 and bitfit.train.seed == 7 and bitfit.train.max_steps == 3  # the method file
    assert bitfit.train.epochs == 2 and bitfit.train.lr_by_label == {"head": 1e-3}
    assert (last.method.n1, last.method.n2) == (2, 2) and cells[0].folder("E") == Path("E/runs/bbc/bitfit/seed7")


@pytest.mark.parametrize("data, argv, message", [
    (None, [], "experiment file"),
    ({"tasks": ["bbc_news"], "method": {}}, [], "unknown key 'method'; did you mean 'methods'?"),
    ({"tasks": ["bbc_news"], "methods": {"a": {"method.nn1": 2}}}, [], "did you mean 'method.n1'?"),
    ({"tasks": ["bbc_news"], "methods": {}}, [], "grid is empty"),
    ({"tasks": ["bbc_news"], "methods": ["bitfit"], "grid": {"train.lr": []}}, [], "train.lr has no values"),
    ({"tasks": ["bbc_news"], "methods": ["bitfit"], "seeds": []}, [], "seeds must be"),
    ({"tasks": ["bbc_news"], "methods": ["bitfit"]}, ["--only", "nothing"], "no cell matches --only nothing"),
    ({"tasks": ["bbc_news"], "methods": ["bitfit"]}, ["--shard", "2/2"], "--shard 2/2"),
    ({"tasks": ["bbc_news"], "methods": {"a": {"method.name": "nope"}}}, [], "bbc_news/a/seed0: method.name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, data, argv, message):
    path = write(tmp_path, **data) if data is not None else tmp_path / "missing.yaml"
    assert main(["--config", str(path), "--workdir", str(tmp_path / "E"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "E").exists()


def test_an_unwritable_experiment_folder_is_one_line(tmp_path, capsys):
    path = write(tmp_path, tasks=["bbc_news"], methods=["bitfit"])
    (tmp_path / "file").write_text("not a folder")
    assert main(["--config", str(path), "--workdir", str(tmp_path / "file" / "E")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1 and "--workdir" in err, err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_shipped_experiments_load():
    cells = {p.stem: load_experiment(p)[0] for p in (ROOT / "configs/experiments").glob("*.yaml")}
    paper = cells["bbc_news_paper"]
    assert len(paper) == 15 and {c.method for c in paper} == {"full", "bitfit", "lora", "spafit-2-4", "spafit-1-3"}
    assert {(c.config().method.n1, c.config().method.n2) for c in paper if c.method.startswith("spafit")} == {(2, 4), (1, 3)}
    assert all(c.config().model.name == "minilm" for c in paper) and len(cells["smoke"]) == 6
    offline = cells["offline"]
    assert len(offline) == 60 and {c.task for c in offline} == {"bbc_news", "tweets"}
    by_method = {c.method: c.config() for c in offline if c.task == "tweets" and c.seed == 0}
    assert len(by_method) == 10 and by_method["full"].train.lr == 1e-4 and by_method["full"].data.max_length == 64
    variants = {(m.method.n1, m.method.n2, m.method.stratum3_bias) for m in by_method.values() if m.method.name == "spafit"}
    assert variants == {(n, n + 2, bias) for n in (1, 2, 3) for bias in (True, False)}
    glue = cells["glue_paper"]
    assert len(glue) == 135 and len({c.task for c in glue}) == 9
    assert {c.config().model.name for c in glue} == {"bert-large-cased"}


def test_the_time_left_counts_the_cells_the_caller_runs_later(tmp_path, monkeypatch):
    """A selection runs its grid a method at a time: the estimate after each chunk counts the later ones too."""
    from spafit_jax.errors import SpafitError
    from spafit_jax.experiments import grid as grid_lib
    from spafit_jax.training import trainer

    def fails(cfg, folder):
        raise SpafitError("no training here")

    monkeypatch.setattr(trainer, "train_and_evaluate", fails)
    cell = grid_lib.Cell("bbc_news", "bitfit", 0, ("configs/default.yaml",), ())
    lines: list[str] = []
    grid_lib.run_cells([cell], tmp_path, echo=lines.append, later=3)
    grid_lib.run_cells([cell], tmp_path, echo=lines.append)
    assert re.search(r"FAILED .* · about \dm\d\ds left$", lines[1]) and lines[3].endswith("· last cell"), lines
