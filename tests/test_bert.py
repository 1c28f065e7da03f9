"""The Flax BERT on its own: parameter layout, padding, dropout, dtypes, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from spafit_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from spafit_jax.errors import ConfigError

CFG = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=40)


def init(model, T=9):
    return model.init(jax.random.key(0), jnp.ones((2, T), jnp.int32))["params"]


def batch(B=3, T=9, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, -3:] = 0
    types = np.zeros((B, T), np.int32)
    types[2, 5:] = 1
    return ids, mask, types


def test_parameter_tree_is_hugging_face_flax_layout():
    paths = set("/".join(k) for k in flatten_dict(init(BertForSequenceClassification(CFG, num_labels=3))))
    for p in ["bert/embeddings/word_embeddings/embedding", "bert/embeddings/LayerNorm/scale",
              "bert/encoder/layer/2/attention/self/query/kernel", "bert/encoder/layer/0/attention/output/dense/bias",
              "bert/encoder/layer/1/attention/output/LayerNorm/bias", "bert/encoder/layer/1/intermediate/dense/kernel",
              "bert/encoder/layer/1/output/dense/kernel", "bert/encoder/layer/1/output/LayerNorm/scale",
              "bert/pooler/dense/kernel", "classifier/kernel", "classifier/bias"]:
        assert p in paths, p
    assert len(paths) == 5 + 16 * 3 + 2 + 2
    assert not any("layer/3" in p for p in paths)


def test_padding_does_not_change_real_positions():
    model = BertModel(CFG)
    params = init(model)
    ids, mask, types = batch()
    h, _ = model.apply({"params": params}, ids, mask, types)
    # the same row, with its padding cut off, gives the same hidden states on its real tokens
    h_short, _ = model.apply({"params": params}, ids[1:2, :-3], mask[1:2, :-3], types[1:2, :-3])
    np.testing.assert_allclose(h[1, :-3], h_short[0], atol=1e-5)
    # and changing the padded tokens' ids changes nothing real
    ids2 = ids.copy()
    ids2[1, -3:] = 7
    h2, _ = model.apply({"params": params}, ids2, mask, types)
    np.testing.assert_allclose(h[1, :-3], h2[1, :-3], atol=1e-6)


def test_token_type_ids_matter():
    model = BertModel(CFG)
    params = init(model)
    ids, mask, types = batch()
    a, _ = model.apply({"params": params}, ids, mask, types)
    b, _ = model.apply({"params": params}, ids, mask, np.zeros_like(types))
    assert np.abs(np.asarray(a[2]) - np.asarray(b[2])).max() > 1e-3
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_dropout_only_when_not_deterministic():
    model = BertForSequenceClassification(CFG, num_labels=2)
    params = init(model)
    ids, mask, types = batch()
    d1 = model.apply({"params": params}, ids, mask, types, deterministic=True)
    d2 = model.apply({"params": params}, ids, mask, types, deterministic=True)
    np.testing.assert_array_equal(d1, d2)
    s1 = model.apply({"params": params}, ids, mask, types, deterministic=False, rngs={"dropout": jax.random.key(1)})
    s2 = model.apply({"params": params}, ids, mask, types, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(s1) - np.asarray(s2)).max() > 1e-4


def test_regression_head_has_one_output():
    model = BertForSequenceClassification(CFG, num_labels=1)
    out = model.apply({"params": init(model)}, *batch())
    assert out.shape == (3, 1) and out.dtype == jnp.float32


# bfloat16 keeps ~3 significant digits; logits of a small random BERT stay within this of float32.
BF16_ATOL = 2e-2


def test_bfloat16_compute_is_close_to_float32():
    f32 = BertForSequenceClassification(CFG, num_labels=3)
    bf16 = BertForSequenceClassification(CFG, jnp.bfloat16, num_labels=3)
    params = init(f32)
    a = f32.apply({"params": params}, *batch())
    b = bf16.apply({"params": params}, *batch())
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, params))
    assert b.dtype == jnp.float32  # logits come back in float32
    np.testing.assert_allclose(a, b, atol=BF16_ATOL)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0  # it really computed in bfloat16


def test_parameter_dtype_is_separate():
    model = BertForSequenceClassification(CFG, param_dtype=jnp.bfloat16, num_labels=2)
    params = init(model)
    assert params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"].dtype == jnp.bfloat16


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="hidden_act"):
        BertConfig(hidden_act="mish")
    with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)


def test_dropout_drops_at_the_rate_and_keeps_the_mean():
    from spafit_jax.models.bert import Dropout

    x = jnp.ones((64, 1001))
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.1) < 0.005 and abs(float(jnp.mean(y)) - 1.0) < 0.01
    np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True), x)
    assert float(jnp.abs(Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})).max()) == 0
