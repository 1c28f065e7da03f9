"""Packed rows in every family (issue 29, model side): each example's logits, hidden states and loss
gradients from a packed row equal the unpacked example's (float32, 1e-5).

The rows hold several examples of different lengths (pairs with token types 0/1, a segment of one
token, a row filled to its last token, rows with fewer than K segments). `pack` below is the test's
own tiny packer (concatenate, segment ids 1 .. K, starts, token types), independent of the real one.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.models.segments import attention_bias, first_tokens, segment_mask, segment_positions
from spafit_jax.models.deberta import DebertaConfig, DebertaForSequenceClassification
from spafit_jax.errors import ConfigError
from spafit_jax.lora import LoRAConfig
from spafit_jax.models.modernbert import ModernBertConfig, ModernBertForSequenceClassification

ATOL = 1e-5
T, K, C = 16, 3, 3
TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=40)
FAMILIES = {  # name: (model class, config)
    "bert": (BertForSequenceClassification, BertConfig(**TINY)),
    "roberta": (BertForSequenceClassification, BertConfig(**TINY, model_type="roberta", pad_token_id=1,
                                                          type_vocab_size=1)),
    "xlm-roberta": (BertForSequenceClassification, BertConfig(**TINY, model_type="xlm-roberta", pad_token_id=1,
                                                              type_vocab_size=1)),
    "electra": (BertForSequenceClassification, BertConfig(**TINY, model_type="electra", embedding_size=8)),
    "distilbert": (BertForSequenceClassification, BertConfig(**TINY, model_type="distilbert",
                                                             sinusoidal_pos_embds=True)),
    "deberta-v3": (DebertaForSequenceClassification, DebertaConfig(
        **TINY, relative_attention=True, position_buckets=8, max_relative_positions=32, pos_att_type=("p2c", "c2p"),
        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)),
    "deberta-v2": (DebertaForSequenceClassification, DebertaConfig(  # absolute positions, types, the convolution
        **TINY, relative_attention=True, pos_att_type=("c2p", "p2c"), position_biased_input=True, type_vocab_size=2,
        embedding_size=8, conv_kernel_size=3, conv_groups=2, conv_act="gelu")),
    "modernbert-mean": (ModernBertForSequenceClassification, ModernBertConfig(  # a window of 2 tokens either side
        **TINY, pad_token_id=0, local_attention=4, layer_types=("sliding_attention", "full_attention"),
        classifier_pooling="mean")),
    "modernbert-cls": (ModernBertForSequenceClassification, ModernBertConfig(
        **TINY, pad_token_id=0, local_attention=6, layer_types=("full_attention", "sliding_attention"))),
}
#: rows of examples as (length of the first text incl. [CLS] and [SEP], length of the second or 0);
#: row 0 has a one-token segment and a pair, row 1 two pairs filling all T tokens, row 2 one short
#: example, row 3 one example of T tokens.
ROWS = [[(5, 0), (1, 0), (4, 3)], [(5, 4), (4, 3)], [(4, 0)], [(16, 0)]]
#: XLA's CPU backend at level 0 compiles these programs in half the time (the same for packed and unpacked)
FAST = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def make_examples(pad_id: int, seed: int = 0):
    """[(input ids, token type ids)] of the examples of ROWS, in order; no id is the pad id."""
    rng = np.random.default_rng(seed)
    out = []
    for a, b in (ex for row in ROWS for ex in row):
        ids = rng.integers(5, TINY["vocab_size"], a + b)
        ids[ids == pad_id] = 7
        out.append((ids.astype(np.int32), np.r_[np.zeros(a), np.ones(b)].astype(np.int32)))
    return out


def pack(examples, rows, pad_id: int):
    """The packed batch of `examples` laid out as `rows` (counts of examples per row): input_ids,
    attention_mask (segment ids), token_type_ids [R, T] and segment_starts [R, K]."""
    R = len(rows)
    ids, seg = np.full((R, T), pad_id, np.int32), np.zeros((R, T), np.int32)
    types, starts = np.zeros((R, T), np.int32), np.zeros((R, K), np.int32)
    it = iter(examples)
    for r, n in enumerate(rows):
        at = 0
        for k in range(n):
            x, tt = next(it)
            ids[r, at:at + len(x)], types[r, at:at + len(x)], seg[r, at:at + len(x)] = x, tt, k + 1
            starts[r, k] = at
            at += len(x)
        assert at <= T
    return dict(input_ids=ids, attention_mask=seg, token_type_ids=types, segment_starts=starts)


def unpacked(examples, pad_id: int):
    """The same examples one per row, padded to T: a 0/1 mask (segment_starts absent)."""
    batch = pack(examples, [1] * len(examples), pad_id)
    batch.pop("segment_starts")
    return batch


def slots():
    """(row, segment) of each example in ROWS order."""
    return [(r, k) for r, row in enumerate(ROWS) for k in range(len(row))]


def build(name: str):
    """(model with LoRA on query/value, random parameters, config): every parameter random (LoRA's B
    included; norms' scales around 1), drawn from the init's shapes without running it."""
    cls, cfg = FAMILIES[name]
    model = cls(cfg, lora=LoRAConfig(rank=2, targets=("query", "value")), num_labels=C)
    batch = unpacked(make_examples(cfg.pad_token_id), cfg.pad_token_id)
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch["input_ids"], batch["attention_mask"])["params"]
    rng = np.random.default_rng(1)
    params = {k: (k[-1] == "scale") + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in flatten_dict(shapes).items()}
    return model, unflatten_dict(params), cfg


def with_labels(batch, packed: bool, n: int):
    """`batch` with labels and weights: one per example ([N]), or per slot ([R, K], 0 on absent slots)."""
    labels = np.arange(n) % C
    if not packed:
        return dict(batch, labels=labels.astype(np.int32), weights=np.ones(n, np.float32))
    where = tuple(np.asarray(slots()).T)
    slot_labels, weights = np.zeros((len(ROWS), K), np.int32), np.zeros((len(ROWS), K), np.float32)
    slot_labels[where], weights[where] = labels, 1.0
    return dict(batch, labels=slot_labels, weights=weights)


class Family:
    """One family's tiny model, its examples packed and unpacked, and three compiled programs (`runs`,
    `lowers`, `upper`) that serve every test."""

    def __init__(self, name: str):
        self.model, self.params, cfg = build(name)
        self.cfg, self.pad_id, self.L = cfg, cfg.pad_token_id, cfg.num_hidden_layers
        self.examples = make_examples(self.pad_id)
        self.packed = with_labels(pack(self.examples, [len(r) for r in ROWS], self.pad_id), True, len(self.examples))
        self.plain = with_labels(unpacked(self.examples, self.pad_id), False, len(self.examples))
        grad = jax.value_and_grad(self.loss, has_aux=True)
        self._runs = jax.jit(lambda p, a, b: (grad(p, a), grad(p, b)), compiler_options=FAST)
        lower = lambda p, x, n1: self.model.apply({"params": p}, *self.inputs(x), n1=n1,  # noqa: E731
                                                  method="lower", segment_starts=x.get("segment_starts"))
        self._lowers = jax.jit(lambda p, a, b: [[lower(p, x, n1) for n1 in range(1, self.L + 1)] for x in (a, b)],
                               compiler_options=FAST)
        self.upper = jax.jit(lambda p, h, b, n1: self.model.apply(
            {"params": p}, h, b["attention_mask"], n1=n1, method="upper", segment_starts=b.get("segment_starts")),
            static_argnums=3, compiler_options=FAST)

    @staticmethod
    def inputs(batch):
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    def loss(self, params, batch):
        """(sum of the examples' cross-entropies, logits): the summed per-example loss."""
        logits = self.model.apply({"params": params}, *self.inputs(batch), segment_starts=batch.get("segment_starts"))
        ce = per_example_loss(logits.reshape(-1, C), batch["labels"].reshape(-1))
        return (ce * batch["weights"].reshape(-1)).sum(), logits

    def runs(self, packed):
        """(loss, logits, flat gradients) of the packed batch `packed`, and of the unpacked examples."""
        out = self._runs(self.params, packed, self.plain)
        return tuple((loss, logits, flatten_dict(grads, sep="/")) for (loss, logits), grads in out)

    def lowers(self, packed):
        """Hidden states after layers 0 .. n-1 for n = 1 .. L: [packed rows' by n, unpacked examples' by n]."""
        return self._lowers(self.params, packed, self.plain)


def per_example_loss(logits_NxC, labels_N):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits_NxC), labels_N[:, None], axis=1)[:, 0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    f = Family(request.param)
    f.packed_run, f.plain_run = f.runs(f.packed)
    f.packed_hidden, f.plain_hidden = f.lowers(f.packed)
    return f


def each_example(f):
    """(index, row, segment, start, length) of each example in its packed row."""
    for i, ((r, k), (x, _)) in enumerate(zip(slots(), f.examples)):
        yield i, r, k, int(f.packed["segment_starts"][r, k]), len(x)


def test_packed_logits_are_each_examples_own(fam):
    (_, logits, _), (_, ref, _) = fam.packed_run, fam.plain_run
    assert logits.shape == (len(ROWS), K, C) and logits.dtype == jnp.float32 and ref.shape == (len(fam.examples), C)
    for i, r, k, _, _ in each_example(fam):
        np.testing.assert_allclose(logits[r, k], ref[i], atol=ATOL, err_msg=f"example {i}")


def test_packed_hidden_states_are_each_examples_own_in_every_layer(fam):
    for n1, hidden, ref in zip(range(1, fam.L + 1), fam.packed_hidden, fam.plain_hidden):
        assert hidden.shape == (len(ROWS), T, fam.cfg.hidden_size)
        for i, r, _, at, n in each_example(fam):
            np.testing.assert_allclose(hidden[r, at:at + n], ref[i, :n], atol=ATOL, err_msg=f"layer {n1} example {i}")


def test_gradients_of_the_summed_loss_agree(fam):
    (loss, _, grads), (ref_loss, _, ref) = fam.packed_run, fam.plain_run
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref.keys() and any("lora_b" in k for k in ref)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], atol=ATOL, err_msg=k)


def test_padding_and_absent_segments_change_nothing_real(fam):
    rng, dirty = np.random.default_rng(5), dict(fam.packed)
    pad, absent = fam.packed["attention_mask"] == 0, fam.packed["weights"] == 0

    def garble(key, where, low, high):  # random values where padding tokens / absent segments are
        dirty[key] = np.where(where, rng.integers(low, high, where.shape), dirty[key]).astype(np.int32)

    garble("input_ids", pad, 0, TINY["vocab_size"])
    garble("token_type_ids", pad, 0, 2)
    garble("segment_starts", absent, -3, T + 3)  # even outside the row
    garble("labels", absent, 0, C)
    (loss, logits, grads), _ = fam.runs(dirty)
    ref_loss, ref_logits, ref = fam.packed_run
    assert np.isfinite(logits).all() and (dirty["segment_starts"][absent] != fam.packed["segment_starts"][absent]).any()
    np.testing.assert_allclose(np.asarray(logits)[~absent], np.asarray(ref_logits)[~absent], atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], atol=1e-6, err_msg=k)
    for hidden, clean in zip(fam.lowers(dirty)[0], fam.packed_hidden):
        np.testing.assert_allclose(np.asarray(hidden)[~pad], np.asarray(clean)[~pad], atol=1e-6)


def test_frozen_stratum_cache_on_packed_rows(fam):
    """lower then upper on packed rows is the whole packed model; and a packed row of the examples'
    own (unpacked) hidden states, zeros or garbage on padding, gives each example's unpacked logits."""
    _, logits, _ = fam.packed_run
    _, ref, _ = fam.plain_run
    n1 = 1
    packed_hidden = fam.packed_hidden[n1 - 1]
    np.testing.assert_allclose(fam.upper(fam.params, packed_hidden, fam.packed, n1), logits, atol=ATOL)
    own = np.asarray(fam.plain_hidden[n1 - 1])
    rows = np.random.default_rng(6).standard_normal(packed_hidden.shape).astype(np.float32)  # garbage on padding
    for i, r, _, at, n in each_example(fam):
        rows[r, at:at + n] = own[i, :n]
    cached = np.asarray(fam.upper(fam.params, rows, fam.packed, n1))
    for i, r, k, _, _ in each_example(fam):
        np.testing.assert_allclose(cached[r, k], ref[i], atol=ATOL, err_msg=f"example {i}")


def test_segment_helpers_on_a_row_of_three_segments_and_padding():
    ids = jnp.asarray([[1, 1, 1, 2, 3, 3, 0, 0], [1] * 8])
    np.testing.assert_array_equal(segment_positions(ids), [[0, 1, 2, 0, 0, 1, 0, 0], list(range(8))])
    mask = np.asarray(segment_mask(ids))[:, 0]
    assert mask.shape == (2, 8, 8) and mask[1].all()
    for q in range(8):  # a query sees exactly its own segment's keys; padding sees nothing
        np.testing.assert_array_equal(mask[0, q], (np.asarray(ids[0]) == ids[0, q]) & (np.asarray(ids[0]) > 0))
    low = jnp.finfo(jnp.float32).min
    plain = attention_bias(jnp.asarray([[1, 1, 0]]))
    assert plain.shape == (1, 1, 1, 3) and plain.dtype == jnp.float32
    np.testing.assert_array_equal(plain[0, 0, 0], [0.0, 0.0, low])
    packed = attention_bias(ids, packed=True)
    assert packed.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(packed == 0.0, segment_mask(ids))
    x = jnp.arange(2 * 8 * 1.0).reshape(2, 8, 1)
    np.testing.assert_array_equal(first_tokens(x), x[:, 0])
    np.testing.assert_array_equal(first_tokens(x, jnp.asarray([[0, 3, 4], [0, 0, 0]]))[..., 0], [[0, 3, 4], [8, 8, 8]])


@pytest.mark.parametrize("name", ["bert", "deberta-v2", "modernbert-cls"])
@pytest.mark.parametrize("starts, mask, says", [
    (np.zeros(4, np.int32), True, "integer array [rows, K]"),  # rank 1
    (np.zeros((4, 2, 1), np.int32), True, "integer array [rows, K]"),  # rank 3
    (np.zeros((4, 0), np.int32), True, "K >= 1"),
    (np.zeros((4, 2), np.float32), True, "integer array"),
    (np.zeros((3, 2), np.int32), True, "3 rows but the inputs have 4"),
    (np.zeros((4, 2), np.int32), False, "needs attention_mask holding the segment ids"),
])
def test_a_bad_segment_starts_is_refused_at_trace_time_in_one_line(name, starts, mask, says):
    cls, cfg = FAMILIES[name]
    model = cls(cfg, num_labels=C)
    ids = np.full((4, T), 5, np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, np.ones_like(ids))
    for method, first in ((None, ids), ("lower", ids), ("upper", np.zeros((4, T, cfg.hidden_size), np.float32))):
        kw = dict(n1=1) if method else {}
        with pytest.raises(ConfigError, match=re.escape(says)) as e:
            jax.eval_shape(lambda v: model.apply(v, first, np.ones_like(ids) if mask else None, method=method,
                                                 segment_starts=starts, **kw), shapes)
        assert "\n" not in str(e.value)
