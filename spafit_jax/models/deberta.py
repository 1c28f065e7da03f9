"""DeBERTa-v2 / DeBERTa-v3 encoders in flax.linen, computing what transformers' DebertaV2 classes compute.

`microsoft/deberta-v3-base` / `-large` and `deberta-v2-xlarge` / `-xxlarge` (their convolution after layer 0): disentangled
self-attention, whose scores add to content->content the content->position (c2p) and
position->content (p2c) terms over relative-position embeddings (log buckets with
`position_buckets`, `max_relative_positions`), with the position projections shared with the
content ones (`share_att_key`) or their own (`pos_key_proj`, `pos_query_proj`), the relative
embeddings LayerNorm-ed (`norm_rel_ebd`), optional absolute positions (`position_biased_input`) and
token types (`type_vocab_size` > 0), and DebertaV2ForSequenceClassification's head: the context
pooler (`pooler/dense` on the first token, `pooler_hidden_act`) then `classifier`.

The parameter tree keeps transformers' module names (there never was a Flax DeBERTa):
`deberta/encoder/layer/7/attention/self/query_proj/kernel`, `deberta/encoder/rel_embeddings/embedding`,
`pooler/dense/kernel`, `classifier/kernel`. LoRA targets keep our names (`families` maps them):
query -> attention/self/query_proj, key -> key_proj, value -> value_proj, attention_output ->
attention/output/dense, intermediate -> intermediate/dense, output -> output/dense. With
`share_att_key` the adapted query/key projections also project the relative embeddings, as PEFT's
wrapped modules do. The model has `BertForSequenceClassification`'s interface (`lower`, `upper`).

Packed rows (`segment_starts` [B, K] given; see `bert`): attention within segments (`segments.segment_mask`),
absolute positions restarting per segment (`segments.segment_positions`), the convolution reading only its
own segment's tokens, the pooler on each segment's first token: logits [B, K, num_labels]. Relative
positions need nothing: a query and a key of one segment are as far apart as in the unpacked example.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.models.bert import (
    ACTIVATIONS, BertConfig, BertIntermediate, BertOutput, Dropout, EncoderModule, SplitAtLayer,
)
from spafit_jax.models.segments import check_packed, first_tokens, segment_mask, segment_positions
from spafit_jax.errors import ConfigError
from spafit_jax.lora import LoRA

POS_ATT_TYPES = ("c2p", "p2c")
CONV_ACTIVATIONS = dict(ACTIVATIONS, tanh=jnp.tanh)


@dataclasses.dataclass(frozen=True)
class DebertaConfig(BertConfig):
    """The fields of transformers' DebertaV2Config the encoder uses; defaults are DebertaV2Config's
    (and, for the keys it reads with getattr, transformers' fallbacks), so a config.json that omits a
    default means what it means in transformers. `classifier_dropout` is config.json's `cls_dropout`."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    model_type: str = "deberta-v2"
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    position_biased_input: bool = True
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    attention_head_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        kinds = self.pos_att_type
        kinds = () if kinds is None else kinds.lower().split("|") if isinstance(kinds, str) else kinds
        object.__setattr__(self, "pos_att_type", tuple(str(k).strip() for k in kinds))
        if bad := [k for k in self.pos_att_type if k not in POS_ATT_TYPES]:
            raise ConfigError(f"pos_att_type {bad} is not supported; DeBERTa-v2/v3 use {' and '.join(POS_ATT_TYPES)}")
        if self.conv_kernel_size and self.conv_act not in CONV_ACTIVATIONS:
            raise ConfigError(f"conv_act {self.conv_act!r} is not supported; use one of {', '.join(CONV_ACTIVATIONS)}")
        if self.conv_kernel_size and self.hidden_size % self.conv_groups:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of conv_groups {self.conv_groups}")
        if self.attention_head_size not in (None, self.hidden_size // self.num_attention_heads):
            raise ConfigError(f"attention_head_size={self.attention_head_size} is not hidden_size / "
                              "num_attention_heads; spafit_jax's DeBERTa needs the two equal")
        if self.pooler_hidden_size not in (None, self.hidden_size):
            raise ConfigError(f"pooler_hidden_size={self.pooler_hidden_size} differs from hidden_size "
                              f"{self.hidden_size}, which transformers' classifier cannot take; remove it")
        if self.pooler_hidden_act not in ACTIVATIONS:
            raise ConfigError(f"pooler_hidden_act {self.pooler_hidden_act!r} is not supported; use one of "
                              f"{', '.join(ACTIVATIONS)}")

    @property
    def rel_norm(self) -> bool:
        """Whether the relative embeddings pass through the encoder's LayerNorm (norm_rel_ebd 'layer_norm')."""
        return "layer_norm" in [x.strip() for x in self.norm_rel_ebd.lower().split("|")]

    @property
    def max_relative(self) -> int:
        """max_relative_positions, or max_position_embeddings when it is below 1 (transformers' rule)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """Half the number of relative-position embeddings: position_buckets if set, else max_relative."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative


def log_bucket_position(relative_pos: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' make_log_bucket_position in float32: distances below bucket_size/2 as they are,
    longer ones on a log scale up to max_position."""
    sign = np.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = np.where((relative_pos < mid) & (relative_pos > -mid), mid - 1, np.abs(relative_pos))
    ratio = abs_pos.astype(np.float32) / np.float32(mid)
    log_pos = np.ceil(np.log(ratio) / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, relative_pos.astype(np.float32), log_pos * sign).astype(np.int64)


def relative_positions(length: int, config: DebertaConfig) -> np.ndarray:
    """[T, T] int: (bucketed) query position minus key position, a constant of the sequence length."""
    ids = np.arange(length)
    rel = ids[:, None] - ids[None, :]
    if config.position_buckets > 0 and config.max_relative > 0:
        rel = log_bucket_position(rel, config.position_buckets, config.max_relative)
    return rel.astype(np.int64)


class _Deberta(EncoderModule):
    """`EncoderModule` with Linear layers that can be applied more than once (shared query/key projections)."""

    def linear(self, features: int, name: str, target: str | None = None, use_bias: bool = True):
        """A callable (x, deterministic) -> y for the Dense `name`, LoRA-wrapped when `target` is adapted here."""
        kw = dict(use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.normal(self.config.initializer_range))
        cfg = self.lora
        if cfg is None or target is None or not cfg.wraps(self.layer, target):
            dense = nn.Dense(features, name=name, **kw)
            return lambda x, deterministic: dense(x)
        base = nn.Dense(features, parent=None, **kw)
        return LoRA(base, cfg.rank_for(self.layer, target), cfg.alpha, cfg.dropout, cfg.rslora, self.dtype,
                    self.param_dtype, name=name)


class DebertaEmbeddings(_Deberta):
    """Word (+ absolute position) (+ token type) embeddings, `embed_proj` when embedding_size differs,
    LayerNorm, zeroed at padding, dropout; packed, positions restart per segment."""

    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT, mask_BxT, deterministic: bool, packed: bool = False):
        c = self.config
        size = c.embedding_size or c.hidden_size
        embed = lambda n, name: nn.Embed(n, size, embedding_init=nn.initializers.normal(c.initializer_range),  # noqa: E731
                                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = embed(c.vocab_size, "word_embeddings")(input_ids_BxT)
        if c.position_biased_input:
            pos = segment_positions(mask_BxT) if packed else jnp.arange(input_ids_BxT.shape[-1])[None]
            x = x + embed(c.max_position_embeddings, "position_embeddings")(pos)
        if c.type_vocab_size > 0:
            x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids_BxT)
        if size != c.hidden_size:
            x = self.linear(c.hidden_size, "embed_proj", use_bias=False)(x, deterministic)
        x = self.layer_norm("LayerNorm")(x) * (mask_BxT > 0)[..., None].astype(x.dtype)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _DisentangledSelfAttention(_Deberta):
    """`self/{query,key,value}_proj` (+ `pos_key_proj` / `pos_query_proj` without share_att_key):
    content->content + c2p + p2c scores, each scaled by sqrt(head_size * (1 + number of terms))."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb_SxD, deterministic: bool):
        c = self.config
        B, T, D = x_BxTxD.shape
        H, K = c.num_attention_heads, D // c.num_attention_heads
        heads = lambda y: y.reshape(*y.shape[:-1], H, K)  # noqa: E731
        q_proj, k_proj = self.linear(D, "query_proj", "query"), self.linear(D, "key_proj", "key")
        q_BxTxHxK, k_BxTxHxK = heads(q_proj(x_BxTxD, deterministic)), heads(k_proj(x_BxTxD, deterministic))
        v_BxTxHxK = heads(self.linear(D, "value_proj", "value")(x_BxTxD, deterministic))
        scale_factor = 1 + sum(k in c.pos_att_type for k in POS_ATT_TYPES)
        scale = jnp.sqrt(jnp.float32(K) * scale_factor)
        scores_BxHxTxT = jnp.einsum("bqhk,bthk->bhqt", q_BxTxHxK, k_BxTxHxK / scale.astype(k_BxTxHxK.dtype))
        if c.relative_attention:
            rel_emb_SxD = Dropout(c.hidden_dropout_prob)(rel_emb_SxD, deterministic=deterministic)
            span = c.att_span
            if c.share_att_key:
                pos_q, pos_k = q_proj, k_proj
            else:
                pos_k = self.linear(D, "pos_key_proj") if "c2p" in c.pos_att_type else None
                pos_q = self.linear(D, "pos_query_proj") if "p2c" in c.pos_att_type else None
            if "c2p" in c.pos_att_type:  # content of the query, position of the key
                pos_k_SxHxK = heads(pos_k(rel_emb_SxD, deterministic))
                c2p_BxHxTxS = jnp.einsum("bqhk,shk->bhqs", q_BxTxHxK, pos_k_SxHxK)
                idx_TxT = np.clip(rel_TxT + span, 0, 2 * span - 1)
                c2p = jnp.take_along_axis(c2p_BxHxTxS, jnp.broadcast_to(idx_TxT, (B, H, T, T)), axis=-1)
                scores_BxHxTxT = scores_BxHxTxT + c2p / scale.astype(c2p.dtype)
            if "p2c" in c.pos_att_type:  # position of the query, content of the key (transformers' transpose)
                pos_q_SxHxK = heads(pos_q(rel_emb_SxD, deterministic))
                p2c_BxHxTxS = jnp.einsum("bthk,shk->bhts", k_BxTxHxK, pos_q_SxHxK)
                idx_TxT = np.clip(-rel_TxT + span, 0, 2 * span - 1)
                p2c = jnp.take_along_axis(p2c_BxHxTxS, jnp.broadcast_to(idx_TxT, (B, H, T, T)), axis=-1)
                scores_BxHxTxT = scores_BxHxTxT + jnp.swapaxes(p2c, -1, -2) / scale.astype(p2c.dtype)
        scores_BxHxTxT = jnp.where(mask_Bx1xTxT, scores_BxHxTxT.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(self.dtype)
        probs_BxHxTxT = Dropout(c.attention_probs_dropout_prob)(probs_BxHxTxT, deterministic=deterministic)
        return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxTxT, v_BxTxHxK).reshape(B, T, D)


class DebertaLayer(_Deberta):
    """`attention/self`, `attention/output`, `intermediate`, `output`: BERT's layer around disentangled attention."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb_SxD, deterministic: bool):
        attention = self.child(_Attention, "attention")
        h_BxTxD = attention(x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb_SxD, deterministic)
        inter_BxTxF = self.child(BertIntermediate, "intermediate")(h_BxTxD, deterministic)
        return self.child(BertOutput, "output", target="output")(inter_BxTxF, h_BxTxD, deterministic)


class _Attention(_Deberta):
    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb_SxD, deterministic: bool):
        ctx = self.child(_DisentangledSelfAttention, "self")(x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb_SxD, deterministic)
        return self.child(BertOutput, "output", target="attention_output")(ctx, x_BxTxD, deterministic)


class _Layers(_Deberta):
    """`layer/<i>` for i in start .. stop-1."""

    @nn.compact
    def __call__(self, x, mask, rel, rel_emb, deterministic: bool, start: int = 0, stop: int | None = None):
        for i in range(start, self.config.num_hidden_layers if stop is None else stop):
            layer = DebertaLayer(self.config, self.dtype, self.param_dtype, self.lora, i, name=str(i))
            x = layer(x, mask, rel, rel_emb, deterministic)
        return x


class _Conv(_Deberta):
    """DeBERTa-v2's ConvLayer `encoder/conv/{conv,LayerNorm}`: a 1-d convolution of the embeddings (zero at
    padding), dropout, conv_act, added to layer 0's output, LayerNorm, zero at padding. Packed, each
    token's window reads zeros outside its segment, as the unpacked example's reads its padding."""

    @nn.compact
    def __call__(self, embedded_BxTxD, x_BxTxD, mask_BxT, deterministic: bool, packed: bool = False):
        c, k = self.config, self.config.conv_kernel_size
        pad = [((k - 1) // 2, (k - 1) // 2)]
        conv = nn.Conv(c.hidden_size, (k,), padding="VALID" if packed else pad, feature_group_count=c.conv_groups,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        keep_BxTx1 = (mask_BxT > 0)[..., None]
        if packed:
            out = conv(_segment_windows(embedded_BxTxD, mask_BxT, k)).reshape(x_BxTxD.shape)
        else:
            out = conv(embedded_BxTxD)
        out = jnp.where(keep_BxTx1, out, 0)
        out = CONV_ACTIVATIONS[c.conv_act](Dropout(c.hidden_dropout_prob)(out, deterministic=deterministic))
        return self.layer_norm("LayerNorm")(x_BxTxD + out) * keep_BxTx1.astype(x_BxTxD.dtype)


def _segment_windows(x_BxTxD, segment_ids_BxT, k: int):
    """[B*T, k, D]: each token's convolution window (offsets -(k-1)//2 ..), zero outside its segment and the row."""
    B, T, D = x_BxTxD.shape
    lo = (k - 1) // 2
    x_pad = jnp.pad(x_BxTxD, ((0, 0), (lo, k - 1 - lo), (0, 0)))
    ids_pad = jnp.pad(segment_ids_BxT, ((0, 0), (lo, k - 1 - lo)))
    idx_TxK = np.arange(T)[:, None] + np.arange(k)[None]
    same_BxTxK = ids_pad[:, idx_TxK] == segment_ids_BxT[..., None]
    return jnp.where(same_BxTxK[..., None], x_pad[:, idx_TxK], 0).reshape(B * T, k, D)


class DebertaEncoder(_Deberta):
    """`encoder/layer/<i>`, the relative embeddings `encoder/rel_embeddings` and their `encoder/LayerNorm`,
    and (conv_kernel_size > 0) `encoder/conv` after layer 0."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, start: int = 0, stop: int | None = None,
                 packed: bool = False):
        c = self.config
        if packed:
            mask_Bx1xTxT = segment_mask(mask_BxT)
        else:
            mask_Bx1xTxT = (mask_BxT[:, None, None, :] > 0) & (mask_BxT[:, None, :, None] > 0)
        rel_TxT, rel_emb = relative_positions(x_BxTxD.shape[1], c), None
        if c.relative_attention:
            table = nn.Embed(2 * c.att_span, c.hidden_size, embedding_init=nn.initializers.normal(c.initializer_range),
                             dtype=self.dtype, param_dtype=self.param_dtype, name="rel_embeddings")
            rel_emb = table(jnp.arange(2 * c.att_span))
            if c.rel_norm:
                rel_emb = self.layer_norm("LayerNorm")(rel_emb)
        layers = _Layers(c, self.dtype, self.param_dtype, self.lora, name="layer")
        if not c.conv_kernel_size or start > 0 or stop == 0:
            return layers(x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb, deterministic, start, stop)
        x = layers(x_BxTxD, mask_Bx1xTxT, rel_TxT, rel_emb, deterministic, 0, 1)
        x = self.child(_Conv, "conv")(x_BxTxD, x, mask_BxT, deterministic, packed)
        return layers(x, mask_Bx1xTxT, rel_TxT, rel_emb, deterministic, 1, stop)


class DebertaModel(_Deberta):
    """Embeddings and L unrolled layers; returns the last hidden states [B, T, D].

    `stop=n` returns the hidden states after layer n-1; `hidden_BxTxD` given with `start=n` replaces
    the embeddings and layers 0 .. n-1 by those hidden states (the frozen-stratum cache, `frozen.py`).
    `segment_starts` [B, K] given: packed rows (the module docstring).
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 hidden_BxTxD=None, start: int = 0, stop: int | None = None, segment_starts=None):
        c = self.config
        packed = check_packed(segment_starts, input_ids if hidden_BxTxD is None else hidden_BxTxD, attention_mask)
        if hidden_BxTxD is None:
            attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
            token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = self.child(DebertaEmbeddings, "embeddings")(input_ids, token_type_ids, attention_mask, deterministic,
                                                            packed)
        else:
            x = hidden_BxTxD.astype(self.dtype)
            attention_mask = jnp.ones(x.shape[:2], jnp.int32) if attention_mask is None else attention_mask
        if self.lora is not None:
            self.lora.validate(c.num_hidden_layers)
        return self.child(DebertaEncoder, "encoder")(x, attention_mask, deterministic, start, stop, packed)


class DebertaForSequenceClassification(_Deberta, SplitAtLayer):
    """`deberta` and DebertaV2ForSequenceClassification's head: dropout (pooler_dropout) -> `pooler/dense`
    -> pooler_hidden_act on the first token, dropout (cls_dropout, else hidden_dropout_prob) ->
    `classifier`; logits [B, num_labels] (num_labels == 1: a regressor); packed, [B, K, num_labels]."""

    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 hidden_BxTxD=None, start: int = 0, stop: int | None = None, segment_starts=None):
        c = self.config
        x = self.child(DebertaModel, c.family.prefix)(input_ids, attention_mask, token_type_ids, deterministic,
                                                      hidden_BxTxD, start, stop, segment_starts)
        if stop is not None:
            return x
        first_BxD = Dropout(c.pooler_dropout)(first_tokens(x, segment_starts), deterministic=deterministic)
        pooled = ACTIVATIONS[c.pooler_hidden_act](self.child(_Pooler, "pooler")(first_BxD, deterministic))
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        pooled = Dropout(rate)(pooled, deterministic=deterministic)
        return self.linear(self.num_labels, "classifier")(pooled, deterministic).astype(jnp.float32)


class _Pooler(_Deberta):
    @nn.compact
    def __call__(self, first_BxD, deterministic: bool):
        return self.linear(self.config.pooler_hidden_size or self.config.hidden_size, "dense")(first_BxD, deterministic)


#: the names `hf` looks up in a family's module (families.Family.module)
Config, ForSequenceClassification = DebertaConfig, DebertaForSequenceClassification
