"""The task registry: what each named task reads and how it is scored (no jax, no numpy).

The one owner of task names: `config` validates `data.task` against `TASK_NAMES`, the data
modules read `TASKS` and build ``local`` / ``hf`` specs with `mapped_task`, `metrics` reads a
spec's metrics.
"""

from __future__ import annotations

import dataclasses

from spafit_jax.errors import DataError

GLUE_PATH = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task reads and how it is scored.

    ``num_labels`` is 1 for regression. ``metrics`` are the names ``metrics.compute_metrics``
    returns; ``main_metric`` (one of them, higher is better) selects the best checkpoint.
    ``label_names`` maps class ids to names where known (bbc_news, tweets, string labels of local
    or hub data, a hub dataset's ClassLabel).
    """

    name: str
    text_a: str
    text_b: str | None
    label_column: str
    num_labels: int
    is_regression: bool
    metrics: tuple[str, ...]
    main_metric: str
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    hf_path: str | None = None
    hf_name: str | None = None
    label_names: tuple[str, ...] | None = None


def _glue(name, text_a, text_b, num_labels, metrics, main, eval_splits=("validation",)):
    return TaskSpec(
        name=name, text_a=text_a, text_b=text_b, label_column="label", num_labels=num_labels,
        is_regression=num_labels == 1, metrics=metrics, main_metric=main,
        eval_splits=eval_splits, hf_path=GLUE_PATH, hf_name=name)


# Main metrics follow the BERT paper: F1 for MRPC/QQP, Spearman for STS-B, MCC for CoLA,
# accuracy elsewhere.
TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", "sentence", None, 2, ("matthews_correlation",), "matthews_correlation"),
    "sst2": _glue("sst2", "sentence", None, 2, ("accuracy",), "accuracy"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", 2, ("accuracy", "f1"), "f1"),
    "qqp": _glue("qqp", "question1", "question2", 2, ("accuracy", "f1"), "f1"),
    "stsb": _glue("stsb", "sentence1", "sentence2", 1, ("pearson", "spearmanr", "combined"),
                  "spearmanr"),
    "mnli": _glue("mnli", "premise", "hypothesis", 3, ("accuracy",), "accuracy",
                  ("validation_matched", "validation_mismatched")),
    "qnli": _glue("qnli", "question", "sentence", 2, ("accuracy",), "accuracy"),
    "rte": _glue("rte", "sentence1", "sentence2", 2, ("accuracy",), "accuracy"),
    "wnli": _glue("wnli", "sentence1", "sentence2", 2, ("accuracy",), "accuracy"),
    "bbc_news": TaskSpec(
        name="bbc_news", text_a="text", text_b=None, label_column="label", num_labels=5,
        is_regression=False, metrics=("accuracy", "macro_f1"), main_metric="accuracy",
        label_names=("business", "entertainment", "politics", "sports", "tech")),
    "tweets": TaskSpec(
        name="tweets", text_a="text", text_b=None, label_column="label", num_labels=3,
        is_regression=False, metrics=("accuracy", "macro_f1"), main_metric="accuracy",
        label_names=("negative", "neutral", "positive")),
}
GLUE_TASKS = tuple(n for n, s in TASKS.items() if s.hf_path == GLUE_PATH)
#: tasks whose spec comes from the config's column settings: local files and any hub dataset.
MAPPED_TASKS = ("local", "hf")
#: every value `data.task` accepts.
TASK_NAMES = tuple(TASKS) + MAPPED_TASKS


def mapped_task(name: str, *, text_a: str, text_b: str | None, label_column: str,
                is_regression: bool, num_labels: int = 1, **fields) -> TaskSpec:
    """The spec of a ``local`` / ``hf`` task: the given columns, metrics chosen by its kind.

    Classification scores accuracy (main) and macro F1; regression Pearson and Spearman (main).
    """
    return TaskSpec(
        name=name, text_a=text_a, text_b=text_b, label_column=label_column,
        num_labels=num_labels, is_regression=is_regression,
        metrics=("pearson", "spearmanr") if is_regression else ("accuracy", "macro_f1"),
        main_metric="spearmanr" if is_regression else "accuracy", **fields)


def normalise_task_name(name: str) -> str:
    """``"SST-2"`` -> ``"sst2"``."""
    return str(name).strip().lower().replace("-", "")


def get_task(name: str) -> TaskSpec:
    """The registered spec of a GLUE task, ``bbc_news`` or ``tweets`` (``"SST-2"`` works too)."""
    key = normalise_task_name(name)
    if key in MAPPED_TASKS:
        raise DataError(f"task {key!r} has no registered spec: its columns and labels come from "
                        "the data config; pass its TaskSpec (TaskData.spec or data.task_from_config(config.data))")
    if key not in TASKS:
        valid = ", ".join(TASK_NAMES)
        raise DataError(f"unknown task {name!r}; set data.task to one of: {valid}")
    return TASKS[key]


def spec_from_json(raw: object, source: str) -> TaskSpec:
    """The TaskSpec a run folder's task.json holds (`dataclasses.asdict` of one), every field checked:
    a missing, unknown or mistyped field is a one-line DataError naming `source` and the field."""
    fix = "restore it from a copy, or delete it (the run then reads its spec from config.yaml's data settings)"
    if not isinstance(raw, dict):
        raise DataError(f"{source} holds a JSON {type(raw).__name__}, not an object of task fields; {fix}")
    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise DataError(f"{source}: unknown field {unknown[0]!r} (fields: {', '.join(fields)}); {fix}")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise DataError(f"{source}: field {missing[0]!r} is missing (a cut-short file?); {fix}")

    def strings(v, optional=False):
        return (optional and v is None) or isinstance(v, str) and bool(v)

    def string_list(v, optional=False):
        return (optional and v is None) or isinstance(v, list) and all(isinstance(x, str) for x in v)

    checks = {"name": strings, "text_a": strings, "label_column": strings, "main_metric": strings,
              "train_split": strings, "text_b": lambda v: strings(v, True), "hf_path": lambda v: strings(v, True),
              "hf_name": lambda v: strings(v, True), "metrics": string_list, "eval_splits": string_list,
              "label_names": lambda v: string_list(v, True), "is_regression": lambda v: isinstance(v, bool),
              "num_labels": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1}
    for name, value in raw.items():
        if not checks[name](value):
            raise DataError(f"{source}: field {name!r} = {value!r} has the wrong type; {fix}")
    if raw.get("label_names") is not None and len(raw["label_names"]) != raw["num_labels"]:
        raise DataError(f"{source}: {len(raw['label_names'])} label_names but num_labels={raw['num_labels']}; {fix}")
    if raw["main_metric"] not in raw["metrics"]:
        raise DataError(f"{source}: main_metric {raw['main_metric']!r} is not one of metrics {raw['metrics']}; {fix}")
    return TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
