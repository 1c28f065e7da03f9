"""ModernBERT checked against PyTorch transformers and PEFT on a tiny random model the tests save.

The model (4 layers: global, local, local, global; a local window of 8 tokens) reads sequences of
20 tokens with padding, so the sliding window and the padding mask both matter.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from spafit_jax.models import families, hf, peft_io, weights
from spafit_jax import masking
from spafit_jax import lora as lora_lib
from spafit_jax.errors import ConfigError, MaskingError
from spafit_jax.lora import LoRAConfig
from spafit_jax.methods import LORA_TARGETS
from spafit_jax.models.modernbert import ModernBertConfig, ModernBertModel
from tests import peers
from tests.test_predict import data_dir  # noqa: F401 (session fixture: small csv files)

ATOL = 1e-5
SIZES = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64, local_attention=8, num_labels=3, classifier_pooling="mean")


def make_tokenizer(folder):
    """A byte-level BPE tokenizer as ModernBERT's (tokenizer.json; [CLS] a [SEP] b [SEP]) saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "the market film vote match phone rose fell won lost new old big small good bad team bank game " * 3
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="module")
def torch_mb(tmp_path_factory):
    """(safetensors folder, .bin folder, the PyTorch model): a tiny random ModernBertForSequenceClassification."""
    torch = pytest.importorskip("torch")
    import transformers

    st, bin_ = tmp_path_factory.mktemp("mb_safetensors"), tmp_path_factory.mktemp("mb_bin")
    tok = make_tokenizer(st)
    make_tokenizer(bin_)
    cfg = transformers.ModernBertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                        attn_implementation="eager", **SIZES)
    torch.manual_seed(0)
    model = transformers.ModernBertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # norm scales off one, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(st)
    model.config.save_pretrained(bin_)  # transformers 5 saves safetensors only: the legacy file by hand
    torch.save(model.state_dict(), bin_ / "pytorch_model.bin")
    return st, bin_, model


def batch(vocab, pad, B=3, T=20, seed=0):
    """ids [B, T] with rows of 20, 13 and 5 real tokens (padding with `pad`), and the mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (B, T))
    mask = (np.arange(T)[None] < np.array([T, 13, 5])[:B, None]).astype(np.int64)
    return np.where(mask > 0, ids, pad), mask


def torch_out(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)


@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_logits_and_hidden_states_match_torch_with_padding_past_the_local_window(torch_mb, fmt):
    st, bin_, tmodel = torch_mb
    model, params = hf.load_pretrained(st if fmt == "safetensors" else bin_, num_labels=3)
    assert model.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    ids, mask = batch(model.config.vocab_size, model.config.pad_token_id)
    ref = torch_out(tmodel, ids, mask)
    real = mask[..., None]
    for pooling in ("mean", "cls"):
        tmodel.config.classifier_pooling = pooling
        ref = torch_out(tmodel, ids, mask)
        ours = model.clone(config=dataclasses.replace(model.config, classifier_pooling=pooling))
        np.testing.assert_allclose(ours.apply({"params": params}, ids, mask), ref.logits.numpy(), atol=ATOL)
    tmodel.config.classifier_pooling = "mean"
    if fmt == "bin":
        return
    for i in range(4):  # the embeddings' output, then each layer's (transformers' last is after the final norm)
        h = model.apply({"params": params}, ids, mask, stop=i)
        np.testing.assert_allclose(np.asarray(h) * real, ref.hidden_states[i].numpy() * real, atol=ATOL)
    last = ModernBertModel(model.config).apply({"params": params["model"]}, ids, mask)
    np.testing.assert_allclose(np.asarray(last) * real, ref.hidden_states[4].numpy() * real, atol=ATOL)
    # the name map is its own inverse: our tree back in transformers' names and shapes
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    back = weights.to_torch_names(params)
    assert set(back) == set(state)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])


@pytest.mark.reference
def test_masked_lm_and_base_checkpoints_load_with_a_fresh_classifier(torch_mb, tmp_path, caplog):
    """The hub's ModernBERT is a ModernBertForMaskedLM (model, head, decoder): the decoder is dropped, the head kept,
    the classifier initialised with a notice; a bare ModernBertModel (names without `model.`) loads its encoder."""
    import transformers

    _, _, tmodel = torch_mb
    mlm = transformers.ModernBertForMaskedLM(tmodel.config)
    mlm.model.load_state_dict(tmodel.model.state_dict())
    mlm.save_pretrained(tmp_path / "mlm")
    tmodel.model.save_pretrained(tmp_path / "base")
    for folder in ("mlm", "base"):
        caplog.clear()
        _, params = hf.load_pretrained(tmp_path / folder, num_labels=2)
        assert "unexpected" not in caplog.text and "classifier/kernel" in caplog.text
        assert ("head/dense/kernel" in caplog.text) == (folder == "base")
        np.testing.assert_array_equal(params["model"]["encoder"]["layer"]["3"]["mlp"]["Wo"]["kernel"],
                                      tmodel.model.layers[3].mlp.Wo.weight.detach().numpy().T)
    np.testing.assert_array_equal(params["model"]["encoder"]["layer"]["1"]["attn"]["Wqkv"]["key"]["kernel"],
                                  tmodel.model.layers[1].attn.Wqkv.weight.detach().numpy()[32:64].T)


def _lora_model(folder, lora):
    model, params = hf.load_pretrained(folder, num_labels=3, lora=lora)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    # B non-zero, so that the gradients of A are too
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(next(keys), x.shape) * 0.3 if p[-1].key == "lora_b" else x, params)
    return model, params


@pytest.mark.reference
def test_lora_gradients_match_peft_on_whole_modules_and_on_wqkv_slices(torch_mb, tmp_path):
    """attention_output / intermediate / output are PEFT's attn.Wo, mlp.Wi, mlp.Wo; query + value (slices of
    Wqkv) equal a PEFT Wqkv adapter of rank 2r whose B is block-diagonal: the gradients of A and of B's
    blocks are the same. Also the PEFT export of the whole-module adapter loads in PEFT with our logits."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import save_file

    st, _, tmodel = torch_mb
    r, layers = 4, (2, 3)
    lora = LoRAConfig(rank=r, alpha=8.0, targets=("query", "value", "attention_output", "intermediate", "output"),
                      layers=layers)
    model, params = _lora_model(st, lora)
    ids, mask = batch(model.config.vocab_size, model.config.pad_token_id)
    labels = np.array([0, 2, 1])

    whole = LoraConfig(r=r, lora_alpha=8, target_modules=["attn.Wo", "mlp.Wi", "mlp.Wo"], layers_to_transform=list(layers),
                       layers_pattern="layers")
    peft = get_peft_model(copy.deepcopy(tmodel), whole)
    qkv = LoraConfig(r=2 * r, lora_alpha=16, target_modules=["Wqkv"], layers_to_transform=list(layers),
                     layers_pattern="layers")
    peft.add_adapter("qkv", qkv)
    peft.base_model.set_adapter(["default", "qkv"])
    D = model.config.hidden_size
    ad, factors = lora_lib.adapters(params), {}
    for i in layers:
        ours = f"model/encoder/layer/{i}/"
        for mod in ("attn/Wo", "mlp/Wi", "mlp/Wo"):
            node = ad[ours + mod]
            factors[ours + mod] = (f"base_model.model.model.layers.{i}.{mod.replace('/', '.')}", "default",
                                   node["lora_a"], node["lora_b"])
        query, value = ad[ours + "attn/Wqkv/query"], ad[ours + "attn/Wqkv/value"]
        a = np.concatenate([query["lora_a"], value["lora_a"]], axis=1)  # D x 2r
        b = np.zeros((2 * r, 3 * D), np.float32)
        b[:r, :D], b[r:, 2 * D:] = query["lora_b"], value["lora_b"]
        factors[i] = (f"base_model.model.model.layers.{i}.attn.Wqkv", "qkv", a, b)
    out = peers.peft_lora_grads(peft, factors, dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)),
                                labels)
    theirs = {k: g for k, g in out[2].items() if isinstance(k, str)}
    for i in layers:  # the Wqkv adapter's gradients: query's and value's A columns and diagonal blocks of B
        ga, gb = out[2][i]
        for j, (t, cols) in enumerate((("query", slice(0, D)), ("value", slice(2 * D, 3 * D)))):
            theirs[f"model/encoder/layer/{i}/attn/Wqkv/{t}"] = ga[:, j * r:(j + 1) * r], gb[j * r:(j + 1) * r, cols]
    peers.assert_same(peers.our_lora_grads(model, params, labels, ids, mask), (out[0], out[1], theirs))

    # PEFT export: the whole-module adapters load in PEFT with our logits; the Wqkv slices are refused in one line
    with pytest.raises(ConfigError, match="slices of ModernBERT's fused attn.Wqkv"):
        peft_io.to_peft_config(lora, 4, base_model=str(st), modules_to_save=["head", "classifier"], bias="none",
                                model_type="modernbert")

    only = dataclasses.replace(lora, targets=("attention_output", "intermediate", "output"))
    model = model.clone(lora=only)
    for i in layers:  # the same tree without the Wqkv adapters
        for t in ("query", "value"):
            params["model"]["encoder"]["layer"][str(i)]["attn"]["Wqkv"][t] = {
                "kernel": params["model"]["encoder"]["layer"][str(i)]["attn"]["Wqkv"][t]["kernel"]}
    config = peft_io.to_peft_config(only, 4, base_model=str(st), modules_to_save=["head", "classifier"], bias="none",
                                     model_type="modernbert")
    (tmp_path / peft_io.PEFT_CONFIG).write_text(json.dumps(config))
    head = ("head/", "classifier/")
    save_file(peft_io.peft_state(params, lambda p: p.startswith(head)), str(tmp_path / peft_io.PEFT_WEIGHTS))
    loaded = PeftModel.from_pretrained(copy.deepcopy(tmodel), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask), theirs, atol=ATOL)
    # and back: the adapter folder imports onto the base with the same logits
    model2, params2 = hf.load_pretrained(st, num_labels=3, adapter=tmp_path)
    np.testing.assert_allclose(model2.apply({"params": params2}, ids, mask), theirs, atol=ATOL)


def test_config_of_transformers_4_and_bad_settings_are_one_line():
    raw = {"model_type": "modernbert", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 5,
           "global_rope_theta": 1000.0, "local_rope_theta": 50.0, "global_attn_every_n_layers": 2,
           "hidden_activation": "gelu_pytorch_tanh", "norm_eps": 1e-6}
    cfg = ModernBertConfig.from_dict(families.config_fields(raw))
    assert cfg.layer_types == ("full_attention", "sliding_attention") * 2 + ("full_attention",)
    assert (cfg.global_rope_theta, cfg.local_rope_theta, cfg.hidden_act, cfg.layer_norm_eps) == \
        (1000.0, 50.0, "gelu_pytorch_tanh", 1e-6)
    new = dict(raw, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 7.0}})
    assert ModernBertConfig.from_dict(families.config_fields(new)).global_rope_theta == 7.0
    for bad, match in ((dict(rope_parameters={"full_attention": {"rope_type": "yarn"}}), "rope"),
                       (dict(classifier_pooling="max"), "classifier_pooling"),
                       (dict(layer_types=["full_attention"]), "layer_types")):
        with pytest.raises(ConfigError, match=match):
            ModernBertConfig.from_dict(families.config_fields(dict(raw, **bad)))


def test_bias_free_model_trains_norm_scales_in_place_of_biases():
    """ModernBERT has no biases: SPAFIT's stratum 2 trains the norm scales of its layers (stratum 3: LoRA + them),
    bitfit all layer norm scales; a stratum with nothing to train is an error, not a silent no-op."""
    from spafit_jax.models.modernbert import ModernBertForSequenceClassification

    cfg = ModernBertConfig(vocab_size=50, **{k: v for k, v in SIZES.items() if k != "num_labels"})
    lora = LoRAConfig(rank=2, targets=("query", "value"), layers=(2, 3))
    def shapes_of(cfg):
        model = ModernBertForSequenceClassification(cfg, lora=lora, num_labels=3)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]

    biased = shapes_of(dataclasses.replace(cfg, attention_bias=True))  # with biases: BitFit's letter
    assert not masking.bias_free(biased)
    assert {v for k, v in flatten_dict(masking.spafit_labels(biased, 1, 2), sep="/").items()
            if "/layer/1/" in k} == {"frozen", "bias"}
    shapes = shapes_of(cfg)
    fam = families.FAMILIES["modernbert"]  # every LoRA target has its module in the tree
    assert list(fam.modules) == list(LORA_TARGETS)
    assert {f"{fam.layers}/2/{m}/lora_a" for m in ("attn/Wqkv/query", "attn/Wqkv/value")} <= \
        set(flatten_dict(shapes, sep="/"))
    assert {f"{fam.layers}/0/{m}/kernel" for m in fam.modules.values()} <= set(flatten_dict(shapes, sep="/"))
    assert masking.bias_free(shapes)  # the classifier's own bias does not count
    flat = flatten_dict(masking.spafit_labels(shapes, 1, 2), sep="/")
    trained = {p: label for p, label in flat.items() if label != "frozen"}
    assert {p for p, label in trained.items() if label == "layernorm"} == {
        f"model/encoder/layer/{i}/{n}/scale" for i in (1, 2, 3) for n in ("attn_norm", "mlp_norm")}
    assert {label for p, label in trained.items() if "/layer/" in p and "/layer/1/" not in p} == {"lora", "layernorm"}
    flat = flatten_dict(masking.spafit_labels(shapes, 1, 2, stratum3_bias=False), sep="/")
    assert {k for k, v in flat.items() if v == "layernorm"} == {"model/encoder/layer/1/attn_norm/scale",
                                                                          "model/encoder/layer/1/mlp_norm/scale"}
    bitfit = jax.tree.leaves(masking.method_labels(shapes, "bitfit"))
    assert bitfit.count("layernorm") == 7 and "bias" not in bitfit  # layer 0 has no attn_norm
    no_norms = jax.tree_util.tree_map_with_path(lambda p, x: x, shapes)
    for i in range(4):
        layer = no_norms["model"]["encoder"]["layer"][str(i)]
        layer.pop("attn_norm", None), layer.pop("mlp_norm")
    with pytest.raises(MaskingError, match=r"stratum 2 \(layers 1..1\) has no bias or norm scale"):
        masking.spafit_labels(no_norms, 1, 2)


@pytest.mark.reference
def test_spafit_command_line_run_then_predict_equals_transformers_on_the_hf_export(torch_mb, data_dir, tmp_path,  # noqa: F811
                                                                                  capsys):
    """A short SPAFIT run of the training command (frozen-stratum cache on), its summary and results.json naming
    the norm scales standing in for biases; predict = transformers on the hf export; the PEFT export (its LoRA
    on Wqkv slices) refused in one line, writing nothing (norm scales alone it carries: tests/test_peft_norms.py)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from spafit_jax.after_training import exporting
    from spafit_jax.after_training.run import load_run
    from spafit_jax.train import main

    st = torch_mb[0]
    work = tmp_path / "run"
    argv = [f"model.name={st}", "data.task=local", f"data.train_file={data_dir}/train.csv",
            f"data.eval_file={data_dir}/eval.csv", "data.text_column=premise", "data.text_pair_column=hypothesis",
            "data.max_length=32", "train.batch_size=8", "train.eval_batch_size=8", "train.max_steps=3",
            "train.lr=0.05", "train.warmup_ratio=0", "method.name=spafit", "method.n1=1", "method.n2=2",
            "method.lora_targets=[query,value,output]", "train.cache_frozen=true", "--workdir", str(work)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "norm scale-only 1..1, LoRA + norm scale 2..3" in out and "no biases" in out
    from spafit_jax.config import files as config_lib
    from spafit_jax.training import loading

    kinds = ["frozen", "norm scale only", "LoRA + norm scale", "LoRA + norm scale"]  # the strata picture's rows
    assert loading.plan_of_shapes(config_lib.load_config([], argv[:-2])).layer_kinds() == kinds
    res = json.loads((work / "results.json").read_text())
    assert res["layer_kinds"] == kinds
    assert res["bias_stand_in"] == "layernorm" and "bias" not in res["params_by_label"]
    assert {"layernorm", "lora", "head"} <= set(res["params_by_label"])

    run = load_run(work)
    texts = ["the market rose", "a good film won the vote and the bank fell " * 2, "team"]
    pairs = ["new phone", "old game lost", "big small bad"]
    ours = run.logits(texts, pairs, batch_size=2)
    exporting.export(run, tmp_path / "hf", "hf")
    tmodel, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True,
                                                                      attn_implementation="eager")
    assert not any(info.values()), info
    enc = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(texts, pairs, padding=True, truncation=True,
                                                               max_length=32, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 8  # longer than the local window
    with torch.no_grad():
        theirs = tmodel.eval()(**enc).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
    exporting.export(run, tmp_path / "flax", "flax")  # our own format: config.json in ModernBERT's names
    assert json.loads((tmp_path / "flax" / "config.json").read_text())["norm_eps"] == 1e-5
    model, params = hf.load_pretrained(tmp_path / "flax", num_labels=3)
    ids, mask = batch(model.config.vocab_size, model.config.pad_token_id)
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask),
                               run.model.apply({"params": run.params}, ids, mask), atol=ATOL)
    with pytest.raises(ConfigError, match="slices of ModernBERT's fused attn.Wqkv"):  # query and value
        exporting.export(run, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()


def test_tokenizer_folder_reads_as_modernberts_cls_a_sep_b_sep(tmp_path):
    """ModernBERT's tokenizer is a fast tokenizer.json (no token types): our loader and encoder read it as it is."""
    from spafit_jax.data.tokens import Examples, encode

    made = make_tokenizer(tmp_path)
    tok = hf.load_tokenizer(tmp_path)
    want = made("the market rose", "new phone")["input_ids"]
    assert want[0] == tok.cls_token_id and want[-1] == tok.sep_token_id and want.count(tok.sep_token_id) == 2
    enc = encode(tok, Examples(["the market rose"], ["new phone"], np.zeros(1, np.int32)), max_length=16, cache=False)
    assert enc.input_ids[0, :len(want)].tolist() == want and enc.lengths.tolist() == [len(want)]
    assert (enc.input_ids[0, len(want):] == tok.pad_token_id).all() and not enc.token_type_ids.any()
