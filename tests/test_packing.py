"""Sequence packing, the data side (`packing`): the packer, the batch layout, sharding, resume, settings; and
the steps, evaluation and predict on packed batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spafit_jax.data import batching, packing
from spafit_jax.training import frozen, steps
from spafit_jax.config.files import load_config
from spafit_jax.errors import ConfigError, DataError
from spafit_jax.data.tokens import Encoded

T, K = 64, 4


def encoded(lengths, max_length=T, seed=0, pairs=False, regression=False):
    lengths = np.asarray(lengths, np.int32)
    n = len(lengths)
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (n, max_length)).astype(np.int32)
    ids[:, 0] = 2  # [CLS]
    past = np.arange(max_length)[None, :] >= lengths[:, None]
    ids[past] = 1  # the pad id
    types = np.zeros_like(ids)
    if pairs:
        types[np.arange(max_length)[None, :] >= (lengths[:, None] // 2)] = 1
        types[past] = 0
    labels = rng.normal(size=n).astype(np.float32) if regression else np.arange(n, dtype=np.int32) % 3
    return Encoded(ids, types, lengths, labels)


def lengths_of(n=500, seed=1, hi=T):
    return np.random.default_rng(seed).integers(2, hi + 1, n)


def check_packing(slots, lengths, max_length, max_segments, every=True):
    """No row over max_length tokens or max_segments examples; each example at most (every: exactly) once."""
    held = packing.packed_examples(slots)
    assert len(np.unique(held)) == len(held)
    if every:
        assert sorted(held.tolist()) == list(range(len(lengths)))
    assert slots.shape[1] == max_segments
    tokens = np.where(slots >= 0, np.asarray(lengths)[np.maximum(slots, 0)], 0).sum(1)
    assert tokens.max() <= max_length
    assert (slots >= 0).sum(1).min() >= 1  # no empty row
    # the slots of a row are filled from the left
    filled = slots >= 0
    assert (filled[:, :-1] >= filled[:, 1:]).all()


@pytest.mark.parametrize("max_segments", [1, 2, 4, 32])
def test_first_fit_holds_every_example_once_within_the_row_limits(max_segments):
    lengths = lengths_of()
    for slots in (packing.first_fit(lengths, T, max_segments),
                  packing.first_fit(lengths, T, max_segments, order=np.random.default_rng(0).permutation(500)),
                  packing.first_fit_decreasing(lengths, T, max_segments)):
        check_packing(slots, lengths, T, max_segments)
    if max_segments == 1:
        assert packing.first_fit(lengths, T, 1).shape[0] == len(lengths)


def test_first_fit_is_first_fit_and_decreasing_packs_tightest():
    # 5 into row 0, 3 into row 0 (room 2 left), 4 opens row 1, 2 fills row 0, 7 fits row 1 no more: row 2
    np.testing.assert_array_equal(packing.first_fit([5, 3, 4, 2, 7], 10, 3),
                                  [[0, 1, 3], [2, -1, -1], [4, -1, -1]])
    np.testing.assert_array_equal(packing.first_fit([5, 3, 4, 2, 7], 10, 2),
                                  [[0, 1], [2, 3], [4, -1]])
    lengths = lengths_of(2000, hi=40)
    ffd = packing.real_token_fraction(lengths, packing.first_fit_decreasing(lengths, T, 16), T)
    shuffled = packing.real_token_fraction(lengths, packing.first_fit(lengths, T, 16), T)
    assert 0.95 < ffd and shuffled <= ffd
    assert packing.real_token_fraction(lengths, np.arange(2000)[:, None], T) == pytest.approx(lengths.mean() / T)


def test_first_fit_with_a_row_cap_leaves_out_only_what_fits_nowhere():
    lengths = lengths_of(300)
    slots = packing.first_fit(lengths, T, K, max_rows=50)
    assert len(slots) == 50
    check_packing(slots, lengths, T, K, every=False)
    left = np.setdiff1d(np.arange(300), packing.packed_examples(slots))
    room = T - np.where(slots >= 0, lengths[np.maximum(slots, 0)], 0).sum(1)
    open_rows = (slots >= 0).sum(1) < K
    for i in left:  # no row had room and a free slot for it (rows only fill up)
        assert not (open_rows & (room >= lengths[i])).any()


def test_bad_packing_input_is_one_line_naming_the_fix():
    with pytest.raises(DataError, match="more than a packed row of data.max_length=10; raise data.max_length"):
        packing.first_fit([4, 11], 10, 2)
    with pytest.raises(DataError, match="0 tokens"):
        packing.first_fit([4, 0], 10, 2)
    assert packing.check_settings(16) == 16
    for bad, words in ((0, ">= 1"), (-3, ">= 1"), (True, ">= 1"), (2.5, ">= 1")):
        with pytest.raises(ConfigError, match=words) as e:
            packing.check_settings(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data.max_segments=0 must be an integer >= 1.*use e.g."):
        load_config(overrides=["data.packing=true", "data.max_segments=0"])
    cfg = load_config(overrides=["data.packing=true", "data.max_segments=8"])
    assert cfg.data.packing and cfg.data.max_segments == 8
    assert load_config(overrides=["data.max_length=8"]).data.max_segments >= 1  # the default K fits any length


def test_a_family_without_segment_starts_is_refused_in_one_line():
    class Old:
        def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
            return input_ids

    class New:
        def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
                      segment_starts=None):
            return input_ids

    packing.check_model(New(), "model.name=x")
    with pytest.raises(ConfigError, match="model.name=old cannot take packed rows yet.*set data.packing=false"):
        packing.check_model(Old(), "model.name=old")


def test_assemble_lays_out_segments_starts_types_labels_and_weights():
    enc = encoded([5, 3, 7, 2], max_length=16, pairs=True)
    slots = np.array([[1, 0, 3], [2, -1, -1], [-1, -1, -1]])
    b = packing.assemble(enc, slots, pad=packing.pad_id(enc), filler=3)
    assert packing.pad_id(enc) == 1
    assert {k: v.shape for k, v in b.items()} == {"input_ids": (3, 16), "attention_mask": (3, 16),
                                                  "token_type_ids": (3, 16), "segment_starts": (3, 3),
                                                  "labels": (3, 3), "weights": (3, 3)}
    assert all(v.dtype == np.int32 for k, v in b.items() if k not in ("weights",))
    np.testing.assert_array_equal(b["attention_mask"][0], [1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_starts"], [[0, 3, 8], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b["input_ids"][0, :10], np.concatenate(
        [enc.input_ids[1, :3], enc.input_ids[0, :5], enc.input_ids[3, :2]]))
    assert (b["input_ids"][0, 10:] == 1).all() and (b["input_ids"][1, 7:] == 1).all()
    np.testing.assert_array_equal(b["token_type_ids"][0, :10], np.concatenate(
        [enc.token_type_ids[1, :3], enc.token_type_ids[0, :5], enc.token_type_ids[3, :2]]))
    assert (b["token_type_ids"][0, 10:] == 0).all()
    np.testing.assert_array_equal(b["labels"][0], enc.labels[[1, 0, 3]])
    np.testing.assert_array_equal(b["weights"], [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # an empty row holds the filler example, weighted 0, never all padding
    np.testing.assert_array_equal(b["attention_mask"][2, :2], [1, 1])
    np.testing.assert_array_equal(b["input_ids"][2, :2], enc.input_ids[3, :2])
    assert batching.padding_efficiency(b) == (5 + 3 + 2 + 7, 48)
    reg = encoded([5, 3], max_length=16, regression=True)
    assert packing.assemble(reg, np.array([[0, 1]]))["labels"].dtype == np.float32


def test_layout_holds_batch_size_examples_a_step_and_wastes_under_a_step():
    lengths = lengths_of(3200, seed=6, hi=40)
    for batch_size, multiple in ((32, 1), (32, 8), (7, 2), (3200, 1)):
        lay = packing.layout(lengths, batch_size, max_length=T, max_segments=K, seed=0, multiple=multiple)
        rows = len(packing.first_fit(lengths, T, K, order=packing.epoch_permutation(3200, seed=0, epoch=0)))
        assert lay.rows % multiple == 0 and lay.steps == -(-rows // lay.rows)
        assert lay.steps * lay.rows - rows < lay.rows  # empty rows: less than one step's
        if multiple == 1:  # R rows hold batch_size examples on average, to within half a row
            assert abs(lay.rows * 3200 / rows - batch_size) <= 0.5 * 3200 / rows + 1e-9
    with pytest.raises(DataError, match="fewer than one batch"):
        packing.layout(lengths, 3201, max_length=T, max_segments=K, seed=0)


def test_a_layout_far_from_batch_size_examples_a_step_says_so():
    lengths = np.full(640, 4)  # 8 segments fill a row of 32 tokens: batch 8 is one row, rounded up to 8 devices' rows
    assert packing.drift(640, packing.layout(lengths, 64, max_length=32, max_segments=8, seed=0, multiple=8), 64, 8) \
        is None
    lay = packing.layout(lengths, 8, max_length=32, max_segments=8, seed=0, multiple=8)
    line = packing.drift(640, lay, 8, 8)
    assert lay.rows == 8 and "holds about 64 examples, not train.batch_size=8" in line and "\n" not in line


def test_train_slots_are_seeded_per_epoch_and_hold_every_example_in_fixed_steps():
    lengths = lengths_of(600)
    lay = packing.layout(lengths, 32, max_length=T, max_segments=K, seed=3, multiple=4)
    a = packing.train_slots(lengths, lay, max_length=T, max_segments=K, seed=3, epoch=0)
    assert a.shape == (lay.steps, lay.rows, K) and lay.rows % 4 == 0
    check_packing(a.reshape(-1, K)[(a.reshape(-1, K) >= 0).any(1)], lengths, T, K)  # epoch 0: all fit
    np.testing.assert_array_equal(a, packing.train_slots(lengths, lay, max_length=T, max_segments=K, seed=3,
                                                         epoch=0))
    b = packing.train_slots(lengths, lay, max_length=T, max_segments=K, seed=3, epoch=1)
    c = packing.train_slots(lengths, lay, max_length=T, max_segments=K, seed=4, epoch=0)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    for s in (a, b, c):
        real_rows = (s >= 0).any(2).sum(1)
        assert real_rows.max() - real_rows.min() <= 1  # steps balanced
        assert len(np.unique(packing.packed_examples(s))) >= 0.98 * 600
    described = packing.describe(encoded(lengths), lay, K, seed=3)
    assert described["rows_per_step"] == lay.rows and described["steps_per_epoch"] == lay.steps
    assert described["examples_per_step"] == pytest.approx(600 / lay.steps, abs=0.01)
    assert described["real_token_fraction"] == pytest.approx(lengths.sum() / (a.shape[0] * a.shape[1] * T), abs=1e-4)


def test_train_batches_resume_and_processes_partition_the_global_rows():
    enc = encoded(lengths_of(400), seed=2)
    lay = packing.layout(enc.lengths, 16, max_length=T, max_segments=K, seed=0, multiple=4)
    whole = list(packing.train_batches(enc, lay, max_segments=K, seed=0, epoch=2, with_rows=True))
    assert len(whole) == lay.steps
    slots = packing.train_slots(enc.lengths, lay, max_length=T, max_segments=K, seed=0, epoch=2)
    for (mine, batch), step in zip(whole, slots):
        np.testing.assert_array_equal(mine, step)
        assert batch["input_ids"].shape == (lay.rows, T)
    resumed = list(packing.train_batches(enc, lay, max_segments=K, seed=0, epoch=2, start=7))
    assert len(resumed) == len(whole) - 7
    for x, (_, y) in zip(resumed, whole[7:]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    parts = [list(packing.train_batches(enc, lay, max_segments=K, seed=0, epoch=2, process_index=p,
                                        process_count=2)) for p in range(2)]
    for (_, full), p0, p1 in zip(whole, *parts):
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), full[key])
    with pytest.raises(DataError, match="outside"):
        packing.train_batches(enc, lay, max_segments=K, seed=0, epoch=0, start=10 ** 6)
    with pytest.raises(DataError, match="process count"):
        packing.train_batches(enc, packing.Layout(3, 5), max_segments=K, seed=0, epoch=0, process_index=0,
                              process_count=2)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_batches_see_every_example_once_and_unpack_to_input_order(processes):
    enc = encoded(lengths_of(101, seed=5), seed=5)
    slots, rows = packing.eval_rows(enc, 24, max_segments=K, multiple=2)
    assert rows % 2 == 0
    check_packing(slots, enc.lengths, T, K)
    got = [list(packing.eval_batches(enc, slots, rows, process_index=p, process_count=processes))
           for p in range(processes)]
    held = np.concatenate([np.concatenate([m for m, _ in g]) for g in got])
    weights = np.concatenate([np.concatenate([b["weights"] for _, b in g]) for g in got])
    assert sorted(packing.packed_examples(held).tolist()) == list(range(101))
    np.testing.assert_array_equal(weights > 0, held >= 0)
    labels = np.concatenate([np.concatenate([b["labels"] for _, b in g]) for g in got])
    np.testing.assert_array_equal(packing.unpack(labels, held, 101), enc.labels)
    # unpack maps per-slot outputs [M, K, C] back to the examples in input order
    logits = np.where(held[..., None] >= 0, held[..., None] * 10.0 + np.arange(3), -1.0)
    np.testing.assert_array_equal(packing.unpack(logits, held, 101), np.arange(101)[:, None] * 10.0 + np.arange(3))
    with pytest.raises(DataError, match="exactly once"):
        packing.unpack(logits, held, 102)


def test_frozen_cache_rows_are_the_examples_states_one_after_the_other():
    lengths = np.array([3, 5, 2])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.arange(offsets[-1] * 2, dtype=np.float32).reshape(-1, 2) + 1
    cache = frozen.Cache(1, flat, offsets, apply_fn=None)
    got = cache.hidden(np.array([[2, 0], [1, -1]]), 8, np.array([[0, 2], [0, 0]]))
    np.testing.assert_array_equal(got[0, :5], np.concatenate([flat[8:10], flat[0:3]]))
    np.testing.assert_array_equal(got[1, :5], flat[3:8])
    assert (got[0, 5:] == 0).all() and (got[1, 5:] == 0).all()
    np.testing.assert_array_equal(cache.hidden(np.array([1, 2]), 6), cache.hidden(np.array([[1], [2]]), 6))


def test_loop_batches_are_packings_and_the_cache_fills_each_segment():
    from spafit_jax.training import loop

    enc = encoded(lengths_of(60, seed=4, hi=30), seed=4)
    cfg = load_config(overrides=["train.batch_size=8", "train.seed=3", "data.max_length=64", "data.packing=true",
                                 f"data.max_segments={K}"])
    lay = packing.layout(enc.lengths, 8, max_length=T, max_segments=K, seed=3)
    want = list(packing.train_batches(enc, lay, max_segments=K, seed=3, epoch=1, start=2, with_rows=True))
    got = list(loop.Batches(cfg, enc, None, layout=lay).epoch(1, 2))
    assert len(got) == len(want) == lay.steps - 2
    for a, (_, b) in zip(got, want):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    offsets = np.concatenate([[0], np.cumsum(enc.lengths.astype(np.int64))])
    flat = np.repeat(np.arange(len(enc), dtype=np.float32), enc.lengths)[:, None] + 1
    cache = frozen.Cache(1, flat, offsets, apply_fn=None)
    for a, (slots, b) in zip(loop.Batches(cfg, enc, None, cache, lay).epoch(1, 2), want):
        assert set(a) == set(b) | {"hidden"}
        seg = b["attention_mask"]
        example = np.take_along_axis(slots, np.maximum(seg - 1, 0), axis=1) + 1  # the example of each token, + 1
        np.testing.assert_array_equal(a["hidden"][..., 0], np.where((seg > 0) & (example > 0), example, 0))
    meter = loop.Meter()
    meter.batch(got[0], got[0]["input_ids"].shape)
    real = int(enc.lengths[packing.packed_examples(want[0][0])].sum())
    assert meter.tokens["run"] == [real, lay.rows * T]


class PackedToy:
    """A per-token linear model whose packed mode pools each segment's first token (the interface's shape):
    packed logits of an example equal its unpacked logits exactly."""

    def apply(self, variables, input_ids, attention_mask, token_type_ids, deterministic=True, rngs=None,
              segment_starts=None):
        w = variables["params"]["w"]
        x = jax.nn.one_hot(input_ids, 100) @ w + 0.5 * token_type_ids[..., None]
        if segment_starts is None:
            return x[:, 0]
        return jnp.take_along_axis(x, segment_starts[..., None], axis=1)


@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_packed_step_equals_the_unpacked_step_of_the_same_examples(regression, grad_accum):
    """The step passes segment_starts by keyword; the loss is the mean over real segments (regression too)."""
    enc = encoded(lengths_of(12, seed=3, hi=20), regression=regression, pairs=True)
    slots = packing.first_fit_decreasing(enc.lengths, T, K)
    slots = np.concatenate([slots, np.full((-len(slots) % 2, K), -1)])
    packed = packing.assemble(enc, slots, pad=packing.pad_id(enc))
    plain = batching._batch(enc, np.arange(12), T, np.ones(12, np.float32))
    model = PackedToy()
    params = {"w": jax.random.normal(jax.random.key(0), (100, 1 if regression else 3))}
    frozen_half = {"w": None}
    tx = optax.sgd(0.1)
    outs = []
    for batch in (plain, packed):
        state = steps.init_state(params, tx, 0)
        new, out = steps.train_step(state, frozen_half, batch, apply_fn=model.apply, tx=tx, is_regression=regression,
                                    grad_accum=grad_accum if batch is packed else 1)
        outs.append((float(out["loss"]), new.trainable["w"]))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-7)
    logits = steps.eval_step(params, frozen_half, packed, apply_fn=model.apply)
    assert logits.shape == (len(slots), K, params["w"].shape[1])
    per_example = packing.unpack(np.asarray(logits), slots, 12)
    unpacked = np.asarray(steps.eval_step(params, frozen_half, plain, apply_fn=model.apply))
    np.testing.assert_allclose(per_example, unpacked, rtol=1e-6)


# ------------------------------------------------------------------ end to end, with the model side of packing


def _model_packs() -> bool:
    import inspect

    from spafit_jax.models.bert import BertForSequenceClassification

    return "segment_starts" in inspect.signature(BertForSequenceClassification.__call__).parameters


needs_model = pytest.mark.skipif(not _model_packs(), reason="the model side of packing (segment_starts=) is not "
                                                            "merged yet")
#: a short packed run of the tiny model on tweets (short texts: about two a row of 64 tokens)
PACKED_RUN = ["data.task=tweets", "data.limit_train=64", "data.limit_eval=40", "data.max_length=64",
              "data.packing=true", "data.max_segments=4", "train.batch_size=16", "train.eval_batch_size=16",
              "train.max_steps=4", "train.lr=1e-2", "method.name=spafit", "method.n1=1", "method.n2=2",
              "train.log_every=1"]


@pytest.mark.slow
@needs_model
def test_packed_run_evaluates_and_predicts_each_example_as_unpacked(tmp_path, tiny_model_dir):
    from spafit_jax.data import pipeline as data, metrics
    from spafit_jax.training import rundir
    from spafit_jax.training import trainer
    from spafit_jax.after_training.run import load_run

    overrides = [f"model.name={tiny_model_dir}", *PACKED_RUN]
    done = trainer.train_and_evaluate(load_config([], overrides), tmp_path / "run")
    r = done.results
    assert r.compiled_shapes == 1 and r.steps == 4
    assert r.packing["max_segments"] == 4 and r.packing["segments_per_row"] > 1.5
    assert r.padding_efficiency > 0.6 and r.packing["real_token_fraction"] > 0.6  # unpacked rows of 64: 0.50
    loaded = load_run(tmp_path / "run", "last")
    unpacked_cfg = load_config([], overrides + ["data.packing=false"])
    spec, _, evals = data.load_task_texts(unpacked_cfg.data, seed=unpacked_cfg.train.seed)
    split, ex = next(iter(evals.items()))
    assert loaded.packs()
    packed_logits, plain_logits = loaded.logits(ex.texts_a), loaded.logits(ex.texts_a, batch_size=7, packed=False)
    assert packed_logits.shape == (len(ex), spec.num_labels)
    np.testing.assert_allclose(packed_logits, plain_logits, rtol=0, atol=1e-5)
    assert np.abs(plain_logits - plain_logits.mean(0)).max() > 1e-4  # the examples' logits differ: not vacuous
    # the evaluator's metrics (packed eval batches) are those of the unpacked logits of the same parameters
    expected = metrics.compute_metrics(spec, plain_logits, ex.labels)
    assert r.splits[split] == pytest.approx(expected, abs=1e-6)
    # a resume that changes a packing setting is refused in one line naming the fix
    for change, words in (("data.packing=false", "data.packing=true.*this resume sets data.packing=false.*resume "
                                                 "with data.packing=true"),
                          ("data.max_segments=8", "data.max_segments=4.*resume with data.max_segments=4")):
        with pytest.raises(ConfigError, match=words) as e:
            rundir.check_resume_settings(tmp_path / "run", load_config([], overrides + [change]))
        assert "\n" not in str(e.value)
    rundir.check_resume_settings(tmp_path / "run", load_config([], overrides))


@pytest.mark.slow
@needs_model
def test_packed_mesh_pmap_and_frozen_cache_agree_on_8_devices(tmp_path, tiny_model_dir):
    import json
    import time

    from tests.parallel_worker import PYTHON, ROOT, Procs, assert_same_run, dropout_free_copy, env, tail

    model = dropout_free_copy(tiny_model_dir, tmp_path / "tiny_no_dropout")
    common = [f"model.name={model}", *PACKED_RUN]
    runs = {"mesh": ["parallel.mode=mesh"], "pmap": ["parallel.mode=pmap"],
            "pmap_cache": ["parallel.mode=pmap", "train.cache_frozen=true"]}
    (tmp_path / "spec.json").write_text(json.dumps({"base": str(tmp_path / "d8"), "common": common, "runs": runs}))
    with Procs() as procs:
        p = procs.start([PYTHON, str(ROOT / "tests" / "parallel_worker.py"), "suite", str(tmp_path / "spec.json"),
                         str(tmp_path / "out.json")], env(8, tmp_path / "tokens"), tmp_path / "d8.txt")
        assert procs.wait(p, time.monotonic() + 600) == 0, tail(tmp_path / "d8.txt")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["devices"] == 8 and {v["parallel"] for v in out["runs"].values()} == {"mesh", "pmap"}
    d8 = tmp_path / "d8"
    assert_same_run(d8 / "mesh", d8 / "pmap")
    assert_same_run(d8 / "pmap_cache", d8 / "pmap")
    results = {name: json.loads((d8 / name / "results.json").read_text()) for name in runs}
    assert results["mesh"]["packing"]["rows_per_step"] % 8 == 0
    assert results["mesh"]["compiled_shapes"] == 1
