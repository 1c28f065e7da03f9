"""protocol on an experiment with `budgets:`, written by the experiment's own code without training: selection's
search cells, extensions, choices (`selection.plan` / `decide`) and selection.json (`seedruns.write_index`), each
cell's results.json by `results.Results` with its `code` record; only the dev and test scores are made up. Methods
are compared per budget, each method's longer budget against its first, choices on a grid edge are marked, and mixed
commits are said in the table and the published evidence."""

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from spafit_jax.experiments import expstate, selection, seedruns
from spafit_jax import protocol
from spafit_jax.experiments import protocol_files
from spafit_jax.experiments import protocol_report
from spafit_jax.training import results
from spafit_jax.experiments.devsplit import Split

N = 300
DEV = {"bitfit-short": {1e-3: 0.6, 1e-2: 0.7, 0.1: 0.65},  # top edge, extended once: bracketed
       "bitfit-long": {1e-3: 0.7, 1e-2: 0.6, 1e-4: 0.65},  # bottom edge, extended once: bracketed
       "lora-short": {1e-3: 0.6, 1e-2: 0.7, 0.1: 0.65},
       "lora-long": {1e-3: 0.5, 1e-2: 0.7, 0.1: 0.8}}  # still on the top edge after select.extend=1: not bracketed
TEST = {"bitfit-short": 0.60, "bitfit-long": 0.85, "lora-short": 0.80, "lora-long": 0.81}  # test accuracy per method
OTHER = {"version": "0.0.0", "commit": "b" * 40, "dirty": True}  # the code one seed ran on (--allow-mixed-commits)


def _results(folder: Path, label: str, dev: float, code: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    results.Results(task="bbc_news", method=label, model="minilm", trainable_params=100 + len(label),
                    total_params=10_000, eval={"accuracy": dev}, steps=2, best=results.Best(2, "accuracy", dev),
                    train_seconds=1.0, code=code).write(folder)


def _test(folder: Path, labels: np.ndarray, right: np.ndarray) -> None:
    pred = np.where(right, labels, (labels + 1) % 3)
    with open(folder / seedruns.TEST_PREDICTIONS, "wb") as f:
        np.savez(f, logits=np.eye(3, dtype=np.float32)[pred], labels=labels)
    (folder / seedruns.TEST_JSON).write_text(json.dumps(
        {"split": "test", "examples": N, "step": 2, "metrics": {"accuracy": float((pred == labels).mean())},
         "sha256": "0" * 64}))


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("budgets")
    path = root / "budgets.yaml"
    path.write_text(yaml.safe_dump({
        "configs": ["configs/default.yaml"], "tasks": ["bbc_news"],
        "methods": {"bitfit": {"method.name": "bitfit"}, "lora": {"method.name": "lora"}},
        "budgets": {"short": {"train.max_steps": 2}, "long": {"train.max_steps": 4}}, "seeds": 3,
        "select": {"grid": {"train.lr": [1e-3, 1e-2]}, "dev": {"size": 40, "seed": 0}, "extend": 1}}, sort_keys=False))
    work = root / "EXP"
    cells, search, _ = selection.load(path)
    split_of = {"bbc_news": Split(work / "data" / "bbc_news", (), {})}
    base, _ = selection.search_cells(cells, search, split_of)
    here = results.code_version()
    while True:  # train nothing: each search cell (extensions as plan calls for them) gets its dev score
        planned = selection.plan(cells, search, base, split_of, work)
        todo = [c for group, *_ in planned.values() for c in group if not (c.folder(work) / "results.json").exists()]
        if not todo:
            break
        for c in todo:
            _results(c.folder(work), c.method, DEV[c.base][dict(c.point)["train.lr"]], here)
    choices, _ = selection.decide(search, planned, work, write=True)
    search_all = [c for group, *_ in planned.values() for c in group]
    seeds = selection.seed_cells(cells, choices, split_of, search_all)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    for c in seeds:
        if not (c.folder(work) / "results.json").exists():
            code = OTHER if (c.base, c.seed) == ("lora-long", 2) else here
            _results(c.folder(work), c.method, 0.7, code)
        _test(c.folder(work), labels, rng.random(N) < TEST[c.base] + 0.02 * (c.seed - 1))
    commits = expstate.check_commits(expstate.finished_folders(work), {}, True)
    seedruns.write_index(work, split_of, search_all, choices, seeds, commits)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = protocol.main([str(work), "--publish", str(root / "pub")])
    assert rc == 0, err.getvalue()
    return {"work": work, "pub": root / "pub", "here": here, "labels": labels}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_methods_are_compared_only_at_the_same_budget(exp):
    table = (exp["pub"] / "table.md").read_text()
    short, long_ = table.index("### bbc_news, budget short"), table.index("### bbc_news, budget long")
    assert short < long_ and "| lora-long |" not in table[short:long_] and "| bitfit-short |" not in table[long_:]
    rows = {r["method"]: r for r in _csv(exp["pub"] / "protocol.csv")}
    assert {m: r["budget"] for m, r in rows.items()} == {m: m.split("-")[1] for m in TEST}
    assert rows["lora-short"]["best"] == "True" and rows["bitfit-long"]["best"] == "True"  # one best per budget
    pairs = [p for p in _csv(exp["pub"] / "differences.csv") if p["compared"] == "methods"]
    assert sorted((p["a"], p["b"], p["budget"]) for p in pairs) == [("bitfit-long", "lora-long", "long"),
                                                                     ("lora-short", "bitfit-short", "short")]


def test_the_longer_budget_is_compared_with_the_first_per_method(exp):
    pairs = {p["a"]: p for p in _csv(exp["pub"] / "differences.csv") if p["compared"] == "budgets"}
    assert set(pairs) == {"bitfit-long", "lora-long"} and pairs["bitfit-long"]["b"] == "bitfit-short"
    assert pairs["bitfit-long"]["budget"] == "long - short"
    with np.load(exp["pub"] / "evidence" / "predictions-bbc_news.npz") as f:  # brute force from the evidence
        acc = {k: (f[k] == f["labels"]).mean() for k in f.files if k != "labels"}
    for a, p in pairs.items():
        mean = {m: np.mean([v for k, v in acc.items() if k.startswith(m + "@")]) for m in (a, p["b"])}
        assert float(p["diff"]) == pytest.approx(mean[a] - mean[p["b"]])
        assert float(p["low"]) < float(p["diff"]) < float(p["high"])
    assert pairs["bitfit-long"]["significant"] == "True" and pairs["lora-long"]["significant"] == "False"
    table = (exp["pub"] / "table.md").read_text()
    assert "### Does the longer budget help?" in table and "| bitfit | bitfit-long − bitfit-short | +" in table


def test_extensions_and_a_choice_left_on_its_grid_edge_are_said(exp):
    rows = {r["method"]: r for r in _csv(exp["pub"] / "protocol.csv")}
    assert rows["bitfit-short"]["extensions"] == "lr=0.1" and rows["bitfit-short"]["rests_on"] == "3"
    assert rows["bitfit-long"]["extensions"] == "lr=0.0001" and rows["bitfit-short"]["bracketed"] == "True"
    assert rows["lora-long"]["bracketed"] == "False" and "select.extend=1" in rows["lora-long"]["extension_stopped"]
    table = (exp["pub"] / "table.md").read_text()
    assert "| lora-long | 0.1K | lr=0.1 † |" in table
    assert "- lora-long: lr=0.1 (†) sits on the edge of its grid, not bracketed: train.lr=0.1 is the highest" in table
    assert "- bitfit-short: grid extended past its edge (lr=0.1); the choice rests on 3 complete search cells" in table


def test_mixed_commits_are_said_in_the_table_and_the_evidence(exp):
    here = expstate.version_name(exp["here"]) if exp["here"].get("commit") else None
    other = expstate.version_name(OTHER)
    index = json.loads((exp["work"] / "selection.json").read_text())
    assert index["mixed_commits"] is (here is not None) and other in index["commits"]
    table = (exp["pub"] / "table.md").read_text()
    rows = {r["method"]: r for r in _csv(exp["pub"] / "protocol.csv")}
    assert other in rows["lora-long"]["commits"].split(", ") and other not in rows["lora-short"]["commits"]
    cells = json.loads((exp["pub"] / "evidence" / "cells.json").read_text())
    odd = next(c for c in cells["cells"] if c["folder"] == "runs/bbc_news/lora-long/seed2")
    assert odd["commit"] == "b" * 40 + "+dirty" and odd["results"]["code"] == OTHER
    if here is not None:  # a git checkout: every other cell recorded this process's commit from results.json's code
        assert "Code: MIXED COMMITS" in table and here in table and other in table
        assert cells["counts"]["mixed_commits"] is True
        # 8 search cells + 4 extensions + 8 seeds that are not a search cell, each counted once under its commit
        assert cells["counts"]["commits"][odd["commit"]] == 1 and sum(cells["counts"]["commits"].values()) == 20
        assert {c["commit"] for c in cells["cells"] if c is not odd} == {
            exp["here"]["commit"] + ("+dirty" if exp["here"]["dirty"] else "")}


def test_the_published_tables_are_recomputed_from_the_evidence(exp):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert protocol.main(["--from-published", str(exp["pub"])]) == 0
    assert "identical" in out.getvalue()


@pytest.mark.parametrize("value", [3, ""])
def test_a_bad_budget_field_is_one_line(exp, tmp_path, value):
    index = json.loads((exp["work"] / "selection.json").read_text())
    index["seeds"][0]["budget"] = value
    with pytest.raises(protocol_files.ProtocolError, match=r"not a selection.json .*\(bad or missing field budget\)"):
        protocol_files.check_index(index, tmp_path / "selection.json")


def test_a_bad_choice_field_is_one_line(exp, tmp_path):
    index = json.loads((exp["work"] / "selection.json").read_text())
    index["choices"]["bbc_news/lora-long"]["bracketed"] = "no"
    with pytest.raises(protocol_files.ProtocolError, match="bracketed, extension_stopped"):
        protocol_files.check_index(index, tmp_path / "selection.json")


def test_dev_curves_have_a_panel_per_budget_and_a_line_per_value_of_the_other_keys(exp, tmp_path):
    from spafit_jax.experiments import protocol_plots

    index = json.loads((exp["work"] / "selection.json").read_text())
    for i, e in enumerate(index["search"]):  # as if each method searched a second key (SPAFIT's n1) with the rate
        e["point"]["method.n1"] = i % 2
    points = protocol_plots._dev_points(exp["work"], index)
    assert list(points) == ["bbc_news, budget short", "bbc_news, budget long"]
    lines = points["bbc_news, budget short"]
    assert {(m, rest) for _, m, rest in lines} == {(m, (("method.n1", k),)) for m in ("bitfit-short", "lora-short")
                                                   for k in (0, 1)}
    assert sum(len(v) for panel in points.values() for v in panel.values()) == len(index["search"])
    assert protocol_plots.plot_dev_curves(exp["work"], index, tmp_path) == ["dev_curves.png", "dev_curves.svg"]


def test_family_and_the_commit_line_without_selections_record():
    assert protocol_report.family("lora-long", "long") == "lora" and protocol_report.family("spafit-1-3", None) == "spafit-1-3"
    assert protocol_report.family("long", "long") == "long"  # a method named like its budget keeps its name
    rows = [{"commits": "abc1234"}, {"commits": "abc1234, def5678"}, {"commits": ""}]
    mixed = "Code: MIXED COMMITS: abc1234, def5678; each row's commits are in protocol.csv."
    assert protocol_report.commits_note({}, rows) == mixed
    assert protocol_report.commits_note({}, rows[:1]) == "Code: commit abc1234."
    assert protocol_report.commits_note({}, rows[2:]) == "Code: the cells recorded no commit."
    assert protocol_report.commits_note({"commits": {"c" * 12: 4}, "mixed_commits": False}, rows) == (
        f"Code: every finished cell ran on commit {'c' * 12} (4 cells).")
