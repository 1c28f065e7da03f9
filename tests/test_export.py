"""Exports checked against PyTorch transformers and PEFT, and PEFT adapters imported."""

import csv
import json

import numpy as np
import pytest

from spafit_jax.models import hf, peft_io
from spafit_jax.errors import ConfigError, LoadError
from spafit_jax.after_training.exporting import export
from spafit_jax.export import main
from spafit_jax.after_training.run import load_run
from tests.test_predict import data_dir, torch_base_dir, trained  # noqa: F401 (session fixtures)

ATOL = 1e-5


def eval_texts(data_dir, regression=False):  # noqa: F811 (fixtures)
    rows = list(csv.DictReader(open(data_dir / f"eval{'_reg' if regression else ''}.csv")))
    return [r["premise"] for r in rows], [r["hypothesis"] for r in rows]


def torch_outputs(model, tokenizer, texts, pairs):
    """Probabilities (softmax) or scores of a PyTorch sequence classifier on padded batches."""
    import torch

    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**enc).logits
    return logits[:, 0].numpy() if logits.shape[1] == 1 else torch.softmax(logits, -1).numpy()


def peft_model(base_dir, adapter_dir, num_labels):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    return PeftModel.from_pretrained(base, str(adapter_dir))


@pytest.mark.reference
@pytest.mark.parametrize("name", ["spafit_pairs", "lora_single", "bitfit_pairs", "full_single", "spafit_regression",
                                  "minilm_spafit_pairs"])
def test_predict_equals_torch_on_hf_export_and_peft_on_peft_export(name, trained, data_dir, tmp_path):  # noqa: F811 (fixtures)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = load_run(trained(name))
    texts, pairs = eval_texts(data_dir, run.spec.is_regression)
    pairs = pairs if run.spec.text_b else None
    ours = run.predict(texts, pairs, batch_size=5)
    if not run.spec.is_regression:  # not saturated, so the comparisons below can see a difference
        assert ((ours > 0.02) & (ours < 0.98)).mean() > 0.5, ours

    export(run, tmp_path / "hf", "hf")
    model, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    if run.spec.is_regression:
        assert model.config.problem_type == "regression" and model.config.num_labels == 1
    else:
        assert model.config.id2label[1] == run.spec.label_names[1]
    theirs = torch_outputs(model, tok, texts, pairs)
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
    diffs = {"hf": float(np.abs(ours - theirs).max())}

    if run.plan.method.name in ("bitfit", "full"):
        with pytest.raises(ConfigError, match="--format hf"):
            export(run, tmp_path / "peft", "peft")
    else:
        export(run, tmp_path / "peft", "peft")
        cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        base_dir = hf.resolve(run.config.model.name).resolve()
        assert cfg["base_model_name_or_path"] == str(base_dir)
        ref = peft_model(base_dir, tmp_path / "peft", run.spec.num_labels)
        theirs = torch_outputs(ref, tok, texts, pairs)
        np.testing.assert_allclose(ours, theirs, atol=ATOL)
        diffs["peft"] = float(np.abs(ours - theirs).max())
        with ref.disable_adapter():  # the adapter matters
            assert np.abs(torch_outputs(ref, tok, texts, pairs) - theirs).max() > 1e-3

    export(run, tmp_path / "flax", "flax")
    model, params = hf.load_pretrained(tmp_path / "flax", num_labels=run.spec.num_labels)
    logits = np.asarray(model.apply({"params": params}, *[np.asarray(tok(texts, pairs, padding=True)[k])
                                                           for k in ("input_ids", "attention_mask", "token_type_ids")]))
    flax_out = logits[:, 0] if run.spec.is_regression else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(ours, flax_out, atol=ATOL)
    print(name, diffs)


@pytest.mark.reference
def test_peft_trained_adapter_imports_with_peft_logits_and_round_trips(torch_base_dir, tmp_path):  # noqa: F811 (fixtures)
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    from spafit_jax.models.peft_io import to_peft_config
    from tests.test_hf import inputs, torch_run

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(str(torch_base_dir), num_labels=3)
    ref = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                                          layers_to_transform=[1, 2], rank_pattern={r"layer\.2\.attention\.self\.value": 2},
                                          use_rslora=True, bias="all"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # non-zero B, trained biases and head
    ref.save_pretrained(tmp_path / "adapter")
    model, params = hf.load_pretrained(torch_base_dir, num_labels=3, adapter=tmp_path / "adapter")
    ids, mask, types = inputs(vocab=1000)
    ours = np.asarray(model.apply({"params": params}, ids, mask, types))
    theirs = torch_run(ref.eval(), ids, mask, types).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
    print("import max abs diff", float(np.abs(ours - theirs).max()))
    lora = model.lora
    assert lora.layers == (1, 2) and lora.rslora and lora.targets == ("query", "value", "intermediate")
    assert lora.rank_for(2, "value") == 2 and lora.rank_for(1, "value") == 4
    # round trip: our export of the imported tree has PEFT's adapter tensors
    cfg = to_peft_config(lora, 3, base_model="b", modules_to_save=["classifier"], bias="all")
    assert cfg["layers_to_transform"] == [1, 2] and cfg["use_rslora"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    ours_state = peft_io.peft_state(params, lambda p: False)
    lora_keys = {k for k in saved if ".lora_" in k}
    assert set(ours_state) == lora_keys
    for k in lora_keys:
        np.testing.assert_array_equal(ours_state[k], saved[k].astype(np.float32), err_msg=k)


@pytest.mark.parametrize("change,match", [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"), ({"use_dora": True}, "use_dora"),
    ({"target_modules": ["word_embeddings"]}, "target_modules"),
    ({"target_modules": ["query", "word_embeddings"]}, r"target_modules \['word_embeddings'\]"),
])
def test_unsupported_peft_features_are_one_line(change, match):
    from spafit_jax.models.peft_io import from_peft_config

    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"], **change}
    with pytest.raises(ConfigError, match=match):
        from_peft_config(raw, 3)


def test_peft_folder_where_a_model_is_expected(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "bert-x"}))
    with pytest.raises(LoadError, match="PEFT adapter folder.*bert-x.*adapter="):
        hf.load_pretrained(tmp_path, num_labels=2)


def test_export_cli_refuses_peft_for_bitfit_in_one_line(trained, tmp_path, capsys):  # noqa: F811 (fixtures)
    workdir = trained("bitfit_pairs")
    capsys.readouterr()
    assert main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--format", "peft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--format hf" in err
