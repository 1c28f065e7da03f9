"""PEFT export of trained norm scales: ModernBERT has no biases, so SPAFIT trains its layers' norm scales where
biases would train; `--format peft` carries each trained norm module as a whole copy (`modules_to_save`)."""

import copy
import json
import warnings

import numpy as np
import pytest

from spafit_jax.models import hf, peft_io
from spafit_jax.errors import ConfigError
from tests.test_modernbert import ATOL, batch, torch_mb  # noqa: F401 (module fixture: a tiny random ModernBERT)
from tests.test_predict import data_dir, torch_base_dir  # noqa: F401 (session fixtures: csv files, a tiny BERT)

TRAINED = [f"model.layers.{i}.{n}" for i in (1, 2, 3) for n in ("attn_norm", "mlp_norm")]  # strata 2 and 3


def argv(st, data_dir, *extra):  # noqa: F811
    return [f"model.name={st}", "data.task=local", f"data.train_file={data_dir}/train.csv",
            f"data.eval_file={data_dir}/eval.csv", "data.text_column=premise", "data.text_pair_column=hypothesis",
            "data.max_length=32", "train.batch_size=8", "train.eval_batch_size=8", "train.max_steps=3",
            "train.lr=0.05", "train.warmup_ratio=0", "method.name=spafit", "method.n1=1", "method.n2=2",
            "method.lora_targets=[attention_output,intermediate,output]", *extra]


@pytest.mark.reference
def test_peft_export_of_norm_scales_loads_in_peft_with_our_logits(torch_mb, data_dir, tmp_path, capsys):  # noqa: F811
    """SPAFIT (1, 2) with LoRA on ModernBERT's whole modules: the PEFT export names the six trained norms by their
    full module names (layer 0's mlp_norm, the final and embedding norms stay out), PEFT wraps exactly those, and
    PeftModel gives our logits and the hf export's; our own adapter import reads the copies back."""
    import torch
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    from spafit_jax import export as export_lib
    from spafit_jax.after_training import exporting
    from spafit_jax.after_training.run import load_run
    from spafit_jax.train import main

    st, _, tmodel = torch_mb
    work, out = tmp_path / "run", tmp_path / "peft"
    assert main(argv(st, data_dir, "--workdir", str(work))) == 0
    capsys.readouterr()
    assert export_lib.main(["--workdir", str(work), "--out", str(out), "--format", "peft"]) == 0

    cfg = json.loads((out / peft_io.PEFT_CONFIG).read_text())
    assert cfg["bias"] == "none" and sorted(cfg["modules_to_save"]) == sorted(["head", "classifier", *TRAINED])
    state = load_file(str(out / peft_io.PEFT_WEIGHTS))
    base = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    for module in TRAINED:  # as PEFT saves a modules_to_save copy: the module's own names, no adapter token
        trained = state[f"base_model.model.{module}.weight"]
        assert np.abs(trained - base[f"{module}.weight"]).max() > 1e-4  # the scales did train
    assert not [k for k in state if "layers.0." in k or "final_norm" in k or "embeddings" in k]

    ids, mask = batch(tmodel.config.vocab_size, tmodel.config.pad_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(copy.deepcopy(tmodel), str(out)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == {"head", "classifier", *TRAINED}  # no untrained norm matched by PEFT's suffix rule
    with torch.no_grad():
        theirs = peft(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    run = load_run(work)
    ours = np.asarray(run.model.apply({"params": run.params}, ids, mask))
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
    with torch.no_grad():  # the norm copies matter: with the base scales back in them, the logits move
        for module in TRAINED:
            peft.get_submodule(f"base_model.model.{module}").modules_to_save["default"].weight.copy_(
                torch.tensor(base[f"{module}.weight"]))
        reset = peft(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(reset - theirs).max() > 1e-3

    exporting.export(run, tmp_path / "hf", "hf")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_allclose(merged.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy(),
                                   theirs, atol=ATOL)
    model, params = hf.load_pretrained(st, num_labels=3, adapter=out)  # and back: the norm copies import
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask), ours, atol=ATOL)
    np.testing.assert_array_equal(params["model"]["encoder"]["layer"]["3"]["attn_norm"]["scale"],
                                  run.params["model"]["encoder"]["layer"]["3"]["attn_norm"]["scale"])


@pytest.mark.reference
@pytest.mark.parametrize("extra, match", [
    (["method.name=full"], "trains no LoRA adapters"),  # whole weight matrices
    (["method.lora_targets=[query,value]"], "slices of ModernBERT's fused attn.Wqkv"),
])
def test_plans_peft_cannot_carry_are_refused_in_one_line(torch_mb, data_dir, extra, match):  # noqa: F811
    from spafit_jax.config import files as config_lib
    from spafit_jax.training import loading
    from spafit_jax.models.peft_io import peft_parts

    plan = loading.plan_of_shapes(config_lib.load_config([], argv(torch_mb[0], data_dir, *extra)))
    with pytest.raises(ConfigError, match=match) as e:
        peft_parts(plan, "modernbert")
    assert "\n" not in str(e.value) and "--format hf" in str(e.value)


def test_peft_norms_name_each_trained_norm_module_from_the_root():
    """BERT with train_layernorm: both LayerNorms of each trained layer, by full name (BERT's `output.LayerNorm`
    suffix would also match `attention.output.LayerNorm`)."""
    import jax
    import jax.numpy as jnp

    from spafit_jax import masking
    from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
    from spafit_jax.models.peft_io import peft_norms
    from spafit_jax.lora import LoRAConfig

    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=8,
                     max_position_embeddings=16)
    model = BertForSequenceClassification(cfg, lora=LoRAConfig(rank=2, layers=(2,)), num_labels=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]

    class Plan:  # what peft_norms reads of a Plan
        labels = masking.spafit_labels(shapes, 1, 2, train_layernorm=True)

    assert sorted(peft_norms(Plan, "bert").values()) == [
        f"bert.encoder.layer.{i}.{m}LayerNorm" for i in (1, 2) for m in ("attention.output.", "output.")]


@pytest.mark.reference
def test_bert_with_trained_layernorms_exports_to_peft_with_our_outputs(torch_base_dir, data_dir, tmp_path):  # noqa: F811
    """BERT's SPAFIT with train_layernorm: both LayerNorms (scale and bias) of each trained layer go whole into
    modules_to_save beside bias="all"; PeftModel on the base gives our probabilities."""
    from spafit_jax.after_training.exporting import export
    from spafit_jax.after_training.run import load_run
    from tests.conftest import TINY
    from tests.test_export import eval_texts, peft_model, torch_outputs
    from tests.test_predict import train

    run = load_run(train(torch_base_dir, data_dir, tmp_path / "run", "spafit", True, False, "method.train_layernorm=true"))
    export(run, tmp_path / "peft", "peft")
    cfg = json.loads((tmp_path / "peft" / peft_io.PEFT_CONFIG).read_text())
    norms = [f"bert.encoder.layer.{i}.{m}LayerNorm" for i in range(1, TINY["num_hidden_layers"])
             for m in ("attention.output.", "output.")]
    assert cfg["bias"] == "all" and sorted(cfg["modules_to_save"]) == sorted(["classifier", "pooler", *norms])
    texts, pairs = eval_texts(data_dir)
    ref = peft_model(torch_base_dir, tmp_path / "peft", run.spec.num_labels)
    theirs = torch_outputs(ref, run.tokenizer, texts, pairs)
    np.testing.assert_allclose(run.predict(texts, pairs, batch_size=5), theirs, atol=ATOL)
