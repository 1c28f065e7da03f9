"""The protocol command on synthetic experiment folders (no training): the seed-aware intervals in its tables,
one-line refusals of damaged inputs and outputs with nothing changed, and the published evidence recomputed."""

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from spafit_jax import protocol
from spafit_jax.experiments import protocol_report

N = 240
METHODS = {"alpha": 0.78, "beta": 0.70}  # each method's mean accuracy


def _write_cell(folder: Path, method: str, dev: float, root: Path, commit: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    results = {"task": "bbc_news", "method": method, "trainable_params": 1000 + len(method), "steps": 10,
               "eval": {"accuracy": dev}, "best": {"step": 10, "metric": "accuracy", "value": dev},
               "train_seconds": 2.5, "model": str(root / "models" / "minilm")}
    if commit:
        results["code_version"] = commit
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(root / "models" / "minilm")},
                                                        "train": {"lr": 0.01}, "workdir": str(folder)}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))


def _score(folder: Path, labels: np.ndarray, right: np.ndarray) -> None:
    pred = np.where(right, labels, (labels + 1) % 3)
    logits = np.eye(3, dtype=np.float32)[pred] + np.float32(0.01)
    with open(folder / "test_predictions.npz", "wb") as f:
        np.savez(f, logits=logits, labels=labels)
    (folder / "test.json").write_text(json.dumps({"split": "the task's split 'validation'", "examples": len(labels),
                                                  "step": 10, "metrics": {"accuracy": float((pred == labels).mean())}}))


def make_exp(root: Path, *, spread: float, seeds: int = 4, rng_seed: int = 0) -> Path:
    """An experiment folder as `selection` leaves it: two methods, two searched rates each, `seeds` seeds at the
    chosen one (seed 0 its search cell). Seeds' accuracies differ by up to ±spread (0: identical predictions)."""
    rng = np.random.default_rng(rng_seed)
    exp = root / "EXP"
    labels = rng.integers(0, 3, N)
    index = {"splits": {"bbc_news": {"sizes": {"dev": 40, "test": N}}}, "search": [], "choices": {}, "seeds": []}
    for m, p in METHODS.items():
        for lr in (0.01, 0.03):
            folder = f"search/runs/bbc_news/{m}@lr={lr}/seed0"
            index["search"].append({"task": "bbc_news", "method": m, "label": f"{m}@lr={lr}",
                                    "point": {"train.lr": lr}, "seed": 0, "folder": folder})
            _write_cell(exp / folder, m, 0.8 if lr == 0.01 else 0.7, root, "abc1234")
        failed = []
        if m == "beta":  # one more search cell, which failed
            folder = "search/runs/bbc_news/beta@lr=0.1/seed0"
            index["search"].append({"task": "bbc_news", "method": m, "label": "beta@lr=0.1",
                                    "point": {"train.lr": 0.1}, "seed": 0, "folder": folder})
            (exp / folder).mkdir(parents=True)
            (exp / folder / "error.txt").write_text(f"loss is NaN at step 3 (see {exp / folder})\n")
            failed = [{"label": "beta@lr=0.1", "error": "loss is NaN at step 3"}]
        index["choices"][f"bbc_news/{m}"] = {"chosen": {"train.lr": 0.01}, "label": f"{m}@lr=0.01",
                                             "metric": "accuracy", "dev": 0.8, "ties": [], "failed": failed}
        shared = rng.random(N) < p
        for s in range(seeds):
            folder = f"search/runs/bbc_news/{m}@lr=0.01/seed0" if s == 0 else f"runs/bbc_news/{m}/seed{s}"
            index["seeds"].append({"task": "bbc_news", "method": m, "seed": s, "folder": folder})
            if s:
                _write_cell(exp / folder, m, 0.8, root, "def5678" if s == seeds - 1 else None)
            ps = p + spread * (2 * s / max(seeds - 1, 1) - 1)
            _score(exp / folder, labels, shared if spread == 0 else rng.random(N) < ps)
    (exp / "selection.json").write_text(json.dumps(index, indent=1))
    return exp


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = protocol.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A synthetic experiment whose seeds disagree, its report and its published evidence."""
    root = tmp_path_factory.mktemp("protocol")
    exp = make_exp(root, spread=0.08)
    rc, out, err = run(exp, "--publish", root / "pub")
    assert rc == 0, err
    return {"root": root, "exp": exp, "pub": root / "pub", "out": out}


def test_seeds_that_disagree_give_wider_intervals_than_examples_only(published):
    beta = next(r for r in read_csv(published["pub"] / "protocol.csv") if r["method"] == "beta")
    seeds_and_examples = float(beta["high"]) - float(beta["low"])
    examples_only = float(beta["examples_high"]) - float(beta["examples_low"])
    assert seeds_and_examples > 1.3 * examples_only
    assert float(beta["test_low"]) < float(beta["test_mean"]) < float(beta["test_high"])
    table = (published["pub"] / "table.md").read_text()
    assert "| beta | " in table and "seeds resampled per method" in table and "Δ [95% CI, examples only]" in table
    pairs = read_csv(published["pub"] / "differences.csv")
    assert [(p["a"], p["b"]) for p in pairs] == [("alpha", "beta")]
    assert float(pairs[0]["diff"]) == pytest.approx(-float(beta["diff"]))


def test_seeds_that_agree_give_the_examples_only_interval(tmp_path):
    exp = make_exp(tmp_path, spread=0.0, rng_seed=1)
    rows = protocol_report.rows(protocol_report.collect(exp), resamples=4000)
    beta = next(r for r in rows if r["method"] == "beta")
    width = beta["examples_high"] - beta["examples_low"]
    assert beta["low"] == pytest.approx(beta["examples_low"], abs=0.08 * width)
    assert beta["high"] == pytest.approx(beta["examples_high"], abs=0.08 * width)


def test_published_evidence_recomputes_every_number(published, tmp_path):
    pub, root = published["pub"], published["root"]
    rc, out, err = run("--from-published", pub)
    assert rc == 0 and "identical" in out, err
    # independently of protocol's code: each test mean is the seeds' mean accuracy on the published predictions
    with np.load(pub / "evidence" / "predictions-bbc_news.npz") as f:
        arrays = {k: f[k] for k in f.files}
    for row in read_csv(pub / "protocol.csv"):
        accs = [(v == arrays["labels"]).mean() for k, v in arrays.items() if k.startswith(row["method"] + "@")]
        assert len(accs) == 4 and float(row["test_mean"]) == pytest.approx(np.mean(accs))
    cells = json.loads((pub / "evidence" / "cells.json").read_text())
    assert cells["counts"]["trainings"] == 10  # 4 search cells + 3 more seeds per method; seed 0 counted once
    assert cells["counts"]["seed_runs_that_are_search_cells"] == 2
    assert (cells["counts"]["search_cells"], cells["counts"]["failed_or_unfinished"]) == (5, 1)
    failed = next(c for c in cells["cells"] if c["folder"].endswith("beta@lr=0.1/seed0"))
    assert failed["results"] is None and failed["error"] == f"loss is NaN at step 3 (see {failed['folder']})"
    assert "- beta: 1 search cell(s) failed" in (pub / "table.md").read_text()
    assert cells["counts"]["commits"] == {"abc1234": 4, "not recorded": 4, "def5678": 2}
    cell = cells["cells"][0]
    assert cell["config"]["train"]["lr"] == 0.01 and cell["results"]["eval"]["accuracy"] == 0.8
    assert cell["config"]["model"]["name"] == "<local>/minilm" and cell["config"]["workdir"] == cell["folder"]
    for path in pub.rglob("*"):  # no machine path anywhere
        if path.suffix in (".json", ".md", ".csv"):
            assert str(root) not in path.read_text() and "/tmp" not in path.read_text()
    # a changed table is caught; a table recomputed elsewhere is written there
    tampered = tmp_path / "pub"
    shutil.copytree(pub, tampered)
    (tampered / "table.md").write_text((pub / "table.md").read_text().replace("| beta |", "| gamma |"))
    rc, _, err = run("--from-published", tampered)
    assert rc == 1 and err.startswith("error: table.md of") and err.count("\n") == 1
    rc, _, _ = run("--from-published", pub, "--out", tmp_path / "again")
    assert rc == 0 and (tmp_path / "again" / "table.md").read_text() == (pub / "table.md").read_text()


def _damage(exp: Path, case: str) -> None:
    seed1 = exp / "runs/bbc_news/beta/seed1"
    if case == "selection truncated":
        (exp / "selection.json").write_text((exp / "selection.json").read_text()[:200])
    elif case == "selection not an index":
        (exp / "selection.json").write_text(json.dumps({"seeds": [{"task": "t"}], "choices": {}}))
    elif case == "a choice that is not one":
        index = json.loads((exp / "selection.json").read_text())
        index["choices"]["bbc_news/beta"]["chosen"] = "lr=0.01"
        (exp / "selection.json").write_text(json.dumps(index))
    elif case == "test.json truncated":
        (seed1 / "test.json").write_text('{"metrics": {"accur')
    elif case == "results.json truncated":
        (seed1 / "results.json").write_text('{"eval": ')
    elif case == "search results truncated":
        (exp / "search/runs/bbc_news/beta@lr=0.03/seed0/results.json").write_text("{")
    elif case == "predictions missing":
        (seed1 / "test_predictions.npz").unlink()
    elif case == "predictions truncated":
        data = (seed1 / "test_predictions.npz").read_bytes()
        (seed1 / "test_predictions.npz").write_bytes(data[: len(data) // 2])
    elif case == "predictions of another seed":
        shutil.copy(exp / "runs/bbc_news/alpha/seed1/test_predictions.npz", seed1 / "test_predictions.npz")
    elif case == "predictions of fewer examples":
        with np.load(seed1 / "test_predictions.npz") as f:
            logits, labels = f["logits"][:100], f["labels"][:100]
        with open(seed1 / "test_predictions.npz", "wb") as f:
            np.savez(f, logits=logits, labels=labels)
        record = json.loads((seed1 / "test.json").read_text())
        record.update(examples=100, metrics={"accuracy": float((logits.argmax(-1) == labels).mean())})
        (seed1 / "test.json").write_text(json.dumps(record))


@pytest.mark.parametrize("case, message", [
    ("selection truncated", "selection.json is not valid JSON"),
    ("selection not an index", "not a selection.json written by the experiment"),
    ("a choice that is not one", "bad or missing field chosen"),
    ("test.json truncated", "test.json is not valid JSON"),
    ("results.json truncated", "results.json is not valid JSON"),
    ("search results truncated", "results.json is not valid JSON"),
    ("predictions missing", "test_predictions.npz is missing"),
    ("predictions truncated", "is not readable predictions"),
    ("predictions of another seed", "mismatched files"),
    ("predictions of fewer examples", "was scored on other test labels"),
])
def test_a_damaged_experiment_is_one_line_and_nothing_written(tmp_path, case, message):
    exp = make_exp(tmp_path, spread=0.05, seeds=2)
    _damage(exp, case)
    before = snapshot(tmp_path)
    rc, out, err = run(exp)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert snapshot(tmp_path) == before and not (exp / "report").exists()


def test_outputs_that_are_not_ours_are_refused(tmp_path):
    exp = make_exp(tmp_path, spread=0.05, seeds=2)
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "table.md").write_text("my own table")
    (tmp_path / "mine2").mkdir()
    (tmp_path / "mine2" / "protocol.csv").write_text("my,own\n")
    cases = [("--out", tmp_path / "a-file", "is a file, not a folder"),
             ("--out", tmp_path / "a-file" / "sub", "is a file, not a folder"),
             ("--out", tmp_path / "mine", "already holds table.md, which protocol did not write"),
             ("--publish", tmp_path / "mine2", "already holds protocol.csv"),
             ("--from-published", tmp_path / "mine", "holds no published evidence")]
    before = snapshot(tmp_path)
    for flag, path, message in cases:
        rc, out, err = run(*([exp] if flag != "--from-published" else []), flag, path)
        assert rc == 2 and out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    # its own folder protocol may write again, unless a file in it was changed since
    assert run(exp, "--out", tmp_path / "rep")[0] == 0
    assert run(exp, "--out", tmp_path / "rep")[0] == 0
    (tmp_path / "rep" / "table.md").write_text("edited by hand")
    rc, _, err = run(exp, "--out", tmp_path / "rep")
    assert rc == 2 and "which changed since" in err.replace("(or which changed since)", "which changed since")
    assert (tmp_path / "rep" / "table.md").read_text() == "edited by hand"


def test_scrub_drops_machine_paths_and_keeps_the_rest(tmp_path):
    from spafit_jax.experiments import evidence

    exp = tmp_path / "EXP"
    record = {"workdir": str(exp / "runs/t/m/seed1"), "model": "/opt/models/all-MiniLM-L6-v2",
              "note": f"read {exp}/data/t/test.jsonl and ~/cache/x.bin", "label": "m@lr=0.001/seed0",
              "ratio": "1/3", "n": 3, str(exp / "k"): [str(exp)]}
    assert evidence.scrub(record, exp) == {
        "workdir": "runs/t/m/seed1", "model": "<local>/all-MiniLM-L6-v2",
        "note": "read data/t/test.jsonl and <local>/x.bin", "label": "m@lr=0.001/seed0", "ratio": "1/3", "n": 3,
        "k": ["."]}
    assert evidence.commit_of({"steps": 3}, {"code_version": {"commit": "abc"}}) == "abc"
    assert evidence.commit_of({"git_commit": "def"}) == "def" and evidence.commit_of(None, {}) is None


@pytest.mark.parametrize("name", ["fair_budgets"])
def test_the_published_verdict_recomputes_from_its_evidence(name, tmp_path):
    """docs/results/<name> (the README's verdict) stays recomputable by this code: the tables from its evidence
    alone equal the published ones byte for byte, and each test mean is the seeds' accuracy on the predictions."""
    pub = Path(__file__).resolve().parents[1] / "docs" / "results" / name
    shutil.copytree(pub, tmp_path / name)  # read from a copy: the published folder is never written
    rc, out, err = run("--from-published", tmp_path / name)
    assert rc == 0 and "identical" in out, err
    rows = read_csv(pub / "protocol.csv")
    for task in {r["task"] for r in rows}:
        with np.load(pub / "evidence" / f"predictions-{task}.npz") as f:
            arrays = {k: f[k] for k in f.files}
        for row in (r for r in rows if r["task"] == task):
            accs = [(v == arrays["labels"]).mean() for k, v in arrays.items() if k.startswith(row["method"] + "@")]
            assert len(accs) == int(row["seeds"]) >= 3 and float(row["test_mean"]) == pytest.approx(np.mean(accs))
    assert not any("/work/" in p.read_text() or "/tmp/" in p.read_text()
                   for p in pub.rglob("*") if p.suffix in (".json", ".md", ".csv"))


def test_the_table_and_differences_csv_give_one_interval_per_pair(published):
    """Each method's difference to the best in protocol.csv is differences.csv's best - method, turned round: the
    same draws, so the two files never disagree on an interval or a mark."""
    pub = published["pub"]
    pairs = {(r["task"], r["budget"], r["a"], r["b"]): r for r in read_csv(pub / "differences.csv")}
    rows = read_csv(pub / "protocol.csv")
    checked = 0
    for row in rows:
        if row["diff"] == "":
            continue
        best = next(r["method"] for r in rows if (r["task"], r["budget"]) == (row["task"], row["budget"]) and r["diff"] == "")
        pair = pairs[(row["task"], row["budget"], best, row["method"])]
        for mine, theirs in (("diff", "diff"), ("low", "high"), ("high", "low"), ("examples_low", "examples_high"),
                             ("examples_high", "examples_low")):
            assert float(row[mine]) == pytest.approx(-float(pair[theirs]), abs=1e-12), (row["method"], mine)
        assert row["significant"] == pair["significant"]
        checked += 1
    assert checked >= 1
