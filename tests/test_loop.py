"""The pieces of the training loop (`loop`), each on its own: no model, no compile."""

import numpy as np
import pytest

from spafit_jax.data import batching
from spafit_jax.training import frozen, loop
from spafit_jax.config.files import load_config
from spafit_jax.training.steps import DivergedError
from tests.test_batching import encoded

class Writer:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

def test_batches_come_from_batching_and_the_cache_only_adds_hidden_states(monkeypatch):
    enc = encoded(np.random.default_rng(0).integers(3, 60, 40))
    cfg = load_config(overrides=["train.batch_size=8", "train.seed=3", "data.max_length=64"])
    buckets = [16, 32, 64]
    want = list(batching.train_batches(enc, 8, seed=3, epoch=1, buckets=buckets, start=2, group_by_length=True))
    # With the cache off, nothing of frozen.py runs: the batches are batching's, as they are.
    monkeypatch.setattr(frozen.Cache, "attach", lambda *a: pytest.fail("the cache ran while off"))
    got = list(loop.Batches(cfg, enc, buckets).epoch(1, 2))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    # With it on, each batch of the same order gains its rows' hidden states, nothing else changes.
    lengths = enc.lengths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.repeat(np.arange(len(enc), dtype=np.float32), lengths)[:, None] * np.ones((1, 2), np.float32)
    cache = frozen.Cache(1, flat, offsets, apply_fn=None)
    order = batching.train_order(enc.lengths, 8, seed=3, epoch=1, group_by_length=True)[2:]
    for rows, a, b in zip(order, loop.Batches(cfg, enc, buckets, cache).epoch(1, 2), want):
        assert set(a) == set(b) | {"hidden"} and all(np.array_equal(a[k], b[k]) for k in b)
        real = b["attention_mask"] > 0
        np.testing.assert_array_equal(a["hidden"][..., 0], np.where(real, rows[:, None], 0))

def test_meter_counts_tokens_shapes_and_keeps_its_window():
    meter = loop.Meter()
    batch = {"attention_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 0]]), "weights": np.ones(2, np.float32)}
    assert meter.batch(batch, (2, 4)) and not meter.batch(batch, (2, 4))
    meter.losses = [1.0, 2.0]
    again = loop.Meter(meter.window())
    assert again.losses == [1.0, 2.0] and again.tokens == meter.tokens == {k: [10, 16] for k in ("log", "epoch", "run")}
    assert meter.efficiency("log") == 10 / 16 and meter.tokens["log"] == [0, 0] and meter.tokens["run"] == [10, 16]
    meter.step(3.0, compiled=True)
    meter.step(1.0, compiled=False)
    assert meter.examples_per_second() == 2.0  # the compiled step is left out
    assert meter.examples_per_second(processes=4) == 8.0


def test_meter_counts_the_examples_a_packed_batch_holds():
    meter = loop.Meter()  # two rows: 3 segments, then 1 segment and an empty slot; then a bucketed pad row
    packed = {"attention_mask": np.array([[1, 2, 2, 3], [1, 1, 1, 0]]),
              "weights": np.array([[1, 1, 1], [1, 0, 0]], np.float32)}
    bucketed = {"attention_mask": np.array([[1, 1, 0], [0, 0, 0]]), "weights": np.array([1, 0], np.float32)}
    assert meter.batch(packed, (2, 4)) and meter.examples == 4
    meter.step(1.0, compiled=True)
    assert not meter.batch(packed, (2, 4))
    meter.step(2.0, compiled=False)
    assert meter.batch(bucketed, (2, 3)) and meter.examples == 1
    meter.step(5.0, compiled=True)
    assert meter.examples_per_second() == 2.0  # 4 examples in the 2 s of the one step that did not compile

def test_guard_skips_then_stops_after_the_limit(tmp_path):
    writer = Writer()
    guard = loop.Guard(2, writer, tmp_path, bad_steps=1)
    for step, finite in ((1, True), (2, False), (3, True), (4, False)):
        guard.push(step, np.bool_(finite))
    guard.check(upto=3)
    assert guard.bad_steps == 2 and guard.in_a_row == 0 and len(guard.pending) == 1
    guard.push(5, np.bool_(False))
    with pytest.raises(DivergedError, match="2 steps in a row \\(up to step 5\\)"):
        guard.check(upto=5)
    assert writer.records == [{"kind": "diverged", "step": 5, "bad_steps": 4}]

def test_signals_are_restored():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with loop.Signals() as s:
        assert signal.getsignal(signal.SIGTERM) != before and not s.stop
        signal.raise_signal(signal.SIGTERM)
        assert s.stop and not s.interrupted
    assert signal.getsignal(signal.SIGTERM) == before

def test_capped_eval_batch(monkeypatch):
    monkeypatch.setattr(loop.jax, "device_count", lambda: 4)
    assert loop.capped(64, 10) == 12 and loop.capped(8, 100) == 8 and loop.capped(64, 1) == 4
