"""BERT-family encoders in flax.linen, with the parameter trees of Hugging Face's Flax models.

One set of layer modules serves every family of `families.FAMILIES` (bert, roberta, xlm-roberta,
electra, distilbert); `config.model_type` picks the family's names, embeddings and head. Layers
are unrolled and named "0" .. "L-1" (`bert/encoder/layer/7/attention/self/query/kernel`,
`distilbert/transformer/layer/7/attention/q_lin/kernel`), so a parameter's path names its layer.
`dtype` is the compute dtype; parameters stay in `param_dtype`. Optional LoRA adapters (see
`lora.py`) sit beside the kernels they adapt; LoRA targets keep their abstract names (`query`
is DistilBERT's `q_lin`).

Packed rows (sequence packing, issue 29): `model.apply(vars, input_ids, attention_mask, token_type_ids,
deterministic, segment_starts=starts_BxK)` reads `attention_mask` as segment ids (1 .. K, 0 on
padding), attends only within a segment (`segments.attention_bias`), restarts positions at each segment
(`segments.segment_positions`; RoBERTa / XLM-R at pad_token_id + 1), pools each segment's first token
(`segments.first_tokens`) and returns logits [B, K, num_labels]. `segment_starts=None` is the unpacked model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.models import families
from spafit_jax.errors import ConfigError
from spafit_jax.lora import LoRA, LoRAConfig
from spafit_jax.models.segments import attention_bias, check_packed, first_tokens, segment_positions

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
    """The fields of a Hugging Face config that the encoder uses (defaults: bert-base).

    Other families use the same names (`families.config_fields` translates DistilBERT's);
    `embedding_size` is ELECTRA's (None: the hidden size), `sinusoidal_pos_embds` DistilBERT's.
    """

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
    model_type: str = "bert"
    embedding_size: int | None = None
    sinusoidal_pos_embds: bool = False

    def __post_init__(self):
        if self.model_type not in families.FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; use one of {families.SUPPORTED}")
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

    @property
    def family(self) -> families.Family:
        return families.FAMILIES[self.model_type]

    @property
    def max_tokens(self) -> int:
        """The longest input the position table holds (RoBERTa: max_position_embeddings - pad_token_id - 1)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.family.position_offset else 0)


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


class EncoderModule(nn.Module):
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


def _sinusoidal_init(key, shape, dtype=jnp.float32):
    """DistilBERT's fixed position table: sin on even, cos on odd features."""
    n_pos, dim = shape
    angles = np.arange(n_pos)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None]
    return jnp.asarray(np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles)), dtype)


def position_ids(input_ids_BxT, config: BertConfig, segment_ids_BxT=None):
    """0, 1, ... T-1; RoBERTa's: pad_token_id + 1, + 2, ... over real tokens, pad_token_id on padding.
    Packed (`segment_ids_BxT` given): restarting at each segment (`segment_positions`), RoBERTa's
    again from pad_token_id + 1, with padding (segment id 0) at pad_token_id."""
    if segment_ids_BxT is not None:
        within_BxT = segment_positions(segment_ids_BxT)
        if not config.family.position_offset:
            return within_BxT
        return jnp.where(segment_ids_BxT > 0, within_BxT + config.pad_token_id + 1, config.pad_token_id)
    if not config.family.position_offset:
        return jnp.arange(input_ids_BxT.shape[-1])[None]
    real_BxT = (input_ids_BxT != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real_BxT, axis=-1) * real_BxT + config.pad_token_id


class BertEmbeddings(EncoderModule):
    """Word + position (+ token type) embeddings of size `embedding_size or hidden_size`, LayerNorm, dropout."""

    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT, deterministic: bool, segment_ids_BxT=None):
        c = self.config
        embed = lambda n, name, init=nn.initializers.normal(c.initializer_range): nn.Embed(  # noqa: E731
            n, c.embedding_size or c.hidden_size, embedding_init=init,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        positions = embed(c.max_position_embeddings, "position_embeddings",
                          *([_sinusoidal_init] if c.sinusoidal_pos_embds else []))(
            position_ids(input_ids_BxT, c, segment_ids_BxT))
        if c.sinusoidal_pos_embds:  # fixed, as in transformers
            positions = jax.lax.stop_gradient(positions)
        x = embed(c.vocab_size, "word_embeddings")(input_ids_BxT) + positions
        if c.family.token_types:  # with one type (RoBERTa) every token is type 0
            types_BxT = token_type_ids_BxT if c.type_vocab_size > 1 else jnp.zeros_like(token_type_ids_BxT)
            x = x + embed(c.type_vocab_size, "token_type_embeddings")(types_BxT)
        x = self.layer_norm("LayerNorm")(x)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _SelfAttention(EncoderModule):
    """`self/{query,key,value}` (DistilBERT: `attention/{q_lin,k_lin,v_lin}` and `out_lin`):
    scaled dot-product attention over a padding mask, then the `out` projection if it is named."""

    names: tuple[str, str, str] = ("query", "key", "value")
    out: str | None = None

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1xQxT, deterministic: bool):
        c = self.config
        H = c.num_attention_heads
        B, T, D = x_BxTxD.shape
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            self.dense(D, name, x_BxTxD, deterministic, target=target).reshape(B, T, H, D // H)
            for name, target in zip(self.names, ("query", "key", "value"))
        )
        q_BxTxHxK = q_BxTxHxK / jnp.sqrt(D // H).astype(q_BxTxHxK.dtype)
        scores_BxHxTxT = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxTxHxK)
        scores_BxHxTxT = scores_BxHxTxT.astype(jnp.float32) + mask_bias_Bx1xQxT
        probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(self.dtype)
        probs_BxHxTxT = Dropout(c.attention_probs_dropout_prob)(probs_BxHxTxT, deterministic=deterministic)
        ctx_BxTxD = jnp.einsum("bhqt,bthk->bqhk", probs_BxHxTxT, v_BxTxHxK).reshape(B, T, D)
        if self.out is None:
            return ctx_BxTxD
        return self.dense(D, self.out, ctx_BxTxD, deterministic, target="attention_output")


class BertOutput(EncoderModule):
    """`dense` + dropout + residual + `LayerNorm`, as HF's attention/output and output blocks."""

    target: str = "output"

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        y = self.dense(residual.shape[-1], "dense", x, deterministic, target=self.target)
        y = Dropout(self.config.hidden_dropout_prob)(y, deterministic=deterministic)
        return self.layer_norm("LayerNorm")(y + residual)


class _Attention(EncoderModule):
    """`attention/self/...` and `attention/output/...`."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1xQxT, deterministic: bool):
        ctx_BxTxD = self.child(_SelfAttention, "self")(x_BxTxD, mask_bias_Bx1xQxT, deterministic)
        return self.child(BertOutput, "output", target="attention_output")(ctx_BxTxD, x_BxTxD, deterministic)


class BertIntermediate(EncoderModule):
    @nn.compact
    def __call__(self, x, deterministic: bool):
        y = self.dense(self.config.intermediate_size, "dense", x, deterministic, target="intermediate")
        return ACTIVATIONS[self.config.hidden_act](y)


class BertLayer(EncoderModule):
    """One encoder layer: self-attention block, then the feed-forward block."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1xQxT, deterministic: bool):
        h_BxTxD = self.child(_Attention, "attention")(x_BxTxD, mask_bias_Bx1xQxT, deterministic)
        inter_BxTxF = self.child(BertIntermediate, "intermediate")(h_BxTxD, deterministic)
        return self.child(BertOutput, "output", target="output")(inter_BxTxF, h_BxTxD, deterministic)


class _FFN(EncoderModule):
    """DistilBERT's `ffn/{lin1,lin2}`: lin1, activation, lin2, dropout."""

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        c = self.config
        y = self.dense(c.intermediate_size, "lin1", x_BxTxD, deterministic, target="intermediate")
        y = self.dense(c.hidden_size, "lin2", ACTIVATIONS[c.hidden_act](y), deterministic, target="output")
        return Dropout(c.hidden_dropout_prob)(y, deterministic=deterministic)


class DistilBertLayer(EncoderModule):
    """DistilBERT's TransformerBlock: the same computation as `BertLayer` under its own names."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias_Bx1xQxT, deterministic: bool):
        attention = self.child(_SelfAttention, "attention", names=("q_lin", "k_lin", "v_lin"), out="out_lin")
        h_BxTxD = self.layer_norm("sa_layer_norm")(attention(x_BxTxD, mask_bias_Bx1xQxT, deterministic) + x_BxTxD)
        return self.layer_norm("output_layer_norm")(self.child(_FFN, "ffn")(h_BxTxD, deterministic) + h_BxTxD)


LAYERS = {"bert": BertLayer, "distilbert": DistilBertLayer}


class _Encoder(EncoderModule):
    """`encoder/layer/<i>` (DistilBERT: `transformer/layer/<i>`) for i in 0 .. L-1, unrolled."""

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool, start: int = 0, stop: int | None = None):
        layers = _Layers(self.config, self.dtype, self.param_dtype, self.lora, name="layer")
        return layers(x, mask_bias, deterministic, start, stop)


class _Layers(EncoderModule):
    """Layers start .. stop-1 (default: all of them)."""

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool, start: int = 0, stop: int | None = None):
        for i in range(start, self.config.num_hidden_layers if stop is None else stop):
            layer = LAYERS[self.config.family.layer](self.config, self.dtype, self.param_dtype, self.lora, i, name=str(i))
            x = layer(x, mask_bias, deterministic)
        return x


class BertModel(EncoderModule):
    """Embeddings, L unrolled layers and (BERT) the pooler; returns (last_hidden_BxTxD, pooled_BxD or None).

    ELECTRA projects embeddings of `embedding_size` to the hidden size (`embeddings_project`).
    A part of the model runs alone (the frozen-stratum cache, `frozen.py`): `stop=n` returns
    (hidden states after layer n-1, None); `hidden_BxTxD` given with `start=n` replaces the
    embeddings and layers 0 .. n-1 by those hidden states. `segment_starts` [B, K] given: packed
    rows (the module docstring); pooled is then [B, K, D].
    """

    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 hidden_BxTxD=None, start: int = 0, stop: int | None = None, segment_starts=None):
        c = self.config
        packed = check_packed(segment_starts, input_ids if hidden_BxTxD is None else hidden_BxTxD, attention_mask)
        if hidden_BxTxD is None:
            if attention_mask is None:
                attention_mask = jnp.ones_like(input_ids)
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = self.child(BertEmbeddings, "embeddings")(input_ids, token_type_ids, deterministic,
                                                         attention_mask if packed else None)
            if c.embedding_size not in (None, c.hidden_size):
                x = self.dense(c.hidden_size, "embeddings_project", x, deterministic)
        else:
            x = hidden_BxTxD.astype(self.dtype)
            if attention_mask is None:
                attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        mask_bias_Bx1xQxT = attention_bias(attention_mask, packed)
        if self.lora is not None:
            self.lora.validate(c.num_hidden_layers)
        x = self.child(_Encoder, c.family.encoder)(x, mask_bias_Bx1xQxT, deterministic, start, stop)
        if stop is not None:
            return x, None
        pooled = None
        if self.add_pooling_layer and c.family.head == "pooler":
            pooled = jnp.tanh(self.child(_Pooler, "pooler")(first_tokens(x, segment_starts), deterministic))
        return x, pooled


class _Pooler(EncoderModule):
    @nn.compact
    def __call__(self, cls_BxD, deterministic: bool):
        return self.dense(self.config.hidden_size, "dense", cls_BxD, deterministic)


class _ClassificationHead(EncoderModule):
    """RoBERTa's / ELECTRA's `classifier/{dense,out_proj}` on the first token: dropout, dense, tanh
    (ELECTRA: exact gelu), dropout, out_proj."""

    num_labels: int = 2
    rate: float = 0.0

    @nn.compact
    def __call__(self, first_BxD, deterministic: bool):
        act = jnp.tanh if self.config.family.head == "tanh" else ACTIVATIONS["gelu"]
        x = Dropout(self.rate)(first_BxD, deterministic=deterministic)
        x = act(self.dense(self.config.hidden_size, "dense", x, deterministic))
        x = Dropout(self.rate)(x, deterministic=deterministic)
        return self.dense(self.num_labels, "out_proj", x, deterministic)


class SplitAtLayer:
    """`lower` and `upper`: a sequence classifier cut at layer n1 (the frozen-stratum cache, `frozen.py`), the same
    in every family (a mixin of each family's ForSequenceClassification, whose __call__ takes these arguments)."""

    def lower(self, input_ids, attention_mask=None, token_type_ids=None, *, n1: int, segment_starts=None):
        """Hidden states [B, T, D] after the embeddings and layers 0 .. n1-1, without dropout
        (packed rows when `segment_starts` is given)."""
        return self(input_ids, attention_mask, token_type_ids, True, stop=n1, segment_starts=segment_starts)

    def upper(self, hidden_BxTxD, attention_mask=None, token_type_ids=None, deterministic: bool = True, *,
              n1: int, segment_starts=None, **unused):
        """Logits [B, num_labels] (packed: [B, K, num_labels]) from the hidden states that enter layer n1
        (`lower`'s output): layers n1 .. L-1, the pooler and the head; `token_type_ids` are not needed
        past the embeddings."""
        return self(None, attention_mask, None, deterministic, hidden_BxTxD, start=n1, segment_starts=segment_starts)


class BertForSequenceClassification(EncoderModule, SplitAtLayer):
    """An encoder of `config.model_type` under its prefix (`bert`, `roberta`, ...) and the family's
    head; logits [B, num_labels] (num_labels == 1: a regressor); packed (`segment_starts` [B, K]
    given), logits [B, K, num_labels] of each segment's first token.

    Heads: BERT pooler -> dropout -> `classifier`; RoBERTa / ELECTRA `classifier/dense` -> tanh /
    gelu -> `classifier/out_proj` on the first token; DistilBERT `pre_classifier` -> ReLU ->
    dropout -> `classifier` on the first token.
    """

    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 hidden_BxTxD=None, start: int = 0, stop: int | None = None, segment_starts=None):
        c, head = self.config, self.config.family.head
        x, pooled = self.child(BertModel, c.family.prefix)(input_ids, attention_mask, token_type_ids, deterministic,
                                                           hidden_BxTxD, start, stop, segment_starts)
        if stop is not None:
            return x
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        first = first_tokens(x, segment_starts)
        if head in ("tanh", "gelu"):
            logits = self.child(_ClassificationHead, "classifier", num_labels=self.num_labels, rate=rate)(
                first, deterministic)
            return logits.astype(jnp.float32)
        if head == "pre_classifier":
            pooled = jax.nn.relu(self.dense(c.hidden_size, "pre_classifier", first, deterministic))
        pooled = Dropout(rate)(pooled, deterministic=deterministic)
        logits = self.dense(self.num_labels, "classifier", pooled, deterministic)
        return logits.astype(jnp.float32)



#: the same class serves every family; this name reads better outside BERT.
EncoderForSequenceClassification = BertForSequenceClassification
