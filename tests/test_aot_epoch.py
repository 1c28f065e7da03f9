"""Tests of `python -m spafit_jax.aot_epoch` (an estimated epoch of a length distribution, bucketed against packed)
and of `aot` compiling the packed programs. The epoch's batches are checked against the trainer's own batch
iterators; compiling needs libtpu (skips without it, fails under SPAFIT_REQUIRE_REFERENCE=1, as test_aot)."""

import json

import numpy as np
import pytest

from spafit_jax import aot_epoch
from spafit_jax.tpu import epoch
from spafit_jax.data import batching, packing
from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.config.files import load_config
from spafit_jax.errors import DataError
from spafit_jax.data.tokens import Encoded
from tests.test_aot import TINY, libtpu  # noqa: F401 (a fixture)

T, K = 64, 4


def _encoded(lengths):
    lengths = np.asarray(lengths, np.int32)
    ids = np.where(np.arange(T)[None, :] < lengths[:, None], 7, 0).astype(np.int32)
    return Encoded(ids, np.zeros_like(ids), lengths, np.arange(len(lengths), dtype=np.int32) % 2)


def _cfg(*overrides):
    return load_config([], ["data.task=sst2", f"data.max_length={T}", "train.batch_size=16", "train.eval_batch_size=16",
                            f"data.max_segments={K}", "data.max_shapes=3", *overrides])


def _seen(batches):
    """{(rows, length): batches} and the real-token fraction of batches as the trainer builds them."""
    shapes, real, padded = {}, 0, 0
    for b in batches:
        key = b["input_ids"].shape
        shapes[key] = shapes.get(key, 0) + 1
        r, p = batching.padding_efficiency(b)
        real, padded = real + r, padded + p
    return shapes, real / padded


def test_epoch_batches_are_the_trainers_batches():
    """The shapes, batch counts and real-token fractions `aot_epoch` derives from lengths alone are those of the
    trainer's iterators (`batching` bucketed and grouped, `packing` packed) on examples of those lengths."""
    rng = np.random.default_rng(3)
    train, evl = rng.integers(3, T + 1, 300), rng.integers(3, T + 1, 90)
    cfg = _cfg()
    tr, ev = _encoded(train), _encoded(evl)

    b = epoch.bucketed_batches(cfg, train, evl, devices=1)
    assert len(b["buckets"]) <= 4 and b["buckets"][-1] == T
    shapes, frac = _seen(batching.train_batches(tr, 16, seed=0, epoch=0, buckets=b["buckets"], group_by_length=True))
    assert dict(b["shapes"]["train"]) == shapes and b["real_token_fraction"]["train"] == pytest.approx(frac)
    shapes, frac = _seen(batching.eval_batches(ev, 16, buckets=b["buckets"], group_by_length=True))
    assert dict(b["shapes"]["eval"]) == shapes and b["real_token_fraction"]["eval"] == pytest.approx(frac)

    p = epoch.packed_batches(_cfg("data.packing=true"), train, evl, devices=1)
    r = p["rows_per_step"]
    lay = packing.layout(train, 16, max_length=T, max_segments=K, seed=0)
    assert r == lay.rows
    shapes, frac = _seen(packing.train_batches(tr, lay, max_segments=K, seed=0, epoch=0))
    assert dict(p["shapes"]["train"]) == shapes == {(r, T): lay.steps}  # one train program
    assert p["real_token_fraction"]["train"] == pytest.approx(frac)
    slots, per = packing.eval_rows(ev, 16, max_segments=K)
    shapes, frac = _seen(batch for _, batch in packing.eval_batches(ev, slots, per))
    assert dict(p["shapes"]["eval"]) == shapes and len(shapes) == 1
    assert p["real_token_fraction"]["eval"] == pytest.approx(frac)
    assert frac > b["real_token_fraction"]["eval"]  # first-fit decreasing pads less than length-sorted buckets


def test_read_lengths_clips_and_names_a_bad_line(tmp_path):
    f = tmp_path / "lengths.txt"
    f.write_text("# token counts\n12\n\n300  # clipped\n5\n")
    assert epoch.read_lengths(str(f), 128).tolist() == [12, 128, 5]
    f.write_text("12\nx7\n")
    with pytest.raises(DataError, match=r"lengths.txt:2: 'x7' is not a token count"):
        epoch.read_lengths(str(f), 128)
    with pytest.raises(DataError, match="cannot read lengths file"):
        epoch.read_lengths(str(tmp_path / "absent.txt"), 128)


def test_estimate_compiles_the_packed_programs_and_adds_up_the_epoch(libtpu, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    """`aot` compiles the packed train and eval steps (segment_starts in the batch, one label per segment);
    `aot_epoch` multiplies each shape's step by its batches; its command line prints JSON."""
    from spafit_jax.tpu import ahead

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    name = f"model.name={tmp_path}"
    rows, s, extra = ahead.run(_cfg(name, "data.packing=true"), "v5e:2x2", shapes="largest")
    assert [r["program"] for r in rows] == [f"train[R=16,T={T},K={K}]", f"eval[R=16,T={T},K={K}]"]
    assert all(r["fits"] and r["est_step_seconds"] > 0 and r["packed_segments"] == K for r in rows)
    assert any("data.packing" in n for n in extra["notes"])
    batch = ahead.batch_shapes(s, 16, T, train=True)
    assert batch["segment_starts"].shape == batch["labels"].shape == batch["weights"].shape == (16, K)

    rng = np.random.default_rng(5)
    train, evl = rng.integers(3, 30, 200), rng.integers(3, 30, 40)
    records = epoch.estimate(_cfg(name), "v5e:2x2", train, evl, compile_=False)
    for strategy in ("bucketed", "packed"):
        progs = [r for r in records if r["record"] == "aot_epoch_program" and r["strategy"] == strategy]
        (summary,) = [r for r in records if r["record"] == "aot_epoch" and r["strategy"] == strategy]
        assert summary["compile_count"] == len(progs) == len({r["program"] for r in progs})
        for kind, total in (("train", "est_train_epoch_seconds"), ("eval", "est_eval_seconds")):
            mine = [r for r in progs if r["kind"] == kind]
            assert summary[total] == pytest.approx(sum(r["est_step_seconds"] * r["batches"] for r in mine))
        steps = len(train) // 16 if strategy == "bucketed" else packing.layout(  # v5e:2x2: 4 devices
            train, 16, max_length=T, max_segments=K, seed=0, multiple=4).steps
        assert summary["train_steps"] == steps and "estimate" in summary["estimate"]
    packed = [r for r in records if r.get("strategy") == "packed" and r["record"] == "aot_epoch"][0]
    assert (packed["train_programs"], packed["eval_programs"]) == (1, 1)

    real = tpu_specs.prepare  # main turns the persistent compile cache off: not in this shared test process
    monkeypatch.setattr(tpu_specs, "prepare", lambda compile_cache=True: real())
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(map(str, train)))
    assert aot_epoch.main(["--topology", "v5e:2x2", "--lengths", str(f), "--compile", "none", "--json", name,
                           "data.task=sst2", f"data.max_length={T}", "train.batch_size=16"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["record"] for r in out} == {"aot_epoch_program", "aot_epoch", "aot_epoch_ratio"}
    assert all(r["est_eval_seconds"] is None for r in out if r["record"] == "aot_epoch")  # no eval lengths given
    f.write_text("0\n")
    assert aot_epoch.main(["--topology", "v5e:2x2", "--lengths", str(f), name]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
