"""Tests of spafit_jax.data.batching: bucket rules, length-grouped train order, eval order, padding efficiency."""

import numpy as np
import pytest

from spafit_jax.data import batching
from spafit_jax.config.files import load_config
from spafit_jax.errors import ConfigError
from spafit_jax.data.tokens import Encoded


def encoded(lengths, max_length=64, seed=0):
    lengths = np.asarray(lengths, np.int32)
    n = len(lengths)
    ids = np.random.default_rng(seed).integers(5, 100, (n, max_length)).astype(np.int32)
    ids[np.arange(max_length)[None, :] >= lengths[:, None]] = 0
    return Encoded(ids, np.zeros_like(ids), lengths, np.arange(n, dtype=np.int32))


def test_bucket_multiple_gives_fine_buckets_ending_at_max_length():
    assert batching.resolve_buckets(128, multiple=32) == [32, 64, 96, 128]
    assert batching.resolve_buckets(100, multiple=32) == [32, 64, 96, 100]
    assert load_config(overrides=["data.bucket_multiple=16"]).data.bucket_lengths() == list(range(16, 129, 16))
    with pytest.raises(ConfigError, match="both set"):
        load_config(overrides=["data.bucket_multiple=16", "data.buckets=[64,128]"])
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(overrides=["data.bucket_multiple=0"])


@pytest.mark.parametrize("group", [False, True])
def test_train_order_is_a_seeded_subset_of_each_example_at_most_once(group):
    lengths = np.random.default_rng(1).integers(3, 64, 1000)
    order = batching.train_order(lengths, 32, seed=3, epoch=2, group_by_length=group)
    assert order.shape == (1000 // 32, 32)
    assert len(np.unique(order)) == order.size  # no example twice
    again = batching.train_order(lengths, 32, seed=3, epoch=2, group_by_length=group)
    np.testing.assert_array_equal(order, again)
    other = batching.train_order(lengths, 32, seed=3, epoch=3, group_by_length=group)
    assert not np.array_equal(order, other)


def test_plain_order_is_the_epoch_permutation():
    lengths = np.full(100, 10)
    perm = np.random.default_rng([0, 1]).permutation(100)
    np.testing.assert_array_equal(batching.train_order(lengths, 8, seed=0, epoch=1), perm[:96].reshape(12, 8))


def test_grouping_pads_less_and_compiles_few_shapes():
    rng = np.random.default_rng(0)
    enc = encoded(np.clip(rng.gamma(2.0, 12.0, 3200).astype(int), 3, 128), max_length=128)
    buckets = batching.resolve_buckets(128, multiple=16)

    def efficiency(group):
        real = padded = 0
        shapes = set()
        for batch in batching.train_batches(enc, 32, seed=0, epoch=0, buckets=buckets, group_by_length=group):
            r, p = batching.padding_efficiency(batch)
            real, padded = real + r, padded + p
            shapes.add(batch["input_ids"].shape)
        return real / padded, len(shapes)

    (plain, _), (grouped, n_shapes) = efficiency(False), efficiency(True)
    assert grouped > 1.5 * plain, (grouped, plain)  # sorted chunks of 50 batches: little padding left
    assert n_shapes <= len(buckets)


def test_grouped_resume_mid_epoch_and_hosts_share_the_order():
    enc = encoded(np.random.default_rng(2).integers(3, 64, 200))
    kw = dict(seed=5, epoch=1, buckets=[16, 32, 64], group_by_length=True)
    full = list(batching.train_batches(enc, 8, **kw))
    resumed = list(batching.train_batches(enc, 8, start=10, **kw))
    for a, b in zip(full[10:], resumed):
        np.testing.assert_array_equal(a["labels"], b["labels"])
    halves = [list(batching.train_batches(enc, 8, process_index=p, process_count=2, **kw)) for p in range(2)]
    for whole, h0, h1 in zip(full, *halves):
        np.testing.assert_array_equal(whole["labels"], np.concatenate([h0["labels"], h1["labels"]]))
        assert h0["input_ids"].shape == h1["input_ids"].shape == (4, whole["input_ids"].shape[1])


def test_grouped_eval_sees_every_example_once_with_less_padding():
    enc = encoded(np.random.default_rng(3).integers(3, 64, 101))
    seen, padded = [], {}
    for group in (False, True):
        labels, total = [], 0
        for batch in batching.eval_batches(enc, 16, buckets=[16, 32, 64], group_by_length=group):
            labels += list(batch["labels"][batch["weights"] > 0])
            total += batching.padding_efficiency(batch)[1]
        seen.append(sorted(labels))
        padded[group] = total
    assert seen[0] == seen[1] == list(range(101))
    assert padded[True] < padded[False]


def padded_rows(maxima, buckets):
    return sum(batching.pick_bucket(int(m), buckets) for m in maxima)


@pytest.mark.parametrize("seed", range(4))
def test_fitted_buckets_pad_least_of_every_choice_of_as_many_lengths(seed):
    import itertools

    rng = np.random.default_rng(seed)
    maxima = np.clip(rng.gamma(2.0, 15.0, 60).astype(int), 3, 100)
    for k in (1, 2, 3):
        fitted = batching.fit_buckets(maxima, k, 128)
        used = [b for b in fitted if b < 128 or maxima.max() > 120]
        assert len(used) <= k and fitted[-1] == 128 and fitted == sorted(set(fitted))
        assert all(b % batching.FIT_MULTIPLE == 0 for b in fitted)
        candidates = sorted(set(range(8, 129, 8)))
        top = -(-int(maxima.max()) // 8) * 8
        best = min(padded_rows(maxima, [*c, top] if top < 128 else [*c, 128])
                   for r in range(k) for c in itertools.combinations([x for x in candidates if x < top], r))
        assert padded_rows(maxima, fitted) == best


def test_fitted_buckets_from_the_config_and_their_refusals():
    cfg = load_config(overrides=["data.max_shapes=2", "data.max_length=64"])
    assert cfg.data.bucket_lengths([9, 10, 30, 31, 32]) == [16, 32, 64]
    assert cfg.data.bucket_lengths() == [64]  # nothing to fit yet: max_length only
    with pytest.raises(ConfigError, match="data.max_shapes=0 must be >= 1"):
        load_config(overrides=["data.max_shapes=0"])
    # Fitted shapes are the default (max_shapes=8); buckets given by hand win over them, null restores the old default.
    assert load_config().data.max_shapes == 8 and load_config().data.group_by_length
    maxima = [9, 10, 30, 31, 32, 40, 41, 50, 60, 70, 90]
    assert load_config(overrides=["data.max_shapes=4", "data.bucket_multiple=16", "data.max_length=64"]
                       ).data.bucket_lengths(maxima) == [16, 32, 48, 64]
    assert load_config(overrides=["data.buckets=[64,128]"]).data.bucket_lengths(maxima) == [64, 128]
    assert load_config(overrides=["data.max_shapes=null"]).data.bucket_lengths(maxima) == [32, 64, 128]


def test_training_with_fitted_buckets_compiles_at_most_max_shapes(tiny_model_dir, tmp_path):
    from spafit_jax.after_training.run import load_run
    from spafit_jax.training.trainer import train_and_evaluate
    from tests.parallel_worker import tiny_run

    base = [*tiny_run(tiny_model_dir), "data.task=tweets", "data.max_length=64", "data.group_by_length=true"]
    run = train_and_evaluate(load_config([], [*base, "data.max_shapes=2"]), tmp_path / "fitted")
    fitted = run.results
    assert fitted.compiled_shapes <= 2 and fitted.buckets[-1] == 64 and fitted.steps == 4
    from spafit_jax.training import loading

    enc = loading.load_for_training(load_config([], base)).task.train  # the same examples, other buckets
    real = padded = 0
    for batch in batching.train_batches(enc, 16, seed=0, epoch=0, buckets=[16, 32, 64], group_by_length=True):
        r, p = batching.padding_efficiency(batch)  # 4 steps of 16 over 64 examples: one epoch
        real, padded = real + r, padded + p
    assert fitted.padding_efficiency >= real / padded
    texts = ["a b c", "a b c d e f g h i j k l m n o p q r s t u v w"]
    logits = load_run(tmp_path / "fitted").logits(texts, None, batch_size=1)
    assert logits.shape[0] == 2 and np.isfinite(logits).all()
