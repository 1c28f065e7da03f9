"""The report over synthetic run folders (written here, no training): csv, table, pictures, html, CLI."""

import csv
import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from spafit_jax.config import files as config_lib
from spafit_jax.experiments import pictures, tables
from spafit_jax import report
from spafit_jax.experiments import reporting
from spafit_jax.training import rundir

# method label -> (config overrides, trainable params, accuracy of seed 0 on task "a"); "b" scores 0.1 less.
METHODS = {
    "full": (["method.name=full"], 1_000_000, 0.90),
    "bitfit": (["method.name=bitfit"], 1_800, 0.80),
    "spafit@n1=1,n2=2": (["method.name=spafit", "method.n1=1", "method.n2=2"], 2_600, 0.85),
    "spafit@n1=0,n2=2": (["method.name=spafit", "method.n1=0", "method.n2=2"], 3_000, 0.91),
    "spafit@n1=1,n2=3": (["method.name=spafit", "method.n1=1", "method.n2=3"], 2_000, 0.70),
}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score(task, method, seed):
    return METHODS[method][2] - (0.1 if task == "b" else 0.0) + 0.02 * seed


def make_run(folder: Path, model_dir, task: str, method: str, seed: int, evals=(2, 4)) -> None:
    overrides, trainable, _ = METHODS[method]
    cfg = config_lib.load_config([], [f"model.name={model_dir}", f"train.seed={seed}", *overrides])
    folder.mkdir(parents=True)
    rundir.save_config(cfg, folder / "config.yaml")
    value = score(task, method, seed)
    n1, n2 = (cfg.method.n1, cfg.method.n2) if cfg.method.name == "spafit" else (None, None)
    res = {"task": "bbc_news", "method": cfg.method.name, "model": str(model_dir), "n1": n1, "n2": n2,
           "trainable_params": trainable, "total_params": 1_000_000, "trainable_percent": trainable / 1e4,
           "params_by_label": {}, "eval": {"accuracy": value, "macro_f1": value / 2},
           "eval_splits": {"validation": {"accuracy": value, "macro_f1": value / 2}},
           "best": {"step": evals[-1], "metric": "accuracy", "value": value}, "steps": 4, "train_seconds": 1.5,
           "eval_seconds": 0.5, "examples_per_second": 100.0}
    (folder / "results.json").write_text(json.dumps(res))
    lines = [{"step": s, "loss": 2.0 / s + seed, "learning_rate": 1e-3} for s in (1, 2, 3, 4)]
    lines += [{"kind": "eval", "step": s, "split": "validation", "accuracy": value * s / evals[-1]} for s in evals]
    lines.append({"kind": "epoch", "step": 4, "epoch": 1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture(scope="module")
def exp(tiny_model_dir, tmp_path_factory):
    """Two tasks x five methods x two seeds, a failed cell, and the report written once."""
    root = tmp_path_factory.mktemp("report") / "EXP"
    for task in ("a", "b"):
        for method in METHODS:
            for seed in (0, 1):
                make_run(root / "runs" / task / method / f"seed{seed}", tiny_model_dir, task, method, seed)
    (root / "runs/a/broken/seed0").mkdir(parents=True)
    (root / "runs/a/broken/seed0/error.txt").write_text("MaskingError: n1=5 exceeds the 3 layers\n")
    (root / "runs/a/unfinished/seed0").mkdir(parents=True)
    (root / "runs/b/damaged/seed0").mkdir(parents=True)
    (root / "runs/b/damaged/seed0/results.json").write_text('{"task": "b", "meth')
    return root, reporting.write_report(root)


def test_summary_csv_has_a_row_per_run_with_its_numbers(exp):
    root, _ = exp
    rows = read_csv(root / "report/summary.csv")
    assert len(rows) == 20 and {r["task"] for r in rows} == {"a", "b"}
    for row in rows:
        res = json.loads((root / "runs" / row["task"] / row["method"] / f"seed{row['seed']}" / "results.json").read_text())
        assert float(row["main_value"]) == res["eval"]["accuracy"] == float(row["validation/accuracy"])
        assert int(row["trainable_params"]) == res["trainable_params"] and row["n1"] == ("" if res["n1"] is None else str(res["n1"]))
        assert float(row["validation/macro_f1"]) == res["eval"]["macro_f1"] and float(row["train_seconds"]) == 1.5


def test_table_has_a_row_per_method_a_column_per_task_and_marks_the_best(exp):
    root, _ = exp
    lines = (root / "report/table.md").read_text().splitlines()
    assert lines[0] == "| Method | Trainable params | % | a (accuracy) | b (accuracy) | Avg. |"
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[2:7]}
    assert list(rows) == ["full", "spafit@n1=0,n2=2", "spafit@n1=1,n2=2", "spafit@n1=1,n2=3", "bitfit"]  # most params first
    for method, (_, trainable, _) in METHODS.items():
        row = rows[method]
        means = [100 * statistics.fmean(score(t, method, s) for s in (0, 1)) for t in ("a", "b")]
        std = 100 * statistics.stdev([score("a", method, s) for s in (0, 1)])
        assert row[1] == tables.count_text(trainable) and row[2] == f"{trainable / 1e4:.2f}"
        assert row[3].strip("*") == f"{means[0]:.1f} ± {std:.1f}" and row[5].strip("*") == f"{statistics.fmean(means):.1f}"
    bold = [m for m, row in rows.items() if row[3].startswith("**")]
    assert bold == ["spafit@n1=0,n2=2"] and rows["spafit@n1=0,n2=2"][5].startswith("**")
    table = "\n".join(lines[:lines.index("Left out of this table (3):")])
    assert "2 seed(s)" in table.splitlines()[-1] and "broken" not in table  # the failed cell only in the list below


def test_pictures_open_as_images_of_plausible_size(exp):
    from matplotlib.image import imread

    root, files = exp
    names = ["params_vs_metric", "loss_curves", "eval_curves", "heatmap_n1_n2", "strata"]
    for name in names:
        image = imread(root / "report" / f"{name}.png")
        assert image.shape[0] > 150 and image.shape[1] > 300 and image.std() > 0.01, name
        svg = (root / "report" / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 5000, name
    assert set(files) == {"summary.csv", "table.md", "index.html"} | {f"{n}.{e}" for n in names for e in ("png", "svg")}


def test_index_html_shows_table_pictures_and_the_cells_left_out(exp):
    root, _ = exp
    page = (root / "report/index.html").read_text()
    for name in ("params_vs_metric", "loss_curves", "eval_curves", "heatmap_n1_n2", "strata"):
        assert f"<img src='{name}.svg'" in page and f"href='{name}.png'" in page
    assert "<th>a (accuracy)</th>" in page and "<b>" in page and "spafit@n1=0,n2=2" in page
    assert "a/broken/seed0: failed: MaskingError: n1=5" in page
    assert "a/unfinished/seed0: unfinished: no results.json" in page and "b/damaged/seed0: damaged results" in page


def test_table_md_and_stderr_name_every_cell_left_out(exp, tiny_model_dir, tmp_path, capsys):
    """Failed, unfinished and damaged cells are listed with their reason in table.md and on stderr; the
    damaged results.json is left as it was."""
    root, _ = exp
    table = (root / "report/table.md").read_text()
    assert "Left out of this table (3):" in table
    assert all(f"- {cell}: " in table for cell in ("a/broken/seed0", "a/unfinished/seed0", "b/damaged/seed0"))
    assert (root / "runs/b/damaged/seed0/results.json").read_text() == '{"task": "b", "meth'
    E = tmp_path / "E"
    make_run(E / "runs/a/bitfit/seed0", tiny_model_dir, "a", "bitfit", 0)
    (E / "runs/a/bitfit/seed1").mkdir(parents=True)
    capsys.readouterr()
    assert report.main([str(E)]) == 0
    err = capsys.readouterr().err
    assert err == "left out a/bitfit/seed1: unfinished: no results.json yet (re-run the experiment to finish it)\n"
    (tmp_path / "a-file").write_text("mine")
    assert report.main([str(E), "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1 and (tmp_path / "a-file").read_text() == "mine"


def test_layer_kinds_come_from_results_else_from_the_config_plan(tmp_path, tiny_model_dir):
    """results.json names each layer's kind (`Plan.layer_kinds`); an older one without them falls back on the
    plan of the run's config.yaml."""
    make_run(tmp_path / "E/runs/a/spafit/seed0", tiny_model_dir, "a", "spafit@n1=1,n2=2", 0)
    (run,), _ = tables.collect(tmp_path / "E")
    assert run.results.layer_kinds is None and pictures.layer_kinds(run) == ["frozen", "bias only", "LoRA + bias"]
    path = tmp_path / "E/runs/a/spafit/seed0/results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_kinds": ["frozen", "LoRA", "LoRA"]}))
    (run,), _ = tables.collect(tmp_path / "E")
    assert pictures.layer_kinds(run) == ["frozen", "LoRA", "LoRA"]


def test_group3_variants_get_their_own_heatmap_panels_and_csv_column(tiny_model_dir, tmp_path):
    root = tmp_path / "EXP"
    for variant, flag in (("plus", "true"), ("only", "false")):
        for method in ("spafit@n1=1,n2=2", "spafit@n1=1,n2=3"):
            folder = root / "runs" / "a" / f"{method}-{variant}" / "seed0"
            make_run(folder, tiny_model_dir, "a", method, 0)
            cfg = config_lib.load_config([folder / "config.yaml"], [f"method.stratum3_bias={flag}"])
            rundir.save_config(cfg, folder / "config.yaml")  # results.json without the field: config.yaml says
    runs, _ = tables.collect(root)
    assert sorted(r.stratum3 for r in runs) == ["LoRA + bias"] * 2 + ["LoRA only"] * 2
    rows = tables.summary_rows(runs)
    assert {(r["method"].rsplit("-", 1)[1], r["stratum3"]) for r in rows} == {("plus", "LoRA + bias"),
                                                                             ("only", "LoRA only")}
    runs[0].results = dataclasses.replace(runs[0].results, stratum3_bias=False)  # results.json's field wins
    assert runs[0].stratum3 == "LoRA only"
    (tmp_path / "out").mkdir()
    assert pictures.plot_heatmap(tables.Groups(runs), tmp_path / "out") == ["heatmap_n1_n2.png", "heatmap_n1_n2.svg"]


def test_pareto_front_and_counts():
    assert pictures.pareto_front([(10, 1.0), (5, 2.0), (20, 3.0), (30, 2.5), (5, 1.0)]) == [(5, 2.0), (20, 3.0)]
    assert [tables.count_text(n) for n in (950, 12_345, 1_230_000)] == ["950", "12.3K", "1.23M"]


def test_cli_on_run_folders_with_out_dir_and_bad_input(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "some-run"
    make_run(run, tiny_model_dir, "a", "spafit@n1=1,n2=2", 3, evals=(4,))
    other = tmp_path / "other-run"
    make_run(other, tiny_model_dir, "a", "bitfit", 0, evals=(4,))
    assert report.main([str(run), str(other), "--out", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out/summary.csv")
    assert [(r["task"], r["method"], r["seed"]) for r in rows] == [("bbc_news", "spafit@n1=1,n2=2", "3"),
                                                                   ("bbc_news", "bitfit", "0")]
    assert not (tmp_path / "out/eval_curves.png").exists() and not (tmp_path / "out/heatmap_n1_n2.png").exists()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "empty")], [str(tmp_path / "nope")]):
        assert report.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_nan_scores_are_left_out(tmp_path, tiny_model_dir):
    make_run(tmp_path / "E/runs/a/bitfit/seed0", tiny_model_dir, "a", "bitfit", 0)
    path = tmp_path / "E/runs/a/bitfit/seed0/results.json"
    res = json.loads(path.read_text())
    res["eval"]["accuracy"] = None
    path.write_text(json.dumps(res))
    runs, _ = tables.collect(tmp_path / "E")
    assert "| bitfit | 1.8K | 0.18 | – | – |" in tables.table_markdown(tables.Groups(runs))
    assert tables.summary_rows(runs)[0]["main_value"] is None
