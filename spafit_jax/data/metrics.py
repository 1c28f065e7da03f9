"""GLUE-style metrics (scikit-learn / scipy), chosen per task.

cola: matthews_correlation · sst2, qnli, rte, wnli, mnli: accuracy · mrpc, qqp: accuracy, f1
(positive class 1) · stsb: pearson, spearmanr and their mean ``combined`` · bbc_news and local
classification: accuracy, macro_f1 · local regression: pearson, spearmanr. Higher is better for
every metric.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from spafit_jax.data.tasks import TaskSpec, get_task
from spafit_jax.errors import DataError


def _accuracy(y_pred, y_true):
    from sklearn.metrics import accuracy_score

    return accuracy_score(y_true, y_pred)


def _f1(y_pred, y_true):
    from sklearn.metrics import f1_score

    return f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)


def _macro_f1(y_pred, y_true):
    from sklearn.metrics import f1_score

    return f1_score(y_true, y_pred, average="macro", zero_division=0)


def _mcc(y_pred, y_true):
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(y_true, y_pred)


def _correlation(kind: str) -> Callable:
    def fn(y_pred, y_true):
        from scipy import stats

        if len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
            return float("nan")  # undefined for constant inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = stats.pearsonr(y_pred, y_true) if kind == "pearson" else \
                stats.spearmanr(y_pred, y_true)
        return r[0]
    return fn


#: metric name -> fn(predicted class ids or scores [N], labels [N]) (`compute_metrics`; `protocol`'s bootstrap).
CLASSIFICATION = {"accuracy": _accuracy, "f1": _f1, "macro_f1": _macro_f1,
                  "matthews_correlation": _mcc}
REGRESSION = {"pearson": _correlation("pearson"), "spearmanr": _correlation("spearmanr")}


def _spec(spec_or_task_name: TaskSpec | str) -> TaskSpec:
    """A spec as it is; a task name through the registry (local and hf tasks need their TaskSpec)."""
    return spec_or_task_name if isinstance(spec_or_task_name, TaskSpec) else get_task(spec_or_task_name)


def main_metric(spec: TaskSpec | str) -> str:
    """Name of the metric that ranks checkpoints for this task (higher is better)."""
    return _spec(spec).main_metric


def compute_metrics(spec_or_task_name: TaskSpec | str, predictions, labels,
                    weights=None) -> dict[str, float]:
    """The task's metrics as ``{name: float}``.

    ``predictions`` are logits [N, C] (argmax is taken) or class ids [N] for classification, and
    scores [N] or [N, 1] for regression. Rows whose weight is 0 (eval padding) are dropped.
    """
    spec = _spec(spec_or_task_name)
    pred = np.asarray(predictions)
    y = np.asarray(labels).reshape(-1)
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        pred = pred.astype(np.float64)
        y = y.astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(axis=-1)
    if pred.ndim != 1 or pred.shape[0] != y.shape[0]:
        raise DataError(f"predictions of shape {np.shape(predictions)} do not match "
                        f"{y.shape[0]} labels for task {spec.name}; pass logits [N, C] or "
                        "scores [N]")
    if weights is not None:
        keep = np.asarray(weights).reshape(-1) != 0
        if keep.shape[0] != y.shape[0]:
            raise DataError(f"{keep.shape[0]} weights for {y.shape[0]} labels; pass one per row")
        pred, y = pred[keep], y[keep]
    if y.shape[0] == 0:
        raise DataError(f"no examples with nonzero weight to score task {spec.name}")
    table = REGRESSION if spec.is_regression else CLASSIFICATION
    out = {}
    for name in spec.metrics:
        if name == "combined":
            continue
        if name not in table:
            raise DataError(f"metric {name!r} of task {spec.name} is unknown; use one of "
                            f"{', '.join(sorted(table))}")
        out[name] = float(table[name](pred, y))
    if "combined" in spec.metrics:
        out["combined"] = float(np.mean(list(out.values())))  # stsb: (pearson + spearmanr) / 2
    return out
