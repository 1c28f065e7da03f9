"""The dev split of an experiment with a `select:` section: carved once per task from the train split, written as files.

`carve` reads a task's whole train split and its first eval split (the test split, `data.limit_eval`
applied) and holds out a dev split: a seeded `fraction` or `size` of the distinct training texts,
stratified by class for classification; texts that also appear in the test split are dropped and the
copies of one text stay on one side, so train, dev and test share no text. A named `split` of the
task can be the dev split instead. `splits` writes `EXP/data/<task>/{train,dev,test}.jsonl` and
`split.json` (sizes, class counts, checksums) once, checks on a rerun that it would carve the same
files, and gives the overrides (`data.task=local`, `data.train_file`, ...) that make a cell read them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spafit_jax.config import files as config_lib
from spafit_jax.experiments import grid
from spafit_jax.training import rundir

DATA = "data"


class SelectError(grid.ExperimentError):
    """The `select:` section, or what a rerun finds in the experiment folder, is unusable."""


@dataclasses.dataclass(frozen=True)
class Dev:
    """How the dev split is made: a seeded `fraction` or `size` of the train split, or a named `split`."""

    fraction: float | None = None
    size: int | None = None
    split: str | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.split:
            return f"the task's split {self.split!r}"
        part = f"{self.fraction:g} of the distinct texts of" if self.fraction is not None else f"{self.size} distinct texts of"
        return f"{part} the train split, seed {self.seed}"



def parse_dev(raw: Any, tasks: Sequence[str], where: str) -> dict[str, Dev]:
    """{task or "": Dev} of `select.dev`; its `tasks:` entry gives a task other keys (e.g. {tweets: {size: 300}})."""
    raw = {"fraction": 0.2} if raw is None else raw
    if not isinstance(raw, dict):
        raise SelectError(f"{where}: write {{fraction: 0.2, seed: 0}}, {{size: 300, seed: 0}} or {{split: NAME}}")
    own = raw.get("tasks") or {}
    if not isinstance(own, dict) or any(t not in tasks or not isinstance(v, dict) for t, v in own.items()):
        raise SelectError(f"{where}.tasks: must map this experiment's tasks ({', '.join(tasks)}) to dev settings, "
                          "e.g. {tweets: {size: 300}}")
    common = {k: v for k, v in raw.items() if k != "tasks"}
    out = {"": _dev(common, where)}
    for task, keys in own.items():
        mine = {k: v for k, v in common.items() if k not in ("fraction", "size", "split") or not
                {"fraction", "size", "split"} & set(keys)}
        out[task] = _dev({**mine, **keys}, f"{where}.tasks.{task}")
    return out


def _dev(raw: dict, where: str) -> Dev:
    if not isinstance(raw, dict) or set(raw) - {"fraction", "size", "split", "seed"}:
        raise SelectError(f"{where}: write {{fraction: 0.2, seed: 0}}, {{size: 300, seed: 0}} or {{split: NAME}}")
    dev = Dev(**raw)
    given = [k for k in ("fraction", "size", "split") if getattr(dev, k) is not None]
    if len(given) != 1:
        raise SelectError(f"{where}: give exactly one of fraction, size or split (got {', '.join(given) or 'none'})")
    if dev.fraction is not None and not (isinstance(dev.fraction, float) and 0 < dev.fraction < 1):
        raise SelectError(f"{where}: fraction must be a number between 0 and 1, got {dev.fraction!r}; e.g. 0.2")
    if dev.size is not None and not (isinstance(dev.size, int) and not isinstance(dev.size, bool) and dev.size >= 2):
        raise SelectError(f"{where}: size must be an integer >= 2, got {dev.size!r}")
    if dev.split is not None and not (isinstance(dev.split, str) and dev.split):
        raise SelectError(f"{where}: split must name one of the task's splits, got {dev.split!r}")
    if not isinstance(dev.seed, int) or isinstance(dev.seed, bool):
        raise SelectError(f"{where}: seed must be an integer, got {dev.seed!r}")
    return dev


@dataclasses.dataclass(frozen=True)
class Split:
    """A task's carved splits: the folder with train/dev/test.jsonl, the overrides that read them, and split.json."""

    folder: Path
    keys: tuple[str, ...]
    info: dict

    def overrides(self, eval_name: str = "dev") -> list[str]:
        return [*self.keys, grid.override("data.eval_file", str(self.folder / f"{eval_name}.jsonl"))]


def _records(examples, rows) -> str:
    out = []
    for i in rows:
        row = {"text": examples.texts_a[i]}
        if examples.texts_b is not None:
            row["text_pair"] = examples.texts_b[i]
        label = examples.labels[i]
        row["label"] = float(label) if label.dtype.kind == "f" else int(label)
        out.append(json.dumps(row, ensure_ascii=False))
    return "".join(line + "\n" for line in out)


def _keys(examples) -> list:
    return list(zip(examples.texts_a, examples.texts_b or [None] * len(examples)))


def _carve_rows(train, spec, dev: Dev, test) -> tuple[list[int], list[int], int]:
    """(train rows, dev rows, rows dropped) of the train split, each in the original order. Rows whose text is
    also in the test split are dropped; copies of one text go to the same side (so dev shares no text with
    train or test); the split is stratified by the label of each text's first copy."""
    from sklearn.model_selection import train_test_split

    in_test = set(_keys(test))
    first: dict = {}
    for row, key in enumerate(_keys(train)):
        if key not in in_test:
            first.setdefault(key, []).append(row)
    groups = list(first.values())
    size = dev.fraction if dev.fraction is not None else dev.size
    if isinstance(size, int) and size >= len(groups):
        raise SelectError(f"select.dev.size={size} is not below the {len(groups)} distinct training texts; choose fewer")
    try:
        keep, held = train_test_split(range(len(groups)), test_size=size, random_state=dev.seed, shuffle=True,
                                      stratify=None if spec.is_regression else [train.labels[g[0]] for g in groups])
    except ValueError as e:
        raise SelectError(f"cannot carve the dev split ({e}); give a larger select.dev fraction or size") from None
    rows = lambda ids: sorted(r for i in ids for r in groups[i])  # noqa: E731
    return rows(keep), rows(held), len(train) - sum(map(len, groups))


def carve(data_cfg: config_lib.DataConfig, dev: Dev) -> tuple[dict[str, str], dict]:
    """({train,dev,test}.jsonl texts, split.json record) of a task: dev from its train split (or a named split),
    test its first eval split (`data.limit_eval` applied). Reads the data; writes nothing."""
    from spafit_jax.data import pipeline as data_lib

    spec = data_lib.task_from_config(data_cfg)
    test_name = spec.eval_splits[0]
    if dev.split in (test_name, spec.train_split):
        what = "test" if dev.split == test_name else "train"
        raise SelectError(f"select.dev.split={dev.split!r} is the {what} split of task {spec.name}; name another "
                          "split, or carve one with select.dev.fraction")
    splits = (test_name,) + ((dev.split,) if dev.split else ())
    cfg = dataclasses.replace(data_cfg, limit_train=None, eval_splits=splits)
    spec, train, evals = data_lib.load_task_texts(cfg, seed=0)
    dropped = 0
    if dev.split:
        files = {"train": _records(train, range(len(train))), "dev": _records(evals[dev.split], range(len(evals[dev.split])))}
        counts = {"train": train.labels, "dev": evals[dev.split].labels}
    else:
        keep, held, dropped = _carve_rows(train, spec, dev, evals[test_name])
        files = {"train": _records(train, keep), "dev": _records(train, held)}
        counts = {"train": train.labels[keep], "dev": train.labels[held]}
    files["test"] = _records(evals[test_name], range(len(evals[test_name])))
    counts["test"] = evals[test_name].labels
    info = {"task": spec.name, "dev": dev.describe(), "test": f"the task's split {test_name!r}"
            + (f" (data.limit_eval={data_cfg.limit_eval})" if data_cfg.limit_eval else ""),
            "stratified": not dev.split and not spec.is_regression, "num_labels": spec.num_labels,
            "is_regression": spec.is_regression, "pairs": spec.text_b is not None,
            "sizes": {k: len(v) for k, v in counts.items()}, "dropped_as_in_test": dropped,
            "classes": None if spec.is_regression else {
                k: [int((v == c).sum()) for c in range(spec.num_labels)] for k, v in counts.items()},
            "label_names": list(spec.label_names) if spec.label_names else None,
            "sha256": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in files.items()}}
    return files, info


def _data_keys(folder: Path, info: dict) -> tuple[str, ...]:
    keys = {"data.task": "local", "data.train_file": str(folder / "train.jsonl"), "data.text_column": "text",
            "data.text_pair_column": "text_pair" if info["pairs"] else None, "data.label_column": "label",
            "data.is_regression": info["is_regression"], "data.num_labels": None if info["is_regression"] else info["num_labels"],
            "data.limit_eval": None, "data.eval_splits": None}
    return tuple(grid.override(k, v) for k, v in keys.items())


def _source(cell: grid.Cell) -> tuple:
    d = cell.config().data
    return (d.task, d.train_file, d.eval_file, d.hf_path, d.hf_name, d.train_split, d.text_column, d.text_pair_column,
            d.label_column, d.num_labels, d.is_regression, d.limit_eval, d.eval_splits)


def _check_files(folder: Path, files: dict[str, str], info: dict, write: bool) -> None:
    """Refuses a split file edited since it was carved (its checksum differs from split.json); writes a missing one
    again (when `write`: it is carved the same)."""
    for name, text in files.items():
        path = folder / f"{name}.jsonl"
        if not path.exists():
            if write:
                rundir.write_atomic(path, text, per_process=True)
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"][name]:
            raise SelectError(f"{path} differs from the split carved into split.json (checksums differ: edited "
                              f"since?); restore it (delete it: the next run writes it again), or use a new --workdir")


def splits(cells: Sequence[grid.Cell], dev: dict[str, Dev], workdir: Path, *, write: bool) -> dict[str, Split]:
    """Each task's Split under `workdir/data/<task>`: carved and written (`write`), or checked against what is there.

    Every cell of a task must read the same data; a folder carved with other settings is refused."""
    out = {}
    for task in dict.fromkeys(c.task for c in cells):
        mine = [c for c in cells if c.task == task]
        differ = [c.name for c in mine if _source(c) != _source(mine[0])]
        if differ:
            raise SelectError(f"{differ[0]} reads other data than {mine[0].name}; a task's methods may not change "
                              "data.task, its files, columns or limit_eval (the dev split must be the same for all)")
        folder = (workdir / DATA / task).resolve()
        files, info = carve(mine[0].config().data, dev.get(task, dev[""]))
        saved = folder / "split.json"
        if saved.exists():
            from spafit_jax.experiments.expstate import read_json

            old = read_json(saved, f"delete {folder}: the next run carves the splits again (they are seeded)")
            if old.get("sha256") != info["sha256"]:
                raise SelectError(f"{folder} holds splits carved otherwise (other data or select.dev); use a new "
                                  "--workdir, or delete that folder, the search, choices and runs to start over")
            _check_files(folder, files, info, write)
        elif write:
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                rundir.write_atomic(folder / f"{name}.jsonl", text, per_process=True)
            rundir.write_atomic(saved, json.dumps(info, indent=2) + "\n", per_process=True)
        out[task] = Split(folder, _data_keys(folder, info), info)
    return out
