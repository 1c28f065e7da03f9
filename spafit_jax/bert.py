"""BERT in flax.linen, with the parameter tree of Hugging Face's Flax BERT.

Layers are unrolled and named "0" .. "L-1" (`bert/encoder/layer/7/attention/self/query/kernel`),
so a parameter's path names its layer. `dtype` is the compute dtype; parameters stay in
`param_dtype`. Optional LoRA adapters (see `lora.py`) sit beside the kernels they adapt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from spafit_jax.errors import ConfigError
from spafit_jax.lora import LoRA, LoRAConfig

ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BertConfig that the encoder uses (defaults: bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Keeps the known keys of a config.json dict and ignores the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and (v is not None or k == "classifier_dropout")})


class Dropout(nn.Module):
    """Inverted dropout drawing 16-bit uniforms: half the threefry work of `nn.Dropout` (32 bits per element).

    An element is dropped when its 16-bit draw is below round(rate * 65536), so the drop
    probability is `rate` to within 2**-17; kept elements are scaled by the exact inverse of the
    keep probability. Leading dimensions are kept as they are, so a batch-sharded input draws
    batch-sharded bits.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        cut = round(self.rate * 65536)
        *lead, last = x.shape
        words = jax.random.bits(self.make_rng("dropout"), (*lead, (last + 1) // 2), jnp.uint32)
        draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
        keep = draws >= jnp.uint16(cut)
        return jnp.where(keep, x * jnp.asarray(65536 / (65536 - cut), x.dtype), jnp.zeros_like(x))


class _Module(nn.Module):
    """Shared attributes of every BERT module; `layer` is the index of the enclosing layer."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoRAConfig | None = None
    layer: int = -1

    def child(self, cls, name: str, **kw):
        """A submodule that inherits config, dtypes, LoRA settings and layer index."""
        return cls(self.config, self.dtype, self.param_dtype, self.lora, self.layer, name=name, **kw)

    def dense(self, features: int, name: str, x, deterministic: bool, target: str | None = None):
        """Applies a Dense named `name`; LoRA-wrapped when the LoRA config targets `target` here."""
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range),
        )
        if self.lora is None or target is None or not self.lora.wraps(self.layer, target):
            return nn.Dense(features, name=name, **kw)(x)
        cfg = self.lora
        base = nn.Dense(features, parent=None, **kw)
        rank = cfg.rank_for(self.layer, target)
        wrapped = LoRA(base, rank, cfg.alpha, cfg.dropout, cfg.rslora, self.dtype, self.param_dtype, name=name)
        return wrapped(x, deterministic)

    def layer_norm(self, name: str):
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )


class BertEmbeddings(_Module):
    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT, deterministic: bool):
        c = self.config
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, c.hidden_size, embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        positions_T = jnp.arange(input_ids_BxT.shape[-1])
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids_BxT)
            + embed(c.max_position_embeddings, "position_embeddings")(positions_T)[None]
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids_BxT)
        )
        x = self.layer_norm("LayerNorm")(x)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _SelfAttention(_Module):
    """`self/{query,key,value}`: scaled dot-product attention over a padding mask."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1x1xT, deterministic: bool):
        c = self.config
        H = c.num_attention_heads
        B, T, D = x_BxTxD.shape
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            self.dense(D, name, x_BxTxD, deterministic, target=name).reshape(B, T, H, D // H)
            for name in ("query", "key", "value")
        )
        q_BxTxHxK = q_BxTxHxK / jnp.sqrt(D // H).astype(q_BxTxHxK.dtype)
        scores_BxHxTxT = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxTxHxK)
        scores_BxHxTxT = scores_BxHxTxT.astype(jnp.float32) + mask_bias_Bx1x1xT
        probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(self.dtype)
        probs_BxHxTxT = Dropout(c.attention_probs_dropout_prob)(probs_BxHxTxT, deterministic=deterministic)
        ctx_BxTxHxK = jnp.einsum("bhqt,bthk->bqhk", probs_BxHxTxT, v_BxTxHxK)
        return ctx_BxTxHxK.reshape(B, T, D)


class _Output(_Module):
    """`dense` + dropout + residual + `LayerNorm`, as HF's attention/output and output blocks."""

    target: str = "output"

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        y = self.dense(residual.shape[-1], "dense", x, deterministic, target=self.target)
        y = Dropout(self.config.hidden_dropout_prob)(y, deterministic=deterministic)
        return self.layer_norm("LayerNorm")(y + residual)


class _Attention(_Module):
    """`attention/self/...` and `attention/output/...`."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1x1xT, deterministic: bool):
        ctx_BxTxD = self.child(_SelfAttention, "self")(x_BxTxD, mask_bias_Bx1x1xT, deterministic)
        return self.child(_Output, "output", target="attention_output")(ctx_BxTxD, x_BxTxD, deterministic)


class _Intermediate(_Module):
    @nn.compact
    def __call__(self, x, deterministic: bool):
        y = self.dense(self.config.intermediate_size, "dense", x, deterministic, target="intermediate")
        return ACTIVATIONS[self.config.hidden_act](y)


class BertLayer(_Module):
    """One encoder layer: self-attention block, then the feed-forward block."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1x1xT, deterministic: bool):
        h_BxTxD = self.child(_Attention, "attention")(x_BxTxD, mask_bias_Bx1x1xT, deterministic)
        inter_BxTxF = self.child(_Intermediate, "intermediate")(h_BxTxD, deterministic)
        return self.child(_Output, "output", target="output")(inter_BxTxF, h_BxTxD, deterministic)


class _Encoder(_Module):
    """`encoder/layer/<i>` for i in 0 .. L-1, unrolled."""

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        layers = _Layers(self.config, self.dtype, self.param_dtype, self.lora, name="layer")
        return layers(x, mask_bias, deterministic)


class _Layers(_Module):
    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
        for i in range(self.config.num_hidden_layers):
            layer = BertLayer(self.config, self.dtype, self.param_dtype, self.lora, i, name=str(i))
            x = layer(x, mask_bias, deterministic)
        return x


class BertModel(_Module):
    """Embeddings, L unrolled encoder layers and the pooler; returns (last_hidden_BxTxD, pooled_BxD)."""

    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.child(BertEmbeddings, "embeddings")(input_ids, token_type_ids, deterministic)
        mask_bias_Bx1x1xT = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        if self.lora is not None:
            self.lora.validate(c.num_hidden_layers)
        x = self.child(_Encoder, "encoder")(x, mask_bias_Bx1x1xT, deterministic)
        pooled = None
        if self.add_pooling_layer:
            pooled = jnp.tanh(self.child(_Pooler, "pooler")(x[:, 0], deterministic))
        return x, pooled


class _Pooler(_Module):
    @nn.compact
    def __call__(self, cls_BxD, deterministic: bool):
        return self.dense(self.config.hidden_size, "dense", cls_BxD, deterministic)


class BertForSequenceClassification(_Module):
    """BERT + dropout + `classifier`; logits [B, num_labels] (num_labels == 1: a regressor)."""

    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c = self.config
        _, pooled = self.child(BertModel, "bert")(input_ids, attention_mask, token_type_ids, deterministic)
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        pooled = Dropout(rate)(pooled, deterministic=deterministic)
        logits = self.dense(self.num_labels, "classifier", pooled, deterministic)
        return logits.astype(jnp.float32)
