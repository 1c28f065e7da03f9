"""ModernBERT (answerdotai/ModernBERT-base, -large) in flax.linen, matching transformers' modeling_modernbert.

The computation is transformers 5's `ModernBertForSequenceClassification`: token embeddings ->
norm; L pre-norm layers (layer 0 has no attention norm) of self-attention with rotary positions
(theta `global_rope_theta` in global layers, `local_rope_theta` in local ones) and a GeGLU
feed-forward; global layers attend to every real token, local ("sliding_attention") layers only to
tokens at most `local_attention // 2` positions away; a final norm; the `head` (dense -> act ->
norm) on the first token (`classifier_pooling: cls`) or on the mean of the real tokens (`mean`);
dropout; `classifier`. No biases by default (`attention_bias`, `mlp_bias`, `norm_bias`,
`classifier_bias`; the classifier itself always has one).

The parameter tree (`families.FAMILIES["modernbert"]` maps PyTorch names to it and back):

    model/embeddings/tok_embeddings/embedding      model.embeddings.tok_embeddings.weight
    model/embeddings/norm/scale                    model.embeddings.norm.weight
    model/encoder/layer/<i>/attn_norm/scale        model.layers.<i>.attn_norm.weight (i > 0)
    model/encoder/layer/<i>/attn/Wqkv/query/kernel model.layers.<i>.attn.Wqkv.weight, rows 0 .. D-1
    model/encoder/layer/<i>/attn/Wqkv/key/kernel                      ... rows D .. 2D-1
    model/encoder/layer/<i>/attn/Wqkv/value/kernel                    ... rows 2D .. 3D-1
    model/encoder/layer/<i>/attn/Wo/kernel         model.layers.<i>.attn.Wo.weight
    model/encoder/layer/<i>/mlp_norm/scale         model.layers.<i>.mlp_norm.weight
    model/encoder/layer/<i>/mlp/Wi/kernel          model.layers.<i>.mlp.Wi.weight (input half, then gate half)
    model/encoder/layer/<i>/mlp/Wo/kernel          model.layers.<i>.mlp.Wo.weight
    model/final_norm/scale, head/dense/kernel, head/norm/scale, classifier/{kernel,bias}

Layers sit at `model/encoder/layer/<i>` like every other family's, so strata, the frozen-stratum
cache and the strata picture read them as they read BERT's. The fused `Wqkv` is held as its three
slices, so that our LoRA targets keep their meaning:

    query, key, value   -> the query / key / value slice of attn.Wqkv (one adapter per slice)
    attention_output    -> attn.Wo
    intermediate        -> mlp.Wi (the whole GeGLU input projection: input and gate halves)
    output              -> mlp.Wo

PEFT adapts whole modules, so a PEFT adapter carries attention_output / intermediate / output
exactly (attn.Wo, mlp.Wi, mlp.Wo); adapters on slices of Wqkv are refused by the PEFT export with
one line (export them merged with --format hf).

Packed rows (`segment_starts` [B, K] given; see `bert`): attention within segments (`segments.segment_mask`; the
local window inside them), rotary positions restarting per segment (`segments.segment_positions`), each
segment's first token or mean through the head: logits [B, K, num_labels].
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.models.bert import (
    ACTIVATIONS, BertConfig, Dropout, EncoderModule, SplitAtLayer,
)
from spafit_jax.models.segments import check_packed, first_tokens, segment_mask, segment_positions
from spafit_jax.errors import ConfigError
from spafit_jax.lora import LoRA

GLOBAL, LOCAL = "full_attention", "sliding_attention"
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(BertConfig):
    """The fields of a ModernBERT config.json the model uses (defaults: ModernBERT-base).

    BertConfig names where the meaning is the same: `hidden_act` is `hidden_activation`,
    `layer_norm_eps` `norm_eps`, `hidden_dropout_prob` `mlp_dropout`, `attention_probs_dropout_prob`
    `attention_dropout` (see `families`). `layer_types` None: every `global_attn_every_n_layers`-th
    layer global, starting with layer 0, the others local.
    """

    vocab_size: int = 50368
    num_hidden_layers: int = 22
    intermediate_size: int = 1152
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 8192
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 50283
    classifier_dropout: float | None = 0.0
    model_type: str = "modernbert"
    embedding_dropout: float = 0.0
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    layer_types: tuple[str, ...] | None = None
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_pooling: str = "cls"
    classifier_bias: bool = False
    classifier_activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            every = self.global_attn_every_n_layers
            object.__setattr__(self, "layer_types", tuple(LOCAL if i % every else GLOBAL
                                                          for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = [t for t in self.layer_types if t not in (GLOBAL, LOCAL)]
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types {list(self.layer_types)} must name {GLOBAL!r} or {LOCAL!r} for each of the "
                              f"{self.num_hidden_layers} layers")
        if self.classifier_pooling not in POOLINGS:
            raise ConfigError(f"classifier_pooling {self.classifier_pooling!r} is not supported; use cls or mean")
        if self.classifier_activation not in ACTIVATIONS:
            raise ConfigError(f"classifier_activation {self.classifier_activation!r} is not supported; use one of "
                              f"{', '.join(ACTIVATIONS)}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"head size {self.hidden_size // self.num_attention_heads} is odd; rotary positions "
                              "need an even head size")

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModernBertConfig":
        """Keeps the known keys of a ModernBERT config.json dict (transformers 4's `global_rope_theta` /
        `local_rope_theta` or 5's `rope_parameters`); a rope type other than default is refused."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        for kind, ours in ((GLOBAL, "global_rope_theta"), (LOCAL, "local_rope_theta")):
            params = rope.get(kind) or {}
            if params.get("rope_type", "default") != "default" or d.get("rope_scaling"):
                raise ConfigError(f"rope {params.get('rope_type') or d.get('rope_scaling')!r} is not supported for "
                                  "ModernBERT; spafit_jax implements the default rotary positions")
            if "rope_theta" in params:
                d[ours] = params["rope_theta"]
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def inv_freq(self, layer_type: str) -> np.ndarray:
        """Rotary inverse frequencies [K/2] of a layer type (float32, as transformers computes them)."""
        theta = self.global_rope_theta if layer_type == GLOBAL else self.local_rope_theta
        dim = self.hidden_size // self.num_attention_heads
        return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


class _MB(EncoderModule):
    """A ModernBERT module: `bert.EncoderModule` with Dense layers whose bias is a config setting."""

    def linear(self, features: int, name: str, x, deterministic: bool, use_bias: bool, target: str | None = None):
        """Applies a Dense named `name` (bias when `use_bias`); LoRA-wrapped when the LoRA config targets `target` here."""
        kw = dict(use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.normal(self.config.initializer_range))
        if self.lora is None or target is None or not self.lora.wraps(self.layer, target):
            return nn.Dense(features, name=name, **kw)(x)
        cfg, base = self.lora, nn.Dense(features, parent=None, **kw)
        rank = cfg.rank_for(self.layer, target)
        return LoRA(base, rank, cfg.alpha, cfg.dropout, cfg.rslora, self.dtype, self.param_dtype, name=name)(
            x, deterministic)

    def norm_layer(self, name: str):
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, use_bias=self.config.norm_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)


def _rotate(x_BxTxHxK, cos_TxK, sin_TxK):
    """Rotary positions in float32 (transformers' apply_rotary_pos_emb), cast back to the input dtype;
    the tables are [T, K] (unpacked) or [B, T, K] (packed)."""
    x = x_BxTxHxK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos_TxK[..., None, :] + rotated * sin_TxK[..., None, :]).astype(x_BxTxHxK.dtype)


class _Attention(_MB):
    """`attn/Wqkv/{query,key,value}` -> rotary positions -> softmax attention under the layer's mask -> `attn/Wo`."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias, cos_TxK, sin_TxK, deterministic: bool):
        c = self.config
        B, T, D = x_BxTxD.shape
        H, bias = c.num_attention_heads, c.attention_bias
        q, k, v = (y.reshape(B, T, H, D // H) for y in self.child(_Slices, "Wqkv")(x_BxTxD, deterministic))
        q, k = _rotate(q, cos_TxK, sin_TxK), _rotate(k, cos_TxK, sin_TxK)
        scores_BxHxTxT = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32) * (D // H) ** -0.5 + mask_bias
        probs = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(self.dtype)
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx_BxTxD = jnp.einsum("bhqt,bthk->bqhk", probs, v).reshape(B, T, D)
        out = self.linear(D, "Wo", ctx_BxTxD, deterministic, bias, target="attention_output")
        return Dropout(c.attention_probs_dropout_prob)(out, deterministic=deterministic)


class _Slices(_MB):
    """The fused `Wqkv` as three Dense slices `query`, `key`, `value` (each its own LoRA target)."""

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        D = self.config.hidden_size
        return tuple(self.linear(D, t, x_BxTxD, deterministic, self.config.attention_bias, target=t)
                     for t in ("query", "key", "value"))


class _MLP(_MB):
    """GeGLU: `mlp/Wi` (input and gate halves) -> act(input) * gate -> dropout -> `mlp/Wo`."""

    @nn.compact
    def __call__(self, x_BxTxD, deterministic: bool):
        c = self.config
        y = self.linear(2 * c.intermediate_size, "Wi", x_BxTxD, deterministic, c.mlp_bias, target="intermediate")
        inp, gate = jnp.split(y, 2, axis=-1)
        y = Dropout(c.hidden_dropout_prob)(ACTIVATIONS[c.hidden_act](inp) * gate, deterministic=deterministic)
        return self.linear(c.hidden_size, "Wo", y, deterministic, c.mlp_bias, target="output")


class ModernBertLayer(_MB):
    """x + attn(attn_norm(x)) (layer 0: no attn_norm), then + mlp(mlp_norm(x))."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_bias, cos_TxK, sin_TxK, deterministic: bool):
        h = x_BxTxD if self.layer == 0 else self.norm_layer("attn_norm")(x_BxTxD)
        x_BxTxD = x_BxTxD + self.child(_Attention, "attn")(h, mask_bias, cos_TxK, sin_TxK, deterministic)
        return x_BxTxD + self.child(_MLP, "mlp")(self.norm_layer("mlp_norm")(x_BxTxD), deterministic)


def attention_biases(attention_mask_BxT, config: ModernBertConfig, packed: bool = False) -> dict[str, jax.Array]:
    """Additive attention masks: GLOBAL [B,1,1,T] over the real keys; LOCAL [B,1,T,T] also keeping
    only keys at most `local_attention // 2` positions from the query (transformers' sliding window).
    Packed: both [B,1,T,T] over the keys of the query's segment (`segments.segment_mask`); within a
    segment the distance of two tokens is their distance in the unpacked example."""
    keep_Bx1xQxT = segment_mask(attention_mask_BxT) if packed else (attention_mask_BxT > 0)[:, None, None, :]
    T = attention_mask_BxT.shape[-1]
    low = jnp.finfo(jnp.float32).min
    pos = jnp.arange(T)
    band_TxT = jnp.abs(pos[:, None] - pos[None, :]) <= config.local_attention // 2
    return {GLOBAL: jnp.where(keep_Bx1xQxT, 0.0, low),
            LOCAL: jnp.where(keep_Bx1xQxT & band_TxT[None, None], 0.0, low)}


class _Embeddings(_MB):
    """`embeddings/tok_embeddings` -> `embeddings/norm` -> dropout."""

    @nn.compact
    def __call__(self, input_ids_BxT, deterministic: bool):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(c.initializer_range),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="tok_embeddings")(input_ids_BxT)
        return Dropout(c.embedding_dropout)(self.norm_layer("norm")(x), deterministic=deterministic)


class _Layers(_MB):
    """`layer/<i>` for i in start .. stop-1, unrolled; each layer takes its type's mask and rotary table."""

    @nn.compact
    def __call__(self, x, biases, rope, deterministic: bool, start: int = 0, stop: int | None = None):
        c = self.config
        for i in range(start, c.num_hidden_layers if stop is None else stop):
            kind = c.layer_types[i]
            layer = ModernBertLayer(c, self.dtype, self.param_dtype, self.lora, i, name=str(i))
            x = layer(x, biases[kind], *rope[kind], deterministic)
        return x


class _Encoder(_MB):
    @nn.compact
    def __call__(self, x, biases, rope, deterministic: bool, start: int = 0, stop: int | None = None):
        layers = _Layers(self.config, self.dtype, self.param_dtype, self.lora, name="layer")
        return layers(x, biases, rope, deterministic, start, stop)


def rotary_tables(config: ModernBertConfig, T: int, dtype,
                  positions_BxT=None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer type: (cos, sin) [T, K]} of positions 0 .. T-1, computed in float32 and cast to `dtype`;
    [B, T, K] of `positions_BxT` when given (packed rows: `segments.segment_positions`)."""
    out = {}
    pos = jnp.arange(T, dtype=jnp.float32) if positions_BxT is None else positions_BxT.astype(jnp.float32)
    for kind in set(config.layer_types):
        freqs_TxK = jnp.tile(pos[..., None] * config.inv_freq(kind), (1,) * pos.ndim + (2,))
        out[kind] = (jnp.cos(freqs_TxK).astype(dtype), jnp.sin(freqs_TxK).astype(dtype))
    return out


class ModernBertModel(_MB):
    """`embeddings`, `encoder/layer/<i>`, `final_norm`: hidden states [B, T, D].

    As `bert.BertModel`: `stop=n` returns the hidden states after layer n-1 (no final norm);
    `hidden_BxTxD` given with `start=n` replaces the embeddings and layers 0 .. n-1;
    `segment_starts` [B, K] given: packed rows (the module docstring).
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True, hidden_BxTxD=None,
                 start: int = 0, stop: int | None = None, segment_starts=None):
        c = self.config
        packed = check_packed(segment_starts, input_ids if hidden_BxTxD is None else hidden_BxTxD, attention_mask)
        if hidden_BxTxD is None:
            x = self.child(_Embeddings, "embeddings")(input_ids, deterministic)
        else:
            x = hidden_BxTxD.astype(self.dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        if self.lora is not None:
            self.lora.validate(c.num_hidden_layers)
        rope = rotary_tables(c, x.shape[1], self.dtype, segment_positions(attention_mask) if packed else None)
        biases = attention_biases(attention_mask, c, packed)
        x = self.child(_Encoder, "encoder")(x, biases, rope, deterministic, start, stop)
        return x if stop is not None else self.norm_layer("final_norm")(x)


def pool(x_BxTxD, attention_mask_BxT, how: str, segment_starts_BxK=None):
    """The first token (`cls`) or the mean over the real tokens (`mean`) of each row: [B, D]; packed
    (`segment_starts_BxK` given, `attention_mask_BxT` the segment ids), of each segment: [B, K, D]
    (an absent segment's mean is zeros)."""
    if how == "cls":
        return first_tokens(x_BxTxD, segment_starts_BxK)
    if segment_starts_BxK is None:
        m = attention_mask_BxT.astype(x_BxTxD.dtype)[..., None]
        return (x_BxTxD * m).sum(axis=1) / m.sum(axis=1)
    K = segment_starts_BxK.shape[1]
    member_BxKxT = (attention_mask_BxT[:, None, :] == jnp.arange(1, K + 1)[None, :, None]).astype(x_BxTxD.dtype)
    count_BxKx1 = jnp.maximum(member_BxKxT.sum(axis=-1, keepdims=True), 1)
    return jnp.einsum("bkt,btd->bkd", member_BxKxT, x_BxTxD) / count_BxKx1


class _Head(_MB):
    """`head/dense` -> classifier_activation -> `head/norm` (transformers' ModernBertPredictionHead)."""

    @nn.compact
    def __call__(self, x_BxD, deterministic: bool):
        c = self.config
        x = self.linear(c.hidden_size, "dense", x_BxD, deterministic, c.classifier_bias)
        return self.norm_layer("norm")(ACTIVATIONS[c.classifier_activation](x))


class ModernBertForSequenceClassification(_MB, SplitAtLayer):
    """`model` (the encoder), the pooled `head`, dropout and `classifier`: logits [B, num_labels] (1: a regressor);
    packed (`segment_starts` [B, K]), [B, K, num_labels].

    The call signature is `bert.BertForSequenceClassification`'s (`token_type_ids` is accepted and
    unused: ModernBERT has no token types), with the same `lower` / `upper` split for the
    frozen-stratum cache.
    """

    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 hidden_BxTxD=None, start: int = 0, stop: int | None = None, segment_starts=None):
        c = self.config
        x = self.child(ModernBertModel, "model")(input_ids, attention_mask, deterministic, hidden_BxTxD, start, stop,
                                                 segment_starts)
        if stop is not None:
            return x
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        pooled = self.child(_Head, "head")(pool(x, attention_mask, c.classifier_pooling, segment_starts), deterministic)
        pooled = Dropout(c.classifier_dropout or 0.0)(pooled, deterministic=deterministic)
        return self.linear(self.num_labels, "classifier", pooled, deterministic, True).astype(jnp.float32)


#: the names `hf.family_classes` looks up in a family's module.
Config, ForSequenceClassification = ModernBertConfig, ModernBertForSequenceClassification
