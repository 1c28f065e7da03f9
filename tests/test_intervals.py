"""The two-stage bootstrap (seeds, then examples) against brute force, and against the examples-only interval when
the seeds agree and when they do not."""

import itertools

import numpy as np
import pytest

from spafit_jax.experiments import intervals


def _logits(labels, right):
    pred = np.where(right, labels, (labels + 1) % 3)
    return np.eye(3, dtype=np.float32)[pred]


def _seeds(rng, labels, accuracies, shared=None):
    """Per-seed logits: each seed right on a random subset of the examples of about its accuracy (the same subset
    for every seed when `shared` is given)."""
    return [_logits(labels, shared if shared is not None else rng.random(len(labels)) < p) for p in accuracies]


def _exact(a, b):
    """Every equally likely outcome of the two-stage bootstrap on a tiny case: a's seeds, b's seeds and the examples
    each drawn with replacement as ordered tuples. Returns the statistic of each outcome."""
    sa, sb, n = len(a), len(b), a.shape[1]
    out = []
    for ia in itertools.product(range(sa), repeat=sa):
        for ib in itertools.product(range(sb), repeat=sb):
            for idx in itertools.product(range(n), repeat=n):
                idx = list(idx)
                out.append(a[list(ia)][:, idx].mean() - b[list(ib)][:, idx].mean())
    return np.array(out)


def test_two_stage_draws_match_the_enumerated_distribution():
    a = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # 2 seeds x 3 examples, per-example correctness
    b = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    exact = _exact(a, b)  # 4 x 4 x 27 = 432 outcomes
    draws = intervals.two_stage_draws(a, b, resamples=200_000, seed=3)
    assert draws.mean() == pytest.approx(exact.mean(), abs=4 * exact.std() / np.sqrt(len(draws)))
    assert draws.var() == pytest.approx(exact.var(), rel=0.02)
    # the whole distribution, not only its moments: the CDF at each attainable value
    for x in np.unique(np.round(exact, 9)):
        assert (draws <= x + 1e-9).mean() == pytest.approx((exact <= x + 1e-9).mean(), abs=0.006)
    # with the seeds held fixed only the examples vary: the enumeration over examples alone
    fixed = intervals.two_stage_draws(a, b, resamples=200_000, seed=4, resample_seeds=False)
    d = a.mean(0) - b.mean(0)
    only = np.array([d[list(idx)].mean() for idx in itertools.product(range(3), repeat=3)])
    assert fixed.var() == pytest.approx(only.var(), rel=0.02)
    assert exact.var() > only.var()


def test_one_method_matches_the_analytic_two_stage_variance():
    """A score alone, T = sum_i v_i sum_s w_s C_si with independent multinomial weights w (seeds) and v (examples):
    Var T = E_w[Var_v T] + Var_w(E_v T), both computed in closed form from the matrix C."""
    rng = np.random.default_rng(0)
    c = (rng.random((4, 50)) < np.array([[0.5], [0.6], [0.8], [0.9]])).astype(float)
    s, n = c.shape
    # E_w[Var_v(sum_i v_i x_i)] with x = w @ c: Var_v = (1/n) var_pop(x); x's population variance averaged over w
    m = c.mean(0)  # per-example mean over seeds
    # E_w[x_i x_j] = m_i m_j + cov_seeds(c_i, c_j) / s  (w multinomial / s)
    cov = np.cov(c, rowvar=False, bias=True) / s
    second = np.outer(m, m) + cov
    e_var_v = (np.trace(second) / n - second.sum() / n**2) / n
    var_e_v = c.mean(1).var() / s  # Var_w(sum_s w_s mean_i c_si)
    analytic = e_var_v + var_e_v
    draws = intervals.two_stage_draws(c, resamples=200_000, seed=1)
    assert draws.mean() == pytest.approx(c.mean(), abs=4 * np.sqrt(analytic / len(draws)))
    assert draws.var() == pytest.approx(analytic, rel=0.02)


def test_seeds_that_disagree_widen_the_interval():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    a = _seeds(rng, labels, [0.62, 0.70, 0.78, 0.66, 0.74])
    b = _seeds(rng, labels, [0.60, 0.72, 0.66, 0.64, 0.70])
    two = intervals.two_stage(a, b, labels, "accuracy", seed=2)
    ex = intervals.two_stage(a, b, labels, "accuracy", seed=2, resample_seeds=False)
    bca = intervals.paired_bootstrap(a, b, labels, "accuracy")
    assert two["estimate"] == pytest.approx(bca["difference"]) == pytest.approx(ex["estimate"])
    assert two["high"] - two["low"] > 1.3 * (ex["high"] - ex["low"])
    assert two["high"] - two["low"] > 1.3 * (bca["high"] - bca["low"])
    alone = intervals.two_stage(a, None, labels, "accuracy", seed=2)
    assert alone["low"] < alone["estimate"] < alone["high"] and alone["significant"] is None


def test_seeds_that_agree_give_the_examples_only_interval():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 400)
    a = _seeds(rng, labels, [0.7] * 4, shared=rng.random(400) < 0.72)
    b = _seeds(rng, labels, [0.7] * 3, shared=rng.random(400) < 0.66)
    two = intervals.two_stage(a, b, labels, "accuracy", seed=5, resamples=4000)
    ex = intervals.two_stage(a, b, labels, "accuracy", seed=6, resamples=4000, resample_seeds=False)
    bca = intervals.paired_bootstrap(a, b, labels, "accuracy", resamples=4000)
    width = ex["high"] - ex["low"]
    for other in (ex, bca):  # equal within bootstrap noise (a few per cent of the width)
        assert two["low"] == pytest.approx(other["low"], abs=0.08 * width)
        assert two["high"] == pytest.approx(other["high"], abs=0.08 * width)
    assert two["significant"] == (two["low"] > 0)


def test_metrics_that_do_not_decompose_resample_seeds_too():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    a = _seeds(rng, labels, [0.55, 0.85, 0.7])
    b = _seeds(rng, labels, [0.7, 0.7, 0.7], shared=rng.random(200) < 0.7)
    two = intervals.two_stage(a, b, labels, "macro_f1", resamples=300, seed=0)
    ex = intervals.two_stage(a, b, labels, "macro_f1", resamples=300, seed=0, resample_seeds=False)
    assert two["low"] < two["estimate"] < two["high"]
    assert two["high"] - two["low"] > 1.3 * (ex["high"] - ex["low"])
    same = intervals.examples_only(a, b, labels, "macro_f1", resamples=300, seed=0)
    assert (same["difference"], same["low"], same["high"]) == (ex["estimate"], ex["low"], ex["high"])
    assert intervals.examples_only(a, b, labels, "accuracy") == intervals.paired_bootstrap(a, b, labels, "accuracy")
    # a regression metric: each draw recomputes the correlation (a loop, so few draws here)
    y = rng.normal(size=150)
    good = [y + rng.normal(scale=s, size=150) for s in (0.3, 1.5)]
    fixed = [y + rng.normal(scale=1.0, size=150)] * 2
    two = intervals.two_stage(good, fixed, y, "pearson", resamples=200, seed=0)
    ex = intervals.two_stage(good, fixed, y, "pearson", resamples=200, seed=0, resample_seeds=False)
    assert two["low"] < two["estimate"] < two["high"] and two["high"] - two["low"] > 1.3 * (ex["high"] - ex["low"])
    assert intervals.metric_fn("combined")(good[0], y) == pytest.approx(
        np.mean([intervals.metric_fn("pearson")(good[0], y), intervals.metric_fn("spearmanr")(good[0], y)]))
    with pytest.raises(intervals.IntervalError, match="against 200 labels"):
        intervals.two_stage([a[0][:10]], b, labels, "accuracy")
    with pytest.raises(intervals.IntervalError, match="has no bootstrap here"):
        intervals.metric_fn("bleu")


def test_predictions_from_logits_and_scores():
    assert intervals.predictions(np.array([[0.1, 0.9], [2.0, 1.0]])).tolist() == [1, 0]
    assert intervals.predictions(np.array([[0.5], [1.5]])).tolist() == [0.5, 1.5]
    assert intervals.predictions(np.array([2, 0])).tolist() == [2, 0]
    assert intervals.per_example("accuracy")(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 1])).tolist() == [1.0, 0.0]
    assert intervals.per_example("macro_f1") is None


@pytest.mark.filterwarnings("ignore:A single label")
@pytest.mark.parametrize("metric", ["accuracy", "f1", "macro_f1", "matthews_correlation"])
def test_confusion_metrics_match_scikit_learn_on_resamples(metric):
    from spafit_jax.data import metrics

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4 if metric != "f1" else 2, 60)
    pred = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 4 if metric != "f1" else 2, 60))
    cases = [rng.integers(0, 60, 60) for _ in range(40)]
    cases += [np.flatnonzero(labels == labels[0])[:5], np.flatnonzero(pred == labels)[:8]]  # classes absent, perfect
    for idx in cases:
        counts = np.bincount(idx, minlength=60)
        conf = np.zeros((4, 4))
        np.add.at(conf, (labels, pred), counts)
        expected = metrics.CLASSIFICATION[metric](pred[idx], labels[idx])
        assert intervals.confusion_metric(metric, conf) == pytest.approx(expected, abs=1e-12)
        assert intervals.metric_fn(metric)(pred[idx], labels[idx]) == pytest.approx(expected, abs=1e-12)
    zeros = np.zeros(5, dtype=int)  # one class only: F1 of class 1 and MCC are 0, as scikit-learn gives them
    assert intervals.metric_fn(metric)(zeros, zeros) == pytest.approx(metrics.CLASSIFICATION[metric](zeros, zeros))
