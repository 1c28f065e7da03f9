"""RoBERTa / XLM-RoBERTa, ELECTRA and DistilBERT: checked against PyTorch transformers and PEFT on
tiny random models, labelled by the SPAFIT plans, and trained for two steps on the CLI."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from spafit_jax.models import families
from spafit_jax import masking
from spafit_jax.models.bert import BertConfig, BertEmbeddings, BertForSequenceClassification, BertModel
from spafit_jax.errors import ConfigError, LoadError
from spafit_jax.models.hf import load_pretrained, read_config, save_pretrained
from spafit_jax.lora import LoRAConfig, adapters
from spafit_jax.models.peft_io import from_peft_config, to_peft_config
from spafit_jax.methods import LORA_TARGETS
from tests import peers

ATOL = 1e-5
VOCAB, NUM_LABELS, L = 30522, 3, 3  # MiniLM's vocabulary, so the training run can use its tokenizer
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=128)
FAMILIES = ("roberta", "xlm-roberta", "electra", "distilbert")
TOKENIZER = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def torch_config(family: str):
    """A tiny transformers config of `family`; ELECTRA with its own embedding size (a projection)."""
    import transformers as tf

    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=L, n_heads=4, hidden_dim=37,
                                   max_position_embeddings=128, num_labels=NUM_LABELS)
    if family == "electra":
        return tf.ElectraConfig(**SIZES, embedding_size=16, num_labels=NUM_LABELS)
    cls = tf.RobertaConfig if family == "roberta" else tf.XLMRobertaConfig
    return cls(**SIZES, type_vocab_size=1, pad_token_id=1, num_labels=NUM_LABELS)


def torch_model(family: str):
    """A random transformers AutoModelForSequenceClassification of `family`, every weight perturbed."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(torch_config(family)).eval()
    with torch.no_grad():  # transformers zero-initialises biases and ones LayerNorms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, minilm_dir):
    """{(family, fmt): (folder, torch model)}, built on first use; folders carry MiniLM's tokenizer.
    fmt "base": the base model alone (no head, names without the family prefix)."""
    cache = {}

    def get(family, fmt="safetensors"):
        if (family, fmt) not in cache:
            import torch

            model = torch_model(family)
            folder = tmp_path_factory.mktemp(f"{family}_{fmt}")
            (getattr(model, families.FAMILIES[family].prefix) if fmt == "base" else model).save_pretrained(folder)
            if fmt == "bin":  # transformers 5 saves safetensors only: write the legacy file by hand
                (folder / "model.safetensors").unlink()
                torch.save(model.state_dict(), folder / "pytorch_model.bin")
            for name in TOKENIZER:
                shutil.copy(minilm_dir / name, folder / name)
            cache[family, fmt] = folder, model
        return cache[family, fmt]

    return get


def inputs(config: BertConfig, B=3, T=11):
    """A batch with padding (the family's pad id) and, where the family has token types, a second segment."""
    rng = np.random.RandomState(0)
    ids = rng.randint(5, 120, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, -4:] = 0
    mask[2, -6:] = 0
    ids[mask == 0] = config.pad_token_id
    types = np.zeros((B, T), np.int32)
    if config.type_vocab_size > 1:
        types[2, 3:5] = 1
    return ids, mask, types


def torch_kw(family, ids, mask, types):
    import torch

    kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    if family != "distilbert":
        kw["token_type_ids"] = torch.tensor(types, dtype=torch.long)
    return kw


def shapes(family, lora=None):
    """The parameter tree (ShapeDtypeStructs, traced only) of a tiny model of `family`."""
    config = BertConfig(**dict(SIZES, vocab_size=120), model_type=family, embedding_size=16 if family == "electra" else None)
    model = BertForSequenceClassification(config, lora=lora, num_labels=2)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))


def masked(h, mask):
    return np.asarray(h) * mask[..., None]


@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_torch(saved, family, fmt):
    import torch

    folder, ref = saved(family, fmt)
    model, params = load_pretrained(folder, num_labels=NUM_LABELS)
    config, fam = model.config, families.FAMILIES[family]
    assert config.model_type == family and set(params) == {fam.prefix, *fam.heads}
    ids, mask, types = inputs(config)
    kw = torch_kw(family, ids, mask, types)
    with torch.no_grad():
        logits, hidden = ref(**kw).logits.numpy(), getattr(ref, fam.prefix)(**kw).last_hidden_state.numpy()
    ours = model.apply({"params": params}, ids, mask, types)
    diff = float(np.abs(ours - logits).max())
    np.testing.assert_allclose(ours, logits, atol=ATOL)
    h, pooled = BertModel(config).apply({"params": params[fam.prefix]}, ids, mask, types)
    assert pooled is None
    np.testing.assert_allclose(masked(h, mask), masked(hidden, mask), atol=ATOL)
    print(f"{family} {fmt}: max |logits diff| {diff:.2e}, hidden {float(np.abs(masked(h - hidden, mask)).max()):.2e}")


def test_parameter_trees_have_hugging_face_flax_names():
    names = {family: set(flatten_dict(shapes(family), sep="/")) for family in (*FAMILIES, "bert")}
    assert "roberta/encoder/layer/2/attention/self/query/kernel" in names["roberta"]
    assert {"classifier/dense/kernel", "classifier/out_proj/bias"} <= names["roberta"] & names["electra"]
    assert not any("pooler" in p or "token_type" in p for p in names["distilbert"])
    assert {"distilbert/transformer/layer/2/attention/q_lin/kernel", "distilbert/transformer/layer/2/ffn/lin2/bias",
            "distilbert/transformer/layer/0/sa_layer_norm/scale", "pre_classifier/kernel", "classifier/kernel",
            "distilbert/embeddings/position_embeddings/embedding"} <= names["distilbert"]
    assert {"electra/embeddings_project/kernel", "electra/embeddings/word_embeddings/embedding"} <= names["electra"]
    assert names["xlm-roberta"] == names["roberta"] and "bert/pooler/dense/kernel" in names["bert"]
    for family in names:  # every LoRA target has its module in every family bert.py builds, and it exists
        fam = families.FAMILIES[family]
        assert list(fam.modules) == list(LORA_TARGETS)
        assert {f"{fam.layers}/0/{m}/kernel" for m in fam.modules.values()} <= names[family]


@pytest.mark.reference
@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert"])
def test_lora_on_late_layers_matches_peft_logits_gradients_and_adapter_folder(saved, tmp_path, family):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    fam = families.FAMILIES[family]
    targets = LORA_TARGETS if family == "distilbert" else ("query", "key", "value", "attention_output", "intermediate")
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=targets, layers=(1, 2))
    folder, _ = saved(family)
    model, params = load_pretrained(folder, num_labels=NUM_LABELS, lora=cfg, seed=2)
    rng = np.random.RandomState(1)  # B is zero when fresh: give it values so A's gradient is not zero
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.1 * rng.randn(*x.shape).astype(x.dtype) if kp[-1].key == "lora_b" else x, params)
    ad = adapters(params)
    assert set(ad) == {f"{fam.layers}/{i}/{fam.modules[t]}" for i in (1, 2) for t in targets}

    ref = AutoModelForSequenceClassification.from_pretrained(str(folder))
    ref = get_peft_model(ref, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, layers_to_transform=[1, 2],
                                         target_modules=sorted({fam.modules[t].replace("/", ".") for t in targets})))
    ref.eval()
    wrapped = {n[: -len(".lora_A")] for n, _ in ref.named_modules() if n.endswith(".lora_A")}
    assert wrapped == {"base_model.model." + fam.peft_module(i, t) for i in (1, 2) for t in targets}
    ids, mask, types = inputs(model.config)
    logits, worst = peers.lora_matches_peft(ref, model, params, (ids, mask, types), torch_kw(family, ids, mask, types),
                                            np.array([0, 2, 1]))
    print(f"{family}: max |grad diff| {worst:.2e}")
    ref.save_pretrained(tmp_path)  # PEFT's adapter folder loads onto our model of the family
    imported, imported_params = load_pretrained(folder, num_labels=NUM_LABELS, adapter=tmp_path)
    assert imported.lora == cfg
    np.testing.assert_allclose(imported.apply({"params": imported_params}, ids, mask, types), logits, atol=ATOL)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_peft_config_names_the_family_modules(family):
    lora = LoRAConfig(rank=4, targets=("query", "output"), layers=(2,), rank_pattern={"^layer/2/output$": 2})
    raw = to_peft_config(lora, L, base_model="b", modules_to_save=["classifier"], bias="none", model_type=family)
    if family == "distilbert":  # lin2 is no suffix of another module: plain names with layers_to_transform
        assert raw["target_modules"] == ["attention.q_lin", "ffn.lin2"] and raw["layers_to_transform"] == [2]
    else:  # output.dense alone would also match attention.output.dense: a regex naming each module
        assert re.fullmatch(raw["target_modules"], "roberta.encoder.layer.2.output.dense")
        assert not re.fullmatch(raw["target_modules"], "roberta.encoder.layer.2.attention.output.dense")
    assert from_peft_config(raw, L, model_type=family) == lora


@pytest.mark.parametrize("family", FAMILIES)
def test_spafit_strata_and_head_per_family(family):
    fam = families.FAMILIES[family]
    tree = shapes(family, LoRAConfig(layers=(2,)))
    labels = flatten_dict(masking.method_labels(tree, "spafit", n1=1, n2=2), sep="/")
    heads = {p for p in labels if p.split("/")[0] in fam.heads}
    assert heads and all(labels[p] == masking.HEAD for p in heads)
    for path, label in labels.items():
        i = masking.layer_index(path)
        if path in heads:
            continue
        if i is None or i < 1:  # embeddings (and ELECTRA's projection) and layer 0: frozen
            assert label == masking.FROZEN, path
        elif path.endswith("/bias") and "norm" not in path.lower():
            assert label == masking.BIAS, path
        elif path.endswith(("lora_a", "lora_b")):
            assert i == 2 and label == masking.LORA, path
        else:
            assert label == masking.FROZEN, path
    assert not any(l == masking.POOLER for l in labels.values())
    assert sum(l == masking.LORA for l in labels.values()) == 4  # query and value of layer 2


@pytest.mark.reference
@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert"])
def test_flax_msgpack_round_trip(saved, tmp_path, family):
    folder, _ = saved(family)
    model, params = load_pretrained(folder, num_labels=NUM_LABELS)
    save_pretrained(tmp_path, model.config, params, num_labels=NUM_LABELS)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == family and raw["architectures"] == [families.FAMILIES[family].architecture]
    again, params2 = load_pretrained(tmp_path, num_labels=NUM_LABELS)
    assert again.config == model.config
    ids, mask, types = inputs(model.config)
    np.testing.assert_array_equal(again.apply({"params": params2}, ids, mask, types),
                                  model.apply({"params": params}, ids, mask, types))


def test_name_map_drops_pretraining_heads_and_unused_poolers():
    state = {"roberta.pooler.dense.weight": np.ones((2, 2)), "lm_head.dense.weight": np.ones((2, 2)),
             "roberta.encoder.layer.0.attention.output.LayerNorm.weight": np.ones(2),
             "classifier.out_proj.weight": np.ones((3, 2))}
    assert set(families.from_torch_names(state, "roberta")) == {
        "roberta/encoder/layer/0/attention/output/LayerNorm/scale", "classifier/out_proj/kernel"}
    bare = {"embeddings.word_embeddings.weight": np.ones((5, 2)), "transformer.layer.0.ffn.lin1.weight": np.ones((3, 2)),
            "transformer.layer.0.sa_layer_norm.weight": np.ones(2), "vocab_projector.bias": np.ones(5)}
    flat = families.from_torch_names(bare, "distilbert")
    assert set(flat) == {"distilbert/embeddings/word_embeddings/embedding", "distilbert/transformer/layer/0/ffn/lin1/kernel",
                         "distilbert/transformer/layer/0/sa_layer_norm/scale"}
    assert flat["distilbert/transformer/layer/0/ffn/lin1/kernel"].shape == (2, 3)
    assert set(families.with_prefix({"pre_classifier/kernel": 0, "transformer/layer/0/ffn/lin1/bias": 0}, "distilbert")) == {
        "pre_classifier/kernel", "distilbert/transformer/layer/0/ffn/lin1/bias"}
    assert families.family_of_names(["electra.embeddings.word_embeddings.weight"]).model_type == "electra"


def test_config_translation_and_unsupported_types(tmp_path):
    raw = {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 99,
           "activation": "relu", "dropout": 0.0, "attention_dropout": 0.2, "seq_classif_dropout": 0.3}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = read_config(tmp_path)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.hidden_act, c.classifier_dropout,
            c.attention_probs_dropout_prob) == (64, 2, 99, "relu", 0.3, 0.2)
    assert families.hf_config(c.__dict__)["dim"] == 64 and "hidden_size" not in families.hf_config(c.__dict__)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LoadError, match="bert, roberta, xlm-roberta, electra, distilbert") as e:
        read_config(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="distilbert"):
        BertConfig(model_type="albert")
    assert BertConfig(model_type="roberta", max_position_embeddings=514, pad_token_id=1).max_tokens == 512
    assert BertConfig(model_type="electra").max_tokens == 512


def test_sinusoidal_positions_are_distilberts_table_and_fixed():
    import importlib.util

    config = BertConfig(**dict(SIZES, vocab_size=120), model_type="distilbert", sinusoidal_pos_embds=True)
    embeddings, ids = BertEmbeddings(config), jnp.arange(8)[None] + 3
    params = embeddings.init(jax.random.key(0), ids, ids, True)["params"]
    table = np.asarray(params["position_embeddings"]["embedding"])
    pos, j = 5, 7
    assert math.isclose(table[pos, j], math.cos(pos / 10000 ** (2 * (j // 2) / 32)), abs_tol=1e-6)
    weights = jnp.arange(32.0)  # LayerNorm outputs sum to a constant: weigh the features
    grads = jax.grad(lambda p: (embeddings.apply({"params": p}, ids, ids, True) * weights).sum())(params)
    assert not np.any(grads["position_embeddings"]["embedding"]) and np.any(grads["word_embeddings"]["embedding"])
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        import torch
        from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

        ref = _create_sinusoidal_embeddings(128, 32, torch.empty(128, 32)).numpy()
        np.testing.assert_allclose(table, ref, atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_short_spafit_run_on_the_cli(saved, tmp_path, family):
    from spafit_jax.train import main

    folder, _ = saved(family, "base")  # BBC News has 5 classes: the head is the task's
    args = [f"model.name={folder}", "data.limit_train=16", "data.limit_eval=8", "data.max_length=32",
            "train.batch_size=8", "train.eval_batch_size=8", "method.n1=1", "method.n2=2", "train.max_steps=2",
            "train.log_every=2"]
    assert main(["--workdir", str(tmp_path), *args]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps"] == 2 and 0 < res["trainable_params"] < res["total_params"]
    assert all(math.isfinite(v) for v in res["eval"].values())
    print(family, {k: res[k] for k in ("train_seconds", "compile_seconds", "eval_seconds", "compiled_shapes")})
    if family in ("roberta", "distilbert"):  # heads unlike BERT's: exports load in transformers and PEFT
        peers.exports_match_ours(tmp_path, folder)
