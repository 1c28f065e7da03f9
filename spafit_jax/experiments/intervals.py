"""The protocol's intervals: a two-stage bootstrap over seeds and test examples, and the examples-only one.

A method's test score is its seeds' mean score on the test examples. Two things vary from one rerun of the
experiment to the next: the trained models (the seeds) and the test examples drawn from the task. The
two-stage (hierarchical) bootstrap resamples both: on each draw the seeds of each method are drawn with
replacement (independently per method), then the test examples with replacement (one draw shared by every
method, so a difference is paired by example), and the statistic is recomputed. `two_stage` returns the
percentile interval of those draws; it is the one the protocol's significance marks come from.

`paired_bootstrap` resamples the examples only (the seeds' predictions are held fixed, averaged per example
first) with scipy's BCa interval: the interval the first published comparison used, kept as a second
column. It is narrower whenever the seeds disagree, because it leaves their disagreement out.

Both take each method's per-seed predictions: logits [N, C] or predicted classes / scores [N]. Accuracy
decomposes over examples (each draw is a weighted mean); F1, macro F1 and MCC are computed from each draw's
confusion counts (`confusion_metric`, vectorised over draws); correlations are recomputed draw by draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from spafit_jax.errors import SpafitError

RESAMPLES, CONFIDENCE = 2000, 0.95
CONFUSION = ("f1", "macro_f1", "matthews_correlation")  # bootstrapped through confusion counts (vectorised)


class IntervalError(SpafitError):
    """A metric without a bootstrap here, or predictions that do not fit their labels."""


def predictions(x: np.ndarray) -> np.ndarray:
    """Predicted classes [N] from logits [N, C>1]; scores [N] from [N, 1] or [N] (classes or scores pass through)."""
    x = np.asarray(x)
    return x.argmax(-1) if x.ndim == 2 and x.shape[1] > 1 else x.reshape(len(x))


def per_example(metric: str) -> Callable | None:
    """fn(predictions [N], labels [N]) -> per-example scores whose mean is `metric`; None when the metric does not
    decompose over examples (F1, correlations)."""
    if metric == "accuracy":
        return lambda pred, labels: (predictions(pred) == labels).astype(np.float64)
    return None


def metric_fn(metric: str) -> Callable:
    """fn(logits or predictions, labels) -> the metric, as metrics' tables compute it (classification metrics from the
    confusion counts, `confusion_metric`, which gives scikit-learn's value without its per-call cost)."""
    from spafit_jax.data import metrics

    table = {**metrics.CLASSIFICATION, **metrics.REGRESSION}
    if metric in ("accuracy", *CONFUSION):
        def from_confusion(x, labels):
            pred, labels = predictions(x).astype(int), np.asarray(labels).astype(int)
            classes = max(int(max(pred.max(initial=0), labels.max(initial=0))) + 1, 2)
            conf = np.bincount(labels * classes + pred, minlength=classes * classes).reshape(classes, classes)
            return float(confusion_metric(metric, conf))
        return from_confusion
    if metric == "combined":  # stsb: (pearson + spearmanr) / 2, as compute_metrics gives it
        return lambda x, labels: float(np.mean([table[m](predictions(x), labels) for m in ("pearson", "spearmanr")]))
    if metric not in table:
        raise IntervalError(f"metric {metric!r} has no bootstrap here; use one of {', '.join(sorted(table))}")
    return lambda x, labels: float(table[metric](predictions(x), labels))


def paired_bootstrap(a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray, metric: str, *,
                     resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The difference mean_seeds metric(a) - mean_seeds metric(b) on the test examples, and its paired-bootstrap
    interval over examples only (the seeds held fixed): `a`, `b` are each method's per-seed logits [N, C] (or
    predictions [N]) on the same examples, `labels` [N]. scipy's BCa interval. Returns {difference, low, high,
    significant}."""
    from scipy import stats

    labels = np.asarray(labels)
    score = per_example(metric)
    if score is not None:  # the difference of means is the mean of per-example differences
        d = np.mean([score(x, labels) for x in a], axis=0) - np.mean([score(x, labels) for x in b], axis=0)
        data, statistic, vectorized = (d,), lambda x, axis=-1: np.mean(x, axis=axis), True
        point = float(d.mean())
    else:
        fn = metric_fn(metric)

        def statistic(idx):
            idx = idx.astype(int)
            return np.mean([fn(x[idx], labels[idx]) for x in a]) - np.mean([fn(x[idx], labels[idx]) for x in b])

        data, vectorized = (np.arange(len(labels)),), False
        point = float(statistic(data[0]))
    if np.ptp(data[0]) == 0 and score is not None:  # every resample gives the same difference
        return {"difference": point, "low": point, "high": point, "significant": point != 0}
    res = stats.bootstrap(data, statistic, vectorized=vectorized, n_resamples=resamples, confidence_level=confidence,
                          method="BCa", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"difference": point, "low": low, "high": high, "significant": not (low <= 0 <= high)}


def _weights(rng: np.random.Generator, resamples: int, n: int, resample: bool) -> np.ndarray:
    """[resamples, n]: how often each of n items is drawn in a resample of n with replacement, / n (each row a
    resample's weights; multinomial counts, by one bincount), or uniform rows when not resampling."""
    if not resample:
        return np.full((resamples, n), 1.0 / n)
    drawn = rng.integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n) / n


def two_stage_draws(a: np.ndarray, b: np.ndarray | None = None, *, resamples: int = RESAMPLES, seed: int = 0,
                    resample_seeds: bool = True) -> np.ndarray:
    """[resamples] bootstrap draws of mean(a) (or mean(a) - mean(b)) from per-example scores a [S_a, N] (b [S_b, N]):
    each draw resamples a's seeds, b's seeds (independently) and the N examples (one draw for both: paired),
    all with replacement; `resample_seeds=False` keeps the seeds fixed (examples only). Vectorised: the draw's
    statistic is sum_i v_i (sum_s w_s a_si - sum_s u_s b_si) with multinomial weights w, u, v."""
    a = np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    wa = _weights(rng, resamples, a.shape[0], resample_seeds)
    wb = None if b is None else _weights(rng, resamples, np.shape(b)[0], resample_seeds)
    v = _weights(rng, resamples, a.shape[1], True)
    per_example = wa @ a
    if b is not None:
        per_example -= wb @ np.asarray(b, dtype=np.float64)
    return np.einsum("bi,bi->b", v, per_example)


def confusion_metric(metric: str, conf: np.ndarray) -> np.ndarray:
    """`metric` (accuracy, f1 of class 1, macro_f1, matthews_correlation) from confusion counts conf [..., C, C]
    (true class x predicted class), as scikit-learn computes it from the examples those counts describe: macro F1
    averages over the classes present in truth or prediction, a zero denominator gives 0."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum((-2, -1))
    right = np.trace(conf, axis1=-2, axis2=-1)
    true, pred = conf.sum(-1), conf.sum(-2)
    if metric == "accuracy":
        return right / total
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(true + pred > 0, 2 * tp / (true + pred), 0.0)
        if metric == "f1":
            return f1[..., 1]
        if metric == "macro_f1":
            present = (true + pred) > 0
            return (f1 * present).sum(-1) / present.sum(-1)
        if metric == "matthews_correlation":
            cov = right * total - (true * pred).sum(-1)
            denom = np.sqrt((total**2 - (pred * pred).sum(-1)) * (total**2 - (true * true).sum(-1)))
            return np.where(denom > 0, cov / denom, 0.0)
    raise IntervalError(f"metric {metric!r} is not computed from a confusion matrix here")


def _confusion_draws(a: Sequence[np.ndarray], b: Sequence[np.ndarray] | None, labels: np.ndarray, metric: str, *,
                     resamples: int, seed: int, resample_seeds: bool) -> np.ndarray:
    """The draws of `two_stage_draws` for a classification metric that does not decompose: each seed's confusion
    counts on each draw's resampled examples (example counts @ one-hot (label, prediction) pairs), its metric, then
    the seeds' weighted mean. The same sampling as `two_stage_draws` (seeds of a, seeds of b, examples)."""
    rng = np.random.default_rng(seed)
    wa = _weights(rng, resamples, len(a), resample_seeds)
    wb = None if b is None else _weights(rng, resamples, len(b), resample_seeds)
    counts = _weights(rng, resamples, len(labels), True) * len(labels)
    classes = max(int(max(labels.max(), *(p.max() for p in [*a, *(b or [])]))) + 1, 2)

    def scores(preds):  # [resamples, seeds]: each seed's metric from its confusion counts on each draw
        out = []
        for p in preds:
            pair = labels.astype(int) * classes + p.astype(int)  # each example's (label, prediction) cell
            order = np.argsort(pair, kind="stable")
            cells, starts = np.unique(pair[order], return_index=True)
            conf = np.zeros((resamples, classes * classes))
            conf[:, cells] = np.add.reduceat(counts[:, order], starts, axis=1)
            out.append(confusion_metric(metric, conf.reshape(resamples, classes, classes)))
        return np.stack(out, axis=1)

    draws = np.einsum("bs,bs->b", wa, scores(a))
    if b is not None:
        draws -= np.einsum("bs,bs->b", wb, scores(b))
    return draws


def _metric_draws(a: Sequence[np.ndarray], b: Sequence[np.ndarray] | None, labels: np.ndarray, fn: Callable, *,
                  resamples: int, seed: int, resample_seeds: bool) -> np.ndarray:
    """The draws of `two_stage_draws` for a regression metric (correlations): each seed's metric recomputed on the
    resampled examples (a loop over draws; seeds drawn by index, examples by index)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    pick = (lambda k: rng.integers(0, k, k)) if resample_seeds else (lambda k: np.arange(k))
    out = np.empty(resamples)
    for r in range(resamples):
        sa = pick(len(a))
        sb = None if b is None else pick(len(b))
        idx = rng.integers(0, n, n)
        value = np.mean([fn(a[s][idx], labels[idx]) for s in sa])
        if b is not None:
            value -= np.mean([fn(b[s][idx], labels[idx]) for s in sb])
        out[r] = value
    return out


def two_stage(a: Sequence[np.ndarray], b: Sequence[np.ndarray] | None, labels: np.ndarray, metric: str, *,
              resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
              resample_seeds: bool = True) -> dict:
    """A method's score (b None) or the difference of two methods' scores with the two-stage bootstrap's percentile
    interval over seeds and examples. `a`, `b`: per-seed logits [N, C] or predictions [N] on the same examples,
    `labels` [N]. Returns {estimate, low, high, significant (the interval excludes 0; None for a score alone)}."""
    labels = np.asarray(labels)
    for x in [*a, *(b or [])]:
        if len(x) != len(labels):
            raise IntervalError(f"predictions for {len(x)} examples against {len(labels)} labels; score every seed "
                                "on the same test split")
    score = per_example(metric)
    fn = metric_fn(metric)
    estimate = np.mean([fn(x, labels) for x in a]) - (0.0 if b is None else np.mean([fn(x, labels) for x in b]))
    if score is not None:
        sa = np.stack([score(x, labels) for x in a])
        sb = None if b is None else np.stack([score(x, labels) for x in b])
        draws = two_stage_draws(sa, sb, resamples=resamples, seed=seed, resample_seeds=resample_seeds)
    elif metric in CONFUSION:
        pa = [predictions(x) for x in a]
        pb = None if b is None else [predictions(x) for x in b]
        draws = _confusion_draws(pa, pb, labels, metric, resamples=resamples, seed=seed, resample_seeds=resample_seeds)
    else:
        pa = [predictions(x) for x in a]
        pb = None if b is None else [predictions(x) for x in b]
        draws = _metric_draws(pa, pb, labels, fn, resamples=resamples, seed=seed, resample_seeds=resample_seeds)
    tail = 100 * (1 - confidence) / 2
    low, high = (float(q) for q in np.nanpercentile(draws, [tail, 100 - tail]))
    return {"estimate": float(estimate), "low": low, "high": high,
            "significant": None if b is None else not (low <= 0 <= high)}


def examples_only(a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray, metric: str, *,
                  resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The examples-only interval of a - b (seeds held fixed): `paired_bootstrap`'s BCa where the metric decomposes
    over examples (accuracy, vectorised), else `two_stage` without the seed stage (percentile; BCa would recompute
    the metric for every draw and every left-out example). Returns {difference, low, high, significant}."""
    if per_example(metric) is not None:
        return paired_bootstrap(a, b, labels, metric, resamples=resamples, confidence=confidence, seed=seed)
    r = two_stage(a, b, labels, metric, resamples=resamples, confidence=confidence, seed=seed, resample_seeds=False)
    return {"difference": r["estimate"], "low": r["low"], "high": r["high"], "significant": r["significant"]}
