"""Tests for spafit_jax.data.metrics against hand-computed values and independent numpy formulas."""

import dataclasses
import math

import numpy as np
import pytest

from spafit_jax.data import metrics, tasks
from spafit_jax.errors import DataError


def one_hot_logits(pred, num_classes):
    """Logits whose argmax is ``pred``."""
    out = np.zeros((len(pred), num_classes), np.float32)
    out[np.arange(len(pred)), pred] = 3.0
    return out - 1.0


def test_cola_matthews_by_hand():
    # TP=3, FN=1, FP=1, TN=3 -> (3*3 - 1*1) / sqrt(4*4*4*4) = 0.5
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    out = metrics.compute_metrics("cola", one_hot_logits(p, 2), y)
    assert out == {"matthews_correlation": pytest.approx(0.5)}


def test_matthews_constant_prediction_is_zero():
    out = metrics.compute_metrics("cola", np.zeros(4, np.int64), np.array([0, 1, 0, 1]))
    assert out["matthews_correlation"] == 0.0


def test_mrpc_accuracy_and_f1_by_hand():
    # TP=2, FN=2, FP=1, TN=1: precision 2/3, recall 1/2 -> F1 = 4/7; accuracy 3/6
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([1, 1, 0, 0, 1, 0])
    for task in ("mrpc", "qqp"):
        out = metrics.compute_metrics(task, one_hot_logits(p, 2), y)
        assert out == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(4 / 7)}


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli", "mnli"])
def test_accuracy_tasks(task):
    c = tasks.get_task(task).num_labels
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0, 1, 0, 0, 1])
    out = metrics.compute_metrics(task, one_hot_logits(p, c), y)
    assert out == {"accuracy": pytest.approx(0.8)}


def test_class_ids_accepted_for_classification():
    y = np.array([0, 1, 2, 2])
    out = metrics.compute_metrics("mnli", np.array([0, 1, 2, 0]), y)
    assert out["accuracy"] == pytest.approx(0.75)


def test_bbc_macro_f1_by_hand():
    # class 0: TP=2 FP=0 FN=1 -> P=1 R=2/3 F1=0.8;  class 1: TP=1 FP=1 FN=0 -> F1=2/3;
    # class 2: TP=1 FP=0 FN=0 -> F1=1;  classes 3, 4 absent from both -> not counted by sklearn
    y = np.array([0, 0, 0, 1, 2])
    p = np.array([0, 0, 1, 1, 2])
    out = metrics.compute_metrics("bbc_news", one_hot_logits(p, 5), y)
    assert out["accuracy"] == pytest.approx(0.8)
    assert out["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 1.0) / 3)


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(np.float64)


def test_stsb_pearson_spearman_combined_by_hand():
    # x=[1,2,3], y=[1,3,2]: cov=1, var_x=var_y=2 -> r=0.5; ranks equal values -> rho=0.5
    out = metrics.compute_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))
    assert out == {"pearson": pytest.approx(0.5), "spearmanr": pytest.approx(0.5),
                   "combined": pytest.approx(0.5)}


def test_stsb_against_numpy_formulas():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 50)
    pred = (y + rng.normal(0, 1.0, 50)).reshape(-1, 1)  # [N, 1] regression head
    out = metrics.compute_metrics("stsb", pred, y)
    pearson = np.corrcoef(pred[:, 0], y)[0, 1]
    spearman = np.corrcoef(_ranks(pred[:, 0]), _ranks(y))[0, 1]
    assert out["pearson"] == pytest.approx(pearson, abs=1e-9)
    assert out["spearmanr"] == pytest.approx(spearman, abs=1e-9)
    assert out["combined"] == pytest.approx((pearson + spearman) / 2, abs=1e-9)
    assert out["spearmanr"] != pytest.approx(out["pearson"])


def test_weights_zero_rows_are_dropped():
    y = np.array([1, 0, 1, 0, 1, 1])
    p = np.array([1, 0, 1, 0, 0, 0])  # the last two rows are padding and wrong
    w = np.array([1, 1, 1, 1, 0, 0], np.float32)
    assert metrics.compute_metrics("sst2", one_hot_logits(p, 2), y, w) == {"accuracy": 1.0}
    assert metrics.compute_metrics("sst2", one_hot_logits(p, 2), y)["accuracy"] == \
        pytest.approx(4 / 6)


def test_local_specs():
    cls = dataclasses.replace(tasks.get_task("bbc_news"), name="local", num_labels=3,
                              label_names=None)
    out = metrics.compute_metrics(cls, np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]))
    assert set(out) == {"accuracy", "macro_f1"}
    assert out["accuracy"] == pytest.approx(0.75)
    reg = tasks.TaskSpec(name="local", text_a="t", text_b=None, label_column="y", num_labels=1,
                        is_regression=True, metrics=("pearson", "spearmanr"),
                        main_metric="spearmanr")
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 2.0, 3.0, 10.0])
    out = metrics.compute_metrics(reg, x, y)
    assert out["spearmanr"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.main_metric(reg) == "spearmanr"


def test_constant_regression_is_nan():
    out = metrics.compute_metrics("stsb", np.ones(4), np.array([0.0, 1.0, 2.0, 3.0]))
    assert math.isnan(out["pearson"]) and math.isnan(out["spearmanr"])


def test_main_metric():
    expected = {"cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1",
                "stsb": "spearmanr", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
                "wnli": "accuracy", "bbc_news": "accuracy"}
    for task, name in expected.items():
        assert metrics.main_metric(task) == name
        assert metrics.main_metric(tasks.get_task(task)) == name
        assert name in tasks.get_task(task).metrics


def test_errors():
    with pytest.raises(DataError, match="do not match"):
        metrics.compute_metrics("sst2", np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(DataError, match="nonzero weight"):
        metrics.compute_metrics("sst2", np.zeros((2, 2)), np.zeros(2), np.zeros(2))
    with pytest.raises(DataError, match="weights"):
        metrics.compute_metrics("sst2", np.zeros((2, 2)), np.zeros(2), np.ones(3))
    with pytest.raises(DataError, match="TaskSpec"):
        metrics.compute_metrics("local", np.zeros(2), np.zeros(2))
    with pytest.raises(DataError, match="unknown task"):
        metrics.compute_metrics("nope", np.zeros(2), np.zeros(2))
