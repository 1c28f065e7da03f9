"""The pieces of a `select:` experiment that need no training: grids that bracket (extensions past an edge), the
choice file's remaking, budgets, duplicate grid values, and the experiment folder's record (`expstate`)."""

import json

import pytest
import yaml

from spafit_jax.experiments import choices, expstate
from spafit_jax.errors import ConfigError
from spafit_jax.experiments.grid import ROOT, ExperimentError, load_experiment, parse_grid


@pytest.mark.parametrize("declared, current, side, expect", [
    ([1e-3, 3e-3, 1e-2], 1e-2, "high", 3.333e-2),  # geometric: the ratio at that edge (10/3)
    ([1e-3, 3e-3, 1e-2], 1e-3, "low", 3.333e-4),  # 3e-3 / 1e-3 = 3
    ([1e-4, 3e-4, 1e-3], 3e-3, "high", 1e-2),  # from an extension on: the grid's own step again
    ([1, 2], 2, "high", 3), ([1, 2], 1, "low", 0),  # integers: arithmetic, integers
    ([0.0, 0.1, 0.2], 0.0, "low", -0.1),  # not positive: arithmetic
    ([1.0, 2.0, 10.0], 10.0, "high", 18.0),  # ratios 2 and 5 differ: arithmetic by the edge's step
])
def test_next_value_follows_the_grids_own_progression(declared, current, side, expect):
    got = choices.next_value(declared, current, side)
    assert got == pytest.approx(expect) and type(got) is type(expect)


def fake(scores: dict, failed=()):
    """A search whose cell at lr=v scores scores[v] (missing: not trained yet)."""
    class Cell:
        def __init__(self, point):
            self.point, self.method = point, f"m@lr={point['train.lr']}"

    def state(cell):
        lr = cell.point["train.lr"]
        if lr in failed:
            return {"point": cell.point, "label": cell.method, "status": "failed", "error": "boom"}
        if lr not in scores:
            return {"point": cell.point, "label": cell.method, "status": "todo"}
        return {"point": cell.point, "label": cell.method, "status": "done", "metric": "accuracy",
                "dev": {"accuracy": scores[lr]}}

    def make(point):
        if point["train.lr"] > 1:
            raise ConfigError("train.lr must be <= 1")
        return Cell(point)
    return Cell, state, make


def run_expand(scores, grid=(1e-3, 1e-2), limit=2, failed=()):
    Cell, state, make = fake(scores, failed)
    return choices.expand({"train.lr": list(grid)}, [Cell({"train.lr": v}) for v in grid], make, state, None, limit)


def test_a_choice_on_the_top_edge_extends_until_it_is_interior():
    cells, made, choice, stopped = run_expand({1e-3: 0.5, 1e-2: 0.7, 0.1: 0.8, 1.0: 0.6})
    assert [e["value"] for e in made] == [0.1, 1.0] and made[0]["side"] == "high"
    assert made[0]["after"] == "m@lr=0.01" and made[1]["after"] == "m@lr=0.1"
    assert choice["label"] == "m@lr=0.1" and stopped is None and len(cells) == 4
    assert choice["rests_on"] == ["m@lr=0.001", "m@lr=0.01", "m@lr=0.1", "m@lr=1.0"]


def test_an_extension_not_trained_yet_leaves_the_choice_waiting():
    cells, made, choice, stopped = run_expand({1e-3: 0.5, 1e-2: 0.7})
    assert choice is None and [c.point["train.lr"] for c in cells] == [1e-3, 1e-2, 0.1]


def test_the_limit_stops_it_and_says_so():
    _, made, choice, stopped = run_expand({1e-3: 0.9, 1e-4: 0.95, 1e-5: 0.97, 1e-2: 0.1}, limit=2)
    assert [e["value"] for e in made] == [1e-4, 1e-5] and choice["label"] == "m@lr=1e-05"
    assert "lowest value tried after 2 extensions (select.extend=2)" in stopped
    _, made, _, stopped = run_expand({1e-3: 0.9, 1e-2: 0.1}, limit=0)
    assert made == [] and "after 0 extensions" in stopped


def test_an_invalid_or_failed_extension_stops_on_the_edge():
    _, made, choice, stopped = run_expand({0.3: 0.5, 1.0: 0.7}, grid=(0.3, 1.0))
    assert made == [] and "no valid config" in stopped and choice["label"] == "m@lr=1.0"
    _, made, choice, stopped = run_expand({1e-3: 0.5, 1e-2: 0.7}, failed=(0.1,))
    assert [e["value"] for e in made] == [0.1] and "past the edge failed (boom)" in stopped
    assert choice["label"] == "m@lr=0.01" and choice["failed"] == [{"label": "m@lr=0.1", "error": "boom"}]


def test_an_interior_choice_and_a_one_value_grid_are_not_extended():
    _, made, _, stopped = run_expand({1e-3: 0.5, 1e-2: 0.9, 0.1: 0.4}, grid=(1e-3, 1e-2, 0.1))
    assert made == [] and stopped is None
    _, made, _, stopped = run_expand({1e-3: 0.5}, grid=(1e-3,))
    assert made == [] and stopped is None


def test_every_cell_failed_gives_no_choice_and_no_choice_file_sticks(tmp_path):
    _, _, choice, _ = run_expand({}, failed=(1e-3, 1e-2))
    assert choice["chosen"] is None
    path = choices.path_of(tmp_path, "t", "m")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"chosen": None, "label": None, "candidates": []}))  # written by older versions
    assert choices.recorded(tmp_path, "t", "m") is None


def test_a_choice_is_remade_when_its_complete_cells_change_and_says_so(tmp_path):
    one = choices.choose([{"point": {"lr": 1}, "label": "a", "status": "done", "dev": {"acc": 0.5}},
                          {"point": {"lr": 2}, "label": "b", "status": "failed", "error": "x"}], "acc", ["acc"])
    first, note = choices.settle(tmp_path, "t", "m", one, {"extensions": []}, write=True)
    assert first["rests_on"] == ["a"] and first["remade"] is None and note is None
    again, note = choices.settle(tmp_path, "t", "m", one, {}, write=True)
    assert again == first and note is None  # the same cells: read back, not written again
    both = choices.choose([{"point": {"lr": 1}, "label": "a", "status": "done", "dev": {"acc": 0.5}},
                           {"point": {"lr": 2}, "label": "b", "status": "done", "dev": {"acc": 0.7}}], "acc", ["acc"])
    remade, note = choices.settle(tmp_path, "t", "m", both, {}, write=True)
    assert remade["label"] == "b" and remade["rests_on"] == ["a", "b"]
    assert remade["remade"] == {"previous": "a", "previous_rests_on": ["a"]} and "was a, now b" in note
    assert json.loads(choices.path_of(tmp_path, "t", "m").read_text()) == remade


@pytest.mark.parametrize("text, words", [("{", "not valid JSON"), ("[]", "holds a JSON list"),
                                         ('{"chosen": 1}', "lacks chosen, label or candidates")])
def test_a_damaged_choice_file_is_one_line_naming_it(tmp_path, text, words):
    path = choices.path_of(tmp_path, "t", "m")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ExperimentError, match=words) as e:
        choices.recorded(tmp_path, "t", "m")
    assert str(path) in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)


def test_duplicate_grid_values_are_refused():
    with pytest.raises(ExperimentError, match="lists the value 0.001 twice"):
        parse_grid({"train.lr": [1e-3, 0.001]}, "x: grid")
    with pytest.raises(ExperimentError, match="lists the value 1.0 twice"):
        parse_grid({"method.n1": [1, 1.0]}, "x: grid")
    assert parse_grid({"method.stratum3_bias": [True, 1]}, "x")["method.stratum3_bias"] == [True, 1]


def write(path, **data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_method_trains_at_every_budget(tmp_path):
    path = write(tmp_path / "b.yaml", tasks=["bbc_news"], methods={"bitfit": None, "lora": None},
                 budgets={"short": {"train.max_steps": 2}, "long": {"train.max_steps": 4}}, seeds=1)
    cells, _ = load_experiment(path)
    got = {(c.method, c.family, c.budget, c.config().train.max_steps) for c in cells}
    assert got == {("bitfit-short", "bitfit", "short", 2), ("bitfit-long", "bitfit", "long", 4),
                   ("lora-short", "lora", "short", 2), ("lora-long", "lora", "long", 4)}


@pytest.mark.parametrize("data, words", [
    ({"methods": {"bitfit": {"train.max_steps": 3}}}, "method bitfit sets train.max_steps, which budgets: declares"),
    ({"methods": ["bitfit"], "budgets": {"a": {"train.max_steps": 2}, "b": {"train.epochs": 2}}},
     "every budget sets the same keys"),
    ({"methods": ["bitfit"], "budgets": {"a/b": {"train.max_steps": 2}}}, "budget names"),
    ({"methods": ["bitfit"], "budgets": {"a": {"train.max_stepz": 2}}}, "unknown config key"),
    ({"methods": ["bitfit"], "budgets": []}, "must map budget names"),
])
def test_bad_budgets_are_one_line(tmp_path, data, words):
    data = {"tasks": ["bbc_news"], "budgets": {"short": {"train.max_steps": 2}}, **data}
    with pytest.raises(ExperimentError, match=words):
        load_experiment(write(tmp_path / "b.yaml", **data))


def test_the_folder_record_refuses_what_it_did_not_write_and_changes(tmp_path):
    work = tmp_path / "EXP"
    assert expstate.check_folder(work, "a: 1\n") is None  # a new folder
    work.mkdir()
    (work / "experiment.yaml").write_text("mine\n")
    with pytest.raises(ExperimentError, match="exists and is not this experiment's file"):
        expstate.check_folder(work, "a: 1\n")
    (work / "experiment.yaml").unlink()
    (work / "selection.json").write_text("{}")
    with pytest.raises(ExperimentError, match="selection.json exists but this folder holds no experiment.yaml"):
        expstate.check_folder(work, "a: 1\n")
    (work / "selection.json").unlink()
    expstate.write(work, "a: 1\n", None, {"m": {"lr": [1, 2]}}, [0, 1], [], False)
    manifest = expstate.check_folder(work, "a: 2\n")
    assert manifest["seeds"] == [0, 1] and (work / "experiment.yaml").read_text() == "a: 1\n"
    with pytest.raises(ExperimentError, match=r"m.lr changed \(was \[1, 2\], now \[1, 3\]\)"):
        expstate.check_definition(manifest, {"m": {"lr": [1, 3]}}, [0, 1], work)
    with pytest.raises(ExperimentError, match="seed 1 was taken away"):
        expstate.check_definition(manifest, {"m": {"lr": [1, 2]}}, [0], work)
    assert expstate.check_definition(manifest, {"m": {"lr": [1, 2]}}, [0, 1, 2], work) == ["seeds added: 2"]
    expstate.write(work, "a: 2\n", manifest, {"m": {"lr": [1, 2]}}, [0, 1, 2], ["seeds added: 2"], False)
    assert [h["change"] for h in json.loads((work / "experiment.json").read_text())["history"]] == ["seeds added: 2"]
    (work / "experiment.yaml").write_text("edited\n")
    with pytest.raises(ExperimentError, match="is not the copy this experiment wrote"):
        expstate.check_folder(work, "a: 2\n")


def test_commits_are_not_mixed_unless_allowed(tmp_path):
    runs = []
    for i, commit in enumerate(["a" * 40, "a" * 40, "b" * 40, None]):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"code": {"version": "0.1.0", "commit": commit, "dirty": False}}))
        runs.append(folder)
    assert expstate.finished_folders(tmp_path) == runs
    here = {"version": "0.1.0", "commit": "a" * 40, "dirty": False}
    assert expstate.check_commits(runs[:2] + runs[3:], here, False) == {"a" * 12: [str(runs[0]), str(runs[1])]}
    with pytest.raises(ExperimentError, match=f"ran on commit {'b' * 12} .*--allow-mixed-commits"):
        expstate.check_commits(runs, here, False)
    assert set(expstate.check_commits(runs, {**here, "dirty": True}, True)) == {"a" * 12, "b" * 12, "a" * 12 + "+dirty"}
    (runs[0] / "results.json").write_text('{"code": ')
    with pytest.raises(ExperimentError, match="r0/results.json: not valid JSON"):
        expstate.code_of(runs[0])


def test_read_json_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1')
    with pytest.raises(ExperimentError, match=r"x.json: not valid JSON .*; do this"):
        expstate.read_json(tmp_path / "x.json", "do this")
    assert expstate.version_name({"commit": "c" * 40, "dirty": True}) == "c" * 12 + "+dirty"
    assert expstate.sha("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_shipped_budget_experiment_searches_spafits_strata_with_the_rate_at_every_budget(tmp_path):
    from spafit_jax.experiments import selection
    from spafit_jax.experiments.devsplit import Split

    cells, search, _ = selection.load(ROOT / "configs/experiments/fair_budgets.yaml")
    methods = {c.method for c in cells}
    assert methods == {f"{m}-{b}" for m in ("full", "lora", "spafit", "bitfit", "head_only") for b in ("base", "long")}
    assert {c.config().train.epochs for c in cells if c.budget == "long"} == {4} and len({c.seed for c in cells}) == 5
    points = search.points("spafit-long", "spafit")
    assert len(points) == 12 and {(p["method.n1"], p["method.n2"]) for p in points} == {(1, 3), (1, 4), (2, 3), (2, 4)}
    assert search.points("full-base", "full")[0] == {"train.lr": 1.0e-4} and search.extend == 2
    # a strata point that is no valid config (n1 > n2) is dropped with a note, the others kept
    search = selection.Search({"method.n1": [1, 4], "method.n2": [3]}, {}, search.dev, 0, None)
    split = Split(tmp_path, (), {})
    base, notes = selection.search_cells([c for c in cells if c.method == "spafit-base"], search,
                                         {"bbc_news": split, "tweets": split})
    assert [c.method for c in base] == ["spafit-base@n1=1,n2=3"] * 2 and len(notes) == 2 and "n1=4" in notes[0]
