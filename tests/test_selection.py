"""Selection on a dev split (tiny random BERT): the carved split, the choice, a rerun, a failed search cell, the
bootstrap interval and the protocol report."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from spafit_jax.experiments import intervals
from spafit_jax.experiments import selection
from spafit_jax.experiment import main

TINY_RUN = {"data.limit_train": 48, "data.limit_eval": 24, "data.max_length": 32, "train.batch_size": 8,
            "train.eval_batch_size": 8, "train.log_every": 1, "train.max_steps": 2}
# bitfit searches two learning rates; lora one rate and two ranks, of which 999 fails at load (hidden size 32).
SELECT = {"grid": {"train.lr": [1.0e-3, 5.0e-2]},
          "methods": {"lora": {"train.lr": [1.0e-2], "method.lora_rank": [2, 999]}},
          "dev": {"size": 40, "seed": 3}, "extend": 0}  # extensions past a grid edge: test_bracketing.py


def run_main(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


def mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name in ("results.json", "test.json")
            or p.parent.name == "bbc_news" and p.suffix == ".json"}


@pytest.fixture(scope="module")
def exp(tiny_model_dir, tmp_path_factory):
    """The search (4 cells, one failing), the choices and 2 seeds per method (seed 0 is the search cell), run
    twice: the second run must train and choose nothing."""
    root = tmp_path_factory.mktemp("selection")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"overrides": {"model.name": str(tiny_model_dir), **TINY_RUN}, "tasks": ["bbc_news"],
                                    "methods": {"bitfit": {"method.name": "bitfit"}, "lora": {"method.name": "lora"}},
                                    "seeds": 2, "select": SELECT}, sort_keys=False))
    work = root / "EXP"
    dry = run_main("--config", path, "--workdir", work, "--dry-run")
    first = run_main("--config", path, "--workdir", work)
    before = mtimes(work)
    second = run_main("--config", path, "--workdir", work, "--no-report")
    return {"path": path, "work": work, "dry": dry, "first": first, "second": second, "before": before}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_dev_split_is_disjoint_from_train_and_test_and_shared_by_every_cell(exp):
    work = exp["work"]
    assert not work.exists() or exp["dry"][0] == 0
    assert "search [1/4] bbc_news/bitfit@lr=0.001/seed0: to do" in exp["dry"][1]
    data = work / "data" / "bbc_news"
    split = {name: lines(data / f"{name}.jsonl") for name in ("train", "dev", "test")}
    texts = {name: {r["text"] for r in rows} for name, rows in split.items()}
    assert len(split["dev"]) >= 40 and len(split["test"]) == 24
    assert not texts["dev"] & texts["train"] and not texts["dev"] & texts["test"] and not texts["train"] & texts["test"]
    info = json.loads((data / "split.json").read_text())
    assert info["stratified"] and sum(info["classes"]["dev"]) == len(split["dev"])
    assert min(info["classes"]["dev"]) >= 7  # stratified: 40 of 5 balanced-ish classes
    reads = set()
    for cfg in work.rglob("config.yaml"):
        d = yaml.safe_load(cfg.read_text())["data"]
        reads.add((d["train_file"], d["eval_file"]))
    assert reads == {(str(data / "train.jsonl"), str(data / "dev.jsonl"))}  # every search cell and seed, both methods


def test_the_chosen_value_is_the_best_dev_score_and_a_failed_cell_is_left_out(exp):
    work = exp["work"]
    assert exp["first"][0] == 1  # the failing search cell
    for method, n in (("bitfit", 2), ("lora", 2)):
        choice = json.loads((work / "choices" / "bbc_news" / f"{method}.json").read_text())
        scores = {}
        for label in [c["label"] for c in choice["candidates"]]:
            res = work / "search/runs/bbc_news" / label / "seed0" / "results.json"
            if res.exists():
                scores[label] = json.loads(res.read_text())["eval"]["accuracy"]
        assert len(choice["candidates"]) == n
        assert choice["dev"] == max(scores.values())
        assert scores[choice["label"]] == max(scores.values())
    lora = json.loads((work / "choices/bbc_news/lora.json").read_text())
    assert lora["label"] == "lora@lr=0.01,lora_rank=2" and lora["chosen"] == {"train.lr": 0.01, "method.lora_rank": 2}
    assert [f["label"] for f in lora["failed"]] == ["lora@lr=0.01,lora_rank=999"]
    assert "method.lora_rank=999" in lora["failed"][0]["error"]
    seed1 = yaml.safe_load((work / "runs/bbc_news/lora/seed1/config.yaml").read_text())
    assert seed1["train"]["lr"] == 0.01 and seed1["method"]["lora_rank"] == 2 and seed1["train"]["seed"] == 1


def test_seeds_are_scored_on_test_and_seed0_is_its_search_cell(exp):
    work = exp["work"]
    index = json.loads((work / "selection.json").read_text())
    folders = {(s["method"], s["seed"]): s["folder"] for s in index["seeds"]}
    assert folders[("lora", 0)] == "search/runs/bbc_news/lora@lr=0.01,lora_rank=2/seed0"
    assert folders[("lora", 1)] == "runs/bbc_news/lora/seed1"
    for folder in folders.values():
        test = json.loads((work / folder / "test.json").read_text())
        with np.load(work / folder / "test_predictions.npz") as f:
            assert test["metrics"]["accuracy"] == pytest.approx(float((f["logits"].argmax(-1) == f["labels"]).mean()))
            assert test["examples"] == len(f["labels"]) == 24


def test_a_rerun_neither_retrains_nor_chooses_again(exp):
    rc, out = exp["second"]
    assert rc == 1  # the failed search cell is retried (and fails again); nothing else runs
    assert "starting" not in out.replace("lora_rank=999/seed0: starting", "")
    assert "0 trained" in out and "2 choices made" in out
    assert mtimes(exp["work"]) == exp["before"]


def test_the_protocol_report(exp):
    table = (exp["work"] / "report" / "table.md").read_text()
    assert "### bbc_news (accuracy x100)" in table and "| lora | " in table and "| bitfit | " in table
    assert "lr=0.01, lora_rank=2" in table and "best" in table
    assert (exp["work"] / "report" / "dev_curves.png").stat().st_size > 0
    assert (exp["work"] / "report" / "train_loss.png").stat().st_size > 0


def test_choose_breaks_ties_by_the_next_metric_then_grid_order_and_survives_failures():
    cand = [{"point": {"lr": 1}, "label": "a", "status": "done", "dev": {"accuracy": 0.8, "macro_f1": 0.7}},
            {"point": {"lr": 2}, "label": "b", "status": "failed", "error": "boom"},
            {"point": {"lr": 3}, "label": "c", "status": "done", "dev": {"accuracy": 0.8, "macro_f1": 0.75}},
            {"point": {"lr": 4}, "label": "d", "status": "done", "dev": {"accuracy": 0.6, "macro_f1": 0.9}}]
    c = selection.choose(cand, "accuracy", ["accuracy", "macro_f1"])
    assert (c["label"], c["ties"], c["tie_broken_by"]) == ("c", ["a", "c"], "macro_f1")
    assert c["failed"] == [{"label": "b", "error": "boom"}]
    same = [dict(x, dev={"accuracy": 0.8, "macro_f1": 0.7}) for x in (cand[0], cand[2])]
    assert selection.choose(same, "accuracy", ["accuracy", "macro_f1"])["tie_broken_by"] == "grid order"
    assert selection.choose(same, "accuracy", ["accuracy"])["label"] == "a"
    assert selection.choose([cand[1]], "accuracy", [])["chosen"] is None


def test_paired_bootstrap_matches_scipy_on_the_per_example_differences():
    from scipy import stats

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    def logits(p_right):  # noqa: E306
        right = rng.random(300) < p_right
        pred = np.where(right, labels, (labels + 1) % 3)
        return np.eye(3)[pred]
    a, b = [logits(0.8), logits(0.75)], [logits(0.7), logits(0.72), logits(0.68)]
    got = intervals.paired_bootstrap(a, b, labels, "accuracy", resamples=2000, seed=1)
    # by hand: each example's correctness averaged over a method's seeds, then a minus b
    d = np.mean([x.argmax(-1) == labels for x in a], 0) - np.mean([x.argmax(-1) == labels for x in b], 0)
    assert got["difference"] == pytest.approx(np.mean([(x.argmax(-1) == labels).mean() for x in a])
                                              - np.mean([(x.argmax(-1) == labels).mean() for x in b]))
    ref = stats.bootstrap((d,), np.mean, n_resamples=2000, method="BCa", random_state=np.random.default_rng(1))
    assert (got["low"], got["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    se = d.std(ddof=1) / np.sqrt(len(d))  # and the normal approximation agrees to within a tenth of a point
    assert got["low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.01)
    assert got["high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.01)
    assert got["significant"] == (got["low"] > 0 or got["high"] < 0)
    same = intervals.paired_bootstrap(a[:1], a[:1], labels, "accuracy")
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "significant": False}


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"train.lr": [1e-3]}, "dev": {"fraction": 0.2, "size": 10}}, "exactly one of fraction, size or split"),
    ({"grid": {"train.lr": [1e-3]}, "methods": {"lorra": {"train.lr": [1e-3]}}}, "'lorra' is not a method"),
    ({"grid": {"train.lr": [1e-3]}, "dev": {"size": 10, "tasks": {"sst2": {"size": 5}}}}, "must map this experiment's tasks"),
    ({"grid": {"train.lrr": [1e-3]}}, "unknown config key 'train.lrr'"),
    ({"dev": {"size": 10}}, "nothing to search"),
])
def test_a_bad_select_section_is_one_line_naming_the_fix(raw, message):
    with pytest.raises(selection.SelectError if "config key" not in message else Exception, match=message):
        selection.parse(raw, ["bbc_news"], ["bitfit", "lora"], [0], "x.yaml: select")


def test_a_task_can_have_its_own_dev_size():
    search = selection.parse({"grid": {"train.lr": [1e-3]}, "dev": {"size": 150, "seed": 2, "tasks": {"tweets": {"fraction": 0.1}}}},
                             ["bbc_news", "tweets"], ["bitfit"], [0], "x")
    assert search.dev[""] == selection.Dev(size=150, seed=2) and search.dev["tweets"] == selection.Dev(fraction=0.1, seed=2)


def test_a_named_dev_split_must_be_neither_the_train_nor_the_test_split():
    from spafit_jax.config.files import load_config
    from spafit_jax.experiments.devsplit import carve

    data = load_config([], ["data.task=bbc_news"]).data
    for name, what in (("train", "train"), ("validation", "test")):
        with pytest.raises(selection.SelectError, match=f"is the {what} split of task bbc_news"):
            carve(data, selection.Dev(split=name))


def retry_experiment(root: Path, tiny_model_dir, seeds, extend) -> Path:
    path = root / "retry.yaml"
    path.write_text(yaml.safe_dump({"overrides": {"model.name": str(tiny_model_dir), **TINY_RUN}, "tasks": ["bbc_news"],
                                    "methods": {"bitfit": {"method.name": "bitfit"}}, "seeds": seeds,
                                    "select": {"grid": {"train.lr": [1.0e-3, 1.0e-2]}, "dev": {"size": 40, "seed": 3},
                                               "extend": extend}}, sort_keys=False))
    return path


def failing(monkeypatch, folders: str):
    """train_and_evaluate fails (a DataError, as a broken disk or file would) for run folders containing `folders`."""
    from spafit_jax.training import trainer
    from spafit_jax.errors import DataError

    real = trainer.train_and_evaluate

    def fake(cfg, workdir=None, **kw):
        if folders in str(workdir):
            raise DataError("the data disk is gone; mount it again")
        return real(cfg, workdir, **kw)
    monkeypatch.setattr(trainer, "train_and_evaluate", fake)


def test_a_search_whose_every_cell_failed_is_retried_once_the_cause_is_fixed(tiny_model_dir, tmp_path, monkeypatch):
    path, work = retry_experiment(tmp_path, tiny_model_dir, 2, 1), tmp_path / "EXP"
    with monkeypatch.context() as m:
        failing(m, "search")
        rc, out = run_main("--config", path, "--workdir", work, "--no-report")
    assert rc == 1 and "no choice for bbc_news/bitfit: every search cell failed" in out
    assert not (work / "choices").exists() and not (work / "runs").exists()  # no `chosen: null` that sticks
    rc, out = run_main("--config", path, "--workdir", work, "--no-report")
    assert rc == 0, out
    choice = json.loads((work / "choices/bbc_news/bitfit.json").read_text())
    assert choice["rests_on"][:2] == ["bitfit@lr=0.001", "bitfit@lr=0.01"] and choice["failed"] == []
    # two values: the choice sits on an edge, so one extension (select.extend=1) was trained and recorded
    (ext,) = choice["extensions"]
    assert ext["label"] in choice["rests_on"] and ext["value"] in (1.0e-4, 0.1)
    assert (work / "search/runs/bbc_news" / ext["label"] / "seed0/results.json").is_file()
    assert choice["bracketed"] == (choice["extension_stopped"] is None)
    assert choice["bracketed"] or "select.extend=1" in choice["extension_stopped"]
    index = json.loads((work / "selection.json").read_text())
    assert ext["label"] in [s["label"] for s in index["search"]] and not index["mixed_commits"]
    seed1 = work / "runs/bbc_news/bitfit/seed1"
    assert json.loads((seed1 / "test.json").read_text())["examples"] == 24
    assert yaml.safe_load((seed1 / "config.yaml").read_text())["train"]["lr"] == choice["chosen"]["train.lr"]
    assert (work / "search/runs/bbc_news" / choice["label"] / "seed0/test.json").is_file()
    code = json.loads((seed1 / "results.json").read_text())["code"]
    assert choice["commits"] == ([code["commit"][:12] + ("+dirty" if code["dirty"] else "")] if code["commit"] else [])


def test_a_failed_cell_that_succeeds_later_remakes_the_choice_from_complete_cells(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    path, work = retry_experiment(tmp_path, tiny_model_dir, [0], 0), tmp_path / "EXP"
    with monkeypatch.context() as m:
        failing(m, "lr=0.01")
        rc, out = run_main("--config", path, "--workdir", work, "--no-report")
    assert rc == 1
    first = json.loads((work / "choices/bbc_news/bitfit.json").read_text())
    assert first["label"] == "bitfit@lr=0.001" and first["rests_on"] == ["bitfit@lr=0.001"]
    assert [f["label"] for f in first["failed"]] == ["bitfit@lr=0.01"] and "disk is gone" in first["failed"][0]["error"]
    assert first["extension_stopped"] and "select.extend=0" in first["extension_stopped"]
    rc, out = run_main("--config", path, "--workdir", work, "--no-report")
    assert rc == 0, out
    choice = json.loads((work / "choices/bbc_news/bitfit.json").read_text())
    assert choice["rests_on"] == ["bitfit@lr=0.001", "bitfit@lr=0.01"] and choice["failed"] == []
    assert choice["remade"] == {"previous": "bitfit@lr=0.001", "previous_rests_on": ["bitfit@lr=0.001"]}
    assert "choice remade from 2 complete cells" in out
    assert not (work / "search/runs/bbc_news/bitfit@lr=0.01/seed0/error.txt").exists()
    seed0 = json.loads((work / "selection.json").read_text())["seeds"][0]["folder"]
    assert seed0 == f"search/runs/bbc_news/{choice['label']}/seed0" and (work / seed0 / "test.json").is_file()
