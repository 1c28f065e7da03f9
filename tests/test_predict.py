"""Reloading a run (`load_run`), predicting, and `python -m spafit_jax.predict`, on tiny runs.

The runs here train a tiny random BERT saved by PyTorch transformers (so that PEFT and
transformers can load the same base in test_export) for a few steps on small local csv files.
"""

import csv
import io
import json
import shutil
import sys

import numpy as np
import pytest

from spafit_jax.config import files as config_lib
from spafit_jax.errors import CheckpointError, LoadError
from spafit_jax.predict import main
from spafit_jax.training.rundir import save_assets
from spafit_jax.after_training.run import TASK, TOKENIZER, load_run
from spafit_jax.training.trainer import train_and_evaluate
from tests.conftest import TINY

WORDS = "the a market film vote match phone rose fell won lost new old big small good bad team bank game".split()
CLASSES = ("contradiction", "entailment", "neutral")


def write_csv(path, n, seed, regression=False):
    rng = np.random.RandomState(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "label"])
        for i in range(n):
            a, b = (" ".join(rng.choice(WORDS, rng.randint(2, 14))) for _ in range(2))
            w.writerow([a, b, f"{rng.rand() * 5:.3f}" if regression else CLASSES[i % 3]])
    return path


@pytest.fixture(scope="session")
def torch_base_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT base (no head) saved by PyTorch transformers as model.safetensors, with MiniLM's tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    with torch.no_grad():  # non-zero biases, LayerNorms off one, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("torch_base")
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_csv(d / "train.csv", 48, 0), write_csv(d / "eval.csv", 12, 1)
    write_csv(d / "train_reg.csv", 48, 2, regression=True), write_csv(d / "eval_reg.csv", 12, 3, regression=True)
    return d


def train(base, data, workdir, method="spafit", pairs=True, regression=False, *extra):
    suffix = "_reg" if regression else ""
    overrides = [f"model.name={base}", "data.task=local", f"data.train_file={data}/train{suffix}.csv",
                 f"data.eval_file={data}/eval{suffix}.csv", "data.text_column=premise", "data.max_length=32",
                 "train.batch_size=8", "train.eval_batch_size=8", "train.max_steps=3", "train.lr=0.05",
                 "train.warmup_ratio=0", f"method.name={method}", "method.n1=1", "method.n2=2",
                 "method.lora_targets=[query,value,output]", "method.rank_pattern={'layer/2/value': 2}",
                 *extra]
    if pairs:
        overrides.append("data.text_pair_column=hypothesis")
    if regression:
        overrides.append("data.is_regression=true")
    train_and_evaluate(config_lib.load_config([], overrides), workdir)
    return workdir


RUNS = {  # name: (method, pairs, regression, base: the tiny torch BERT or the real MiniLM weights)
    "spafit_pairs": ("spafit", True, False, "tiny"), "lora_single": ("lora", False, False, "tiny"),
    "bitfit_pairs": ("bitfit", True, False, "tiny"), "full_single": ("full", False, False, "tiny"),
    "spafit_regression": ("spafit", False, True, "tiny"), "minilm_spafit_pairs": ("spafit", True, False, "minilm"),
}
EXTRA = {"minilm_spafit_pairs": ("train.lr=0.002",),  # real weights: a gentler step keeps the outputs unsaturated
         "lora_single": ("data.packing=false",)}  # trained with the bucketed batching: predict still packs


@pytest.fixture(scope="session")
def trained(torch_base_dir, minilm_dir, data_dir, tmp_path_factory):
    """run name -> its workdir, trained on first use (session-wide)."""
    done = {}

    def get(name):
        if name not in done:
            method, pairs, regression, base = RUNS[name]
            base = {"tiny": torch_base_dir, "minilm": minilm_dir}[base]
            done[name] = train(base, data_dir, tmp_path_factory.mktemp(name), method, pairs, regression,
                               *EXTRA.get(name, ()))
        return done[name]

    return get


def test_load_run_predicts_probabilities_equal_to_the_training_eval(trained, data_dir):
    workdir = trained("spafit_pairs")
    run = load_run(workdir)
    res = json.loads((workdir / "results.json").read_text())
    assert run.step == 3 == res["best"]["step"] and run.spec.label_names == CLASSES and run.spec.text_b == "hypothesis"
    rows = list(csv.DictReader(open(data_dir / "eval.csv")))
    probs = run.predict([r["premise"] for r in rows], [r["hypothesis"] for r in rows], batch_size=5)
    assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    acc = np.mean(probs.argmax(1) == np.array([CLASSES.index(r["label"]) for r in rows]))
    assert acc == pytest.approx(res["eval"]["accuracy"])  # the same model the trainer evaluated
    # batching does not change the numbers; the adapters and biases were trained
    one = run.predict([rows[0]["premise"]], [rows[0]["hypothesis"]])
    np.testing.assert_allclose(one[0], probs[0], atol=1e-6)
    assert np.abs(np.asarray(run.params["bert"]["encoder"]["layer"]["2"]["attention"]["self"]["query"]["lora_b"])).max() > 1e-3


def test_checkpoint_choice_and_errors(trained, tmp_path):
    workdir = trained("spafit_pairs")
    assert load_run(workdir, "last").step == 3 and load_run(workdir, 3).step == 3
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*found: \[3\]"):
        load_run(workdir, 7)
    with pytest.raises(LoadError, match="not a run folder"):
        load_run(tmp_path)


def test_a_run_without_assets_falls_back_to_the_base_tokenizer_and_the_data_config(trained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained("spafit_pairs"), workdir)
    for name in (TOKENIZER, TASK):
        p = workdir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    old = load_run(trained("spafit_pairs"))
    run = load_run(workdir)
    assert run.spec.label_names == CLASSES
    np.testing.assert_allclose(run.predict(["a market"], ["fell"]), old.predict(["a market"], ["fell"]), atol=1e-6)


def test_predict_packs_a_run_trained_unpacked_exactly_per_text(trained, data_dir):
    """Predict packs by default for every run whose model takes packed rows, also one trained with
    data.packing=false; the packed logits are the bucketed ones (`packed=False`) per text."""
    run = load_run(trained("lora_single"))
    assert run.config.data.packing is False and run.packs()
    texts = [r["premise"] for r in csv.DictReader(open(data_dir / "eval.csv"))] + ["a", "b c"]
    packed, plain = run.logits(texts, batch_size=5), run.logits(texts, batch_size=5, packed=False)
    np.testing.assert_allclose(packed, plain, rtol=0, atol=1e-5)
    assert np.abs(plain - plain.mean(0)).max() > 1e-4  # the texts' logits differ: the check is not vacuous
    calls = []
    run._packed_logits = lambda *a: calls.append(a) or plain  # which path `predict` takes by default
    run.predict(texts)
    assert len(calls) == 1
    run.predict(texts, packed=False)
    assert len(calls) == 1


def test_save_assets_writes_tokenizer_and_spec(trained, tmp_path):
    run = load_run(trained("spafit_pairs"))
    save_assets(tmp_path, run.tokenizer, run.spec)
    assert (tmp_path / TOKENIZER / "tokenizer.json").is_file()
    assert json.loads((tmp_path / TASK).read_text())["label_names"] == list(CLASSES)


def test_missing_base_is_one_line(trained, torch_base_dir, data_dir, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(trained("spafit_pairs"), workdir)
    text = (workdir / "config.yaml").read_text()
    (workdir / "config.yaml").write_text(text.replace(str(torch_base_dir), "/nonexistent/base"))
    capsys.readouterr()  # the training summary
    assert main(["--workdir", str(workdir), "--input", str(data_dir / "eval.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "base model" in err and "/nonexistent/base" in err


def test_cli_jsonl_csv_txt_and_stdin(trained, data_dir, tmp_path, monkeypatch, capsys):
    pairs = trained("spafit_pairs")
    out = tmp_path / "out.jsonl"
    # a GLUE-style test file: label -1 (or absent) does not matter
    rows = list(csv.DictReader(open(data_dir / "eval.csv")))
    with open(tmp_path / "test.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"premise": r["premise"], "hypothesis": r["hypothesis"], "label": -1}) + "\n")
    assert main(["--workdir", str(pairs), "--input", str(tmp_path / "test.jsonl"), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    probs = load_run(pairs).predict([r["premise"] for r in rows], [r["hypothesis"] for r in rows])
    assert len(records) == 12 and [r["label_id"] for r in records] == list(probs.argmax(1))
    assert records[0]["label"] in CLASSES
    np.testing.assert_allclose([r["probabilities"] for r in records], probs, atol=1e-6)
    assert main(["--workdir", str(pairs), "--input", str(data_dir / "eval.csv"), "--output", str(tmp_path / "o.csv")]) == 0
    back = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert [int(r["label_id"]) for r in back] == list(probs.argmax(1))

    single = trained("lora_single")
    capsys.readouterr()  # the training summary
    (tmp_path / "in.txt").write_text("the market fell\na good film\n")
    assert main(["--workdir", str(single), "--input", str(tmp_path / "in.txt")]) == 0
    from_file = capsys.readouterr().out.splitlines()
    monkeypatch.setattr(sys, "stdin", io.StringIO("the market fell\na good film\n"))
    assert main(["--workdir", str(single), "--input", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == from_file and len(from_file) == 2


def test_cli_regression_scores(trained, data_dir, capsys):
    workdir = trained("spafit_regression")
    capsys.readouterr()  # the training summary
    assert main(["--workdir", str(workdir), "--input", str(data_dir / "eval_reg.csv")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 12 and set(records[0]) == {"score"}
    rows = list(csv.DictReader(open(data_dir / "eval_reg.csv")))
    np.testing.assert_allclose([r["score"] for r in records], load_run(workdir).predict([r["premise"] for r in rows]),
                               atol=1e-6)


@pytest.mark.parametrize("content,args,match", [
    ("premise,other\nx,y\n", [], r"in\.csv: no column 'hypothesis' .*--text-pair-column"),
    ("premise,hypothesis\n", [], r"in\.csv: (no rows|has a header \(premise, hypothesis\) but no rows)"),
    ("premise,hypothesis\nx,y\n,z\n", [], r"in\.csv row 2: empty text in column 'premise'"),
    ("premise,other\nx,y\n", ["--text-pair-column", "other"], None),
])
def test_cli_bad_input_is_one_line(trained, tmp_path, capsys, content, args, match):
    import re

    (tmp_path / "in.csv").write_text(content)
    workdir = trained("spafit_pairs")
    capsys.readouterr()
    rc = main(["--workdir", str(workdir), "--input", str(tmp_path / "in.csv"), *args])
    err = capsys.readouterr().err.strip()
    if match is None:
        assert rc == 0
        return
    assert rc == 2 and "\n" not in err and re.search(match, err), err
