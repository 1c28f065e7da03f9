"""Tests of spafit_jax.masking on synthetic trees: dict, FrozenDict, nnx.State, HF-Flax and GPT-2 layouts."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from spafit_jax import masking, tree_paths
from spafit_jax.errors import MaskingError, SpafitError

ROOT = Path(__file__).resolve().parents[1]
H, I, R, V, P, C = 4, 8, 2, 11, 7, 3  # hidden, intermediate, LoRA rank, vocab, positions, classes


def _dense(n_in, n_out, lora=False):
    d = {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}
    if lora:
        d |= {"lora_a": np.zeros((n_in, R), np.float32), "lora_b": np.zeros((R, n_out), np.float32)}
    return d


def _ln():
    return {"scale": np.ones(H, np.float32), "bias": np.zeros(H, np.float32)}


def bert_tree(L, lora=True):
    """An HF-Flax BERT layout (LoRA on query/value) and its closed-form per-group counts."""
    layer = lambda: {
        "attention": {"self": {"query": _dense(H, H, lora), "key": _dense(H, H), "value": _dense(H, H, lora)},
                      "output": {"dense": _dense(H, H), "LayerNorm": _ln()}},
        "intermediate": {"dense": _dense(H, I)},
        "output": {"dense": _dense(I, H), "LayerNorm": _ln()}}
    tree = {"bert": {
        "embeddings": {"word_embeddings": {"embedding": np.zeros((V, H), np.float32)},
                       "position_embeddings": {"embedding": np.zeros((P, H), np.float32)},
                       "token_type_embeddings": {"embedding": np.zeros((2, H), np.float32)},
                       "LayerNorm": _ln()},
        "encoder": {"layer": {str(i): layer() for i in range(L)}},
        "pooler": {"dense": _dense(H, H)}},
        "classifier": _dense(H, C)}
    cf = dict(bias=5 * H + I, lora=4 * H * R, norm=4 * H, head=H * C + C, pooler=H * H + H)
    return tree, cf


def gpt2_tree(L, lora=True):
    """A GPT-2 layout (transformer/h/i/attn/c_attn, LoRA on c_attn), no pooler, score head without bias."""
    layer = lambda: {"ln_1": _ln(), "ln_2": _ln(),
                     "attn": {"c_attn": _dense(H, 3 * H, lora), "c_proj": _dense(H, H)},
                     "mlp": {"c_fc": _dense(H, 4 * H), "c_proj": _dense(4 * H, H)}}
    tree = {"transformer": {"wte": {"embedding": np.zeros((V, H), np.float32)},
                            "wpe": {"embedding": np.zeros((P, H), np.float32)},
                            "h": {str(i): layer() for i in range(L)}, "ln_f": _ln()},
            "score": {"kernel": np.zeros((H, C), np.float32)}}
    cf = dict(bias=9 * H, lora=H * R + R * 3 * H, norm=4 * H, head=H * C, pooler=0)
    return tree, cf


TREES = {"bert": bert_tree, "gpt2": gpt2_tree}


def pairs(params, labels):
    return list(zip([p for p, _ in tree_paths.path_leaves(params)], jax.tree.leaves(labels)))


def n_total(params):
    return sum(np.size(x) for x in jax.tree.leaves(params))


def spafit(params, n1=None, n2=None, **kw):
    """spafit_labels with n1/n2 resolved the one way (resolve_strata: fractions, None = L/3, 2L/3)."""
    n1, n2 = masking.resolve_strata(masking.num_layers(params), n1, n2)
    return masking.spafit_labels(params, n1, n2, **kw)


def method(params, name, **kw):
    """method_labels with spafit's n1/n2 resolved as `spafit` does."""
    if name == "spafit":
        kw["n1"], kw["n2"] = masking.resolve_strata(masking.num_layers(params), kw.get("n1"), kw.get("n2"))
    return masking.method_labels(params, name, **kw)


def n_trainable(params, labels):
    return sum(n for k, n in masking.count_params(params, labels).items() if k != "frozen")


# ----------------------------------------------------------------------------- layer_index
@pytest.mark.parametrize("path,want", [
    ("bert/encoder/layer/7/attention/self/query/kernel", 7), ("layers/3/mlp/kernel", 3),
    ("encoder/layers_12/x", 12), ("transformer/h/0/attn/c_attn/kernel", 0), ("block/2/x", 2),
    ("blocks/5/x", 5), ("blocks_0/mix/kernel", 0), ("layer_4/kernel", 4), ("Block_1/Dense_0/kernel", 1),
    ("bert/embeddings/word_embeddings/embedding", None), ("Dense_0/kernel", None), ("head/kernel", None),
    ("h_proj/kernel", None), ("layers/x/kernel", None), ("encoder_layer_3/kernel", None)])
def test_layer_index(path, want):
    assert masking.layer_index(path) == want


def test_layer_index_custom_pattern_and_in_labels():
    assert masking.layer_index("enc_3/w", r"enc_(\d+)/") == 3
    tree = {f"enc_{i}": {"bias": np.zeros(2), "lora_a": np.zeros((2, 1))} for i in range(3)} | {"head": {"kernel": np.zeros((2, 2))}}
    labels = masking.spafit_labels(tree, 1, 2, layer_pattern=r"enc_(\d+)/")
    assert labels["enc_0"] == {"bias": "frozen", "lora_a": "frozen"}
    assert labels["enc_1"] == {"bias": "bias", "lora_a": "frozen"}
    assert labels["enc_2"] == {"bias": "bias", "lora_a": "lora"}


@pytest.mark.parametrize("path,kind", [
    ("bert/encoder/layer/0/output/LayerNorm/scale", "layernorm"), ("h/0/ln_1/bias", "layernorm"),
    ("transformer/ln_f/scale", "layernorm"), ("layers/0/norm/scale", "layernorm"),
    ("layers/0/layer_norm/bias", "layernorm"), ("decoder/final_layer_norm/scale", "layernorm"),
    ("layers/0/input_layernorm/weight", "layernorm"), ("layers/0/norm2/bias", "layernorm"),
    ("layers/0/RMSNorm_0/scale", "layernorm"), ("blocks_1/BatchNorm_0/bias", "layernorm"),
    ("layers/0/bn/bias", "layernorm"), ("layers/0/bn/scale", "layernorm"), ("layers/0/batch_norm/bias", "layernorm"),
    ("layers/0/gn/bias", "layernorm"), ("layers/0/rms_norm/scale", "layernorm"), ("layers/0/RMSNorm/scale", "layernorm"),
    ("model/norm_f/scale", "layernorm"), ("layers/0/GroupNorm_1/bias", "layernorm"), ("layers/0/bnorm/bias", "bias"),
    ("layers/0/gnu/bias", "bias"),
    ("layers/0/normal_proj/bias", "bias"), ("layers/0/denorm/bias", "bias"), ("layers/0/query/kernel", "weight"),
    ("layers/0/query/lora/lora_a", "lora"), ("layers/0/q/lora_B/kernel", "lora")])
def test_kind_detection(path, kind):
    assert masking._kind(path) == kind


def test_norms_by_other_names_are_norms_and_scale_only_norms_train():
    layer = lambda: {"mix": _dense(H, H), "bn": _ln(), "rms_norm": {"scale": np.ones(H, np.float32)}}  # noqa: E731
    tree = {"layers": {str(i): layer() for i in range(3)}, "head": _dense(H, C)}
    off = dict(pairs(tree, masking.method_labels(tree, "bitfit")))
    assert off["layers/1/bn/bias"] == off["layers/1/bn/scale"] == off["layers/1/rms_norm/scale"] == "frozen"
    assert off["layers/1/mix/bias"] == "bias"
    on = dict(pairs(tree, masking.spafit_labels(tree, 1, 3, train_layernorm=True)))
    assert on["layers/1/bn/bias"] == on["layers/1/bn/scale"] == on["layers/2/rms_norm/scale"] == "layernorm"
    assert on["layers/0/rms_norm/scale"] == "frozen"


# ----------------------------------------------------------------------------- property tests
@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(TREES)), tln=st.booleans(), tpool=st.booleans())
def test_spafit_strata_property(data, kind, tln, tpool):
    L = data.draw(st.integers(1, 12), "L")
    n2 = data.draw(st.integers(0, L), "n2")
    n1 = data.draw(st.integers(0, n2), "n1")
    params, cf = TREES[kind](L)
    labels = masking.spafit_labels(params, n1, n2, train_layernorm=tln, train_pooler=tpool)
    # every leaf labelled exactly once, with a known label
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert sum(masking.count_params(params, labels).values()) == n_total(params)
    for path, label in pairs(params, labels):
        i, name = masking.layer_index(path), path.split("/")[-1]
        is_ln = "LayerNorm" in path or "/ln_" in path
        if i is None:
            want = ("head" if path.startswith(("classifier", "score")) else
                    "pooler" if "pooler" in path and tpool else "frozen")
            assert label == want, path
        elif i < n1:
            assert label == "frozen", path
        elif i < n2:
            assert label in ({"frozen", "bias", "layernorm"} if tln else {"frozen", "bias"}), path
            assert label != "bias" or (name == "bias" and not is_ln), path
            assert label == "frozen" or name in ("bias", "scale"), path
        else:
            assert label in ({"frozen", "bias", "lora", "layernorm"} if tln else {"frozen", "bias", "lora"}), path
            assert (label == "lora") == name.startswith("lora_"), path
            assert label != "bias" or (name == "bias" and not is_ln), path
    want = ((L - n1) * (cf["bias"] + tln * cf["norm"]) + (L - n2) * cf["lora"]
            + cf["head"] + tpool * cf["pooler"])
    assert n_trainable(params, labels) == want


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 12), kind=st.sampled_from(sorted(TREES)), tpool=st.booleans())
def test_method_closed_forms_property(L, kind, tpool):
    params, cf = TREES[kind](L)
    count = lambda m, **kw: n_trainable(params, method(params, m, train_pooler=tpool, **kw))
    tail = cf["head"] + tpool * cf["pooler"]
    assert count("bitfit") == L * cf["bias"] + tail
    assert count("lora") == L * cf["lora"] + tail
    assert count("head_only") == tail
    assert count("spafit") == ((L - round(L / 3)) * cf["bias"] + (L - round(2 * L / 3)) * cf["lora"] + tail)
    assert count("full") == n_total(params) - (1 - tpool) * cf["pooler"]
    assert count("full", train_layernorm=False) == (n_total(params) - (1 - tpool) * cf["pooler"]
                                                    - L * cf["norm"] - 2 * H)


def test_full_labels_embeddings_and_bitfit_equals_spafit_without_lora():
    params, _ = bert_tree(3)
    full = masking.method_labels(params, "full")
    assert full["bert"]["embeddings"]["word_embeddings"]["embedding"] == "weight"
    assert full["bert"]["embeddings"]["LayerNorm"]["scale"] == "layernorm"
    assert full["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"] == {
        "kernel": "weight", "bias": "bias", "lora_a": "lora", "lora_b": "lora"}
    bitfit = masking.method_labels(params, "bitfit")
    spafit = masking.spafit_labels(params, 0, 3)
    assert pairs(params, bitfit) == pairs(params, spafit)


@pytest.mark.parametrize("L,n1,n2,want", [
    (12, None, None, (4, 8)), (6, None, None, (2, 4)), (4, None, None, (1, 3)), (1, None, None, (0, 1)),
    (12, 0.25, 0.5, (3, 6)), (12, 0.0, 1.0, (0, 12)), (6, 4.0, 6, (4, 6)), (6, np.int64(1), 2, (1, 2)),
    (4, 0.5, 0.625, (2, 3))])  # 0.625 * 4 = 2.5 rounds half up
def test_n1_n2_counts_and_fractions(L, n1, n2, want):
    params, cf = bert_tree(L)
    got = n_trainable(params, spafit(params, n1, n2))
    w1, w2 = want
    assert got == (L - w1) * cf["bias"] + (L - w2) * cf["lora"] + cf["head"] + cf["pooler"]


# ----------------------------------------------------------------------------- bad input
def _err(fn, match):
    with pytest.raises(MaskingError, match=match) as e:
        fn()
    assert isinstance(e.value, SpafitError) and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("n1,n2,match", [
    (5, 3, r"n1=5 > n2=3"), (1, 7, r"n2=7 exceeds the 6 layers"), (-1, 3, r"n1=-1 is negative"),
    (1, 2.5, r"n2=2.5 is not a whole layer count.*resolve_strata"), (True, 3, r"n1=True is not a whole layer count"),
    (0.5, 3, r"n1=0.5 is not a whole"), (1, float("nan"), r"n2=nan is not a whole"), ("1", 3, r"not a whole"),
    (1, 6.0, r"not a whole"), (None, 3, r"n1=None is not a whole layer count")])
def test_masking_takes_plain_layer_counts(n1, n2, match):
    params, _ = bert_tree(6)
    _err(lambda: masking.spafit_labels(params, n1, n2), match)
    _err(lambda: masking.method_labels(params, "spafit", n1=n1, n2=n2), match)


@pytest.mark.parametrize("n1,n2,match", [
    (5, 3, r"n1=5 > n2=3"), (1, 13, r"n2=13 exceeds the 6 layers"), (-1, 3, r"n1=-1 is negative"),
    (1, 2.5, r"n2=2.5 is neither a whole layer count nor a fraction"), (True, 3, r"n1=True is not a number"),
    (-0.5, 3, r"n1=-0.5 is a fraction outside \[0, 1\]"), (1, float("nan"), r"outside \[0, 1\]"),
    ("1", 3, r"not a number"), (1, 7.0, r"exceeds")])
def test_resolve_strata_refuses(n1, n2, match):
    _err(lambda: masking.resolve_strata(6, n1, n2), match)


def test_no_layer_index():
    tree = {"encoder": {"dense": _dense(H, H)}, "classifier": _dense(H, C)}
    msg = _err(lambda: masking.spafit_labels(tree, 0, 0), r"no layers found: no layer index .* no stacked subtree")
    assert "layer_pattern" in msg and "stacked=" in msg and "'encoder/dense/bias'" in msg
    for name in ("bitfit", "lora", "spafit"):
        _err(lambda: masking.method_labels(tree, name, n1=0, n2=0), r"no layers found")
    _err(lambda: masking.num_layers(tree), r"no layers found")
    assert masking.method_labels(tree, "head_only")["classifier"]["kernel"] == "head"


def test_unknown_method():
    params, _ = bert_tree(2)
    msg = _err(lambda: masking.method_labels(params, "adapter"), r"unknown method 'adapter'")
    assert all(m in msg for m in masking.METHODS)


@pytest.mark.parametrize("name", ["lora", "spafit"])
def test_lora_methods_need_lora_leaves(name):
    params, _ = bert_tree(3, lora=False)
    _err(lambda: method(params, name), r"no lora_a/lora_b leaves.*LoRA adapters")
    # no stratum 3 (n2 = L): spafit needs no adapters
    assert n_trainable(params, masking.spafit_labels(params, 1, 3)) > 0


@pytest.mark.parametrize("name", ["spafit", "bitfit", "lora", "head_only"])
def test_a_head_by_another_name_is_an_error_not_frozen(name):
    params, _ = bert_tree(3)
    params["out_proj"] = params.pop("classifier")
    msg = _err(lambda: method(params, name), r"no task head found: no parameter path matches head_pattern=")
    assert "head_pattern=" in msg and "'bert/embeddings/" in msg
    labels = method(params, name, head_pattern="^out_proj/")
    assert labels["out_proj"] == {"kernel": "head", "bias": "head"}
    assert "head" in masking.summary(params, labels)
    # full fine-tuning and explicit rules need no head
    assert masking.method_labels(params, "full")["out_proj"]["kernel"] == "weight"
    assert masking.label_params(params, [(".*", "weight")])["out_proj"]["bias"] == "weight"


def test_label_params_rules_and_uncovered():
    params, _ = bert_tree(2)
    labels = masking.label_params(params, [(r"^classifier/", "head"), (r"/(query|value)/lora_", "lora"),
                                           (r"/bias$", "bias"), (r".*", "frozen")])
    assert labels["classifier"] == {"kernel": "head", "bias": "head"}
    assert labels["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["value"]["lora_b"] == "lora"
    assert labels["bert"]["pooler"]["dense"] == {"kernel": "frozen", "bias": "bias"}
    msg = _err(lambda: masking.label_params(params, [(r"/bias$", "bias"), (r"lora", "lora")]),
               r"\d+ parameter\(s\) match no rule: 'bert/embeddings/")
    assert "..." in msg and "('.*', 'frozen')" in msg
    _err(lambda: masking.label_params(params, [(r"(", "x")]), r"rule 0 regex '\(' is invalid")
    _err(lambda: masking.label_params(params, [(r".*", 3)]), r"rule 0 is")
    assert masking.label_params(params, {r".*": "frozen"})["classifier"]["bias"] == "frozen"


def test_labels_structure_mismatch_and_merge_mismatch():
    params, _ = bert_tree(2)
    other = masking.method_labels(bert_tree(3)[0], "bitfit")
    _err(lambda: masking.split(params, other), r"labels do not have the structure of params")
    _err(lambda: masking.count_params(params, other), r"labels do not have the structure")
    tr, _ = masking.split(params, masking.method_labels(params, "bitfit"))
    _, fr3 = masking.split(bert_tree(3)[0], other)
    _err(lambda: masking.join(tr, fr3), r"trainable and frozen trees differ in structure")


# ----------------------------------------------------------------------------- tree kinds
def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x is y or np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["dict", "frozendict", "hf_variables", "gpt2"])
def test_split_merge_round_trip(kind):
    from flax.core import freeze, FrozenDict
    params = {"dict": lambda: bert_tree(3)[0], "frozendict": lambda: freeze(bert_tree(3)[0]),
              "hf_variables": lambda: freeze({"params": bert_tree(3)[0]}), "gpt2": lambda: gpt2_tree(3)[0]}[kind]()
    labels = method(params, "spafit")
    trainable, frozen = masking.split(params, labels)
    assert type(trainable) is type(params) and type(frozen) is type(params)
    got = [p for p, _ in tree_paths.path_leaves(trainable)]
    assert got == [p for p, l in pairs(params, labels) if l != "frozen"]
    assert len(jax.tree.leaves(trainable)) + len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params))
    _assert_same(masking.join(trainable, frozen), params)
    if isinstance(params, FrozenDict):  # same labels as for the plain dict
        plain = method(jax.tree.map(lambda x: x, params.unfreeze()), "spafit")
        assert jax.tree.leaves(plain) == jax.tree.leaves(labels)


def test_hf_paths_and_gpt2_paths():
    variables = {"params": bert_tree(6)[0]}
    labels = method(variables, "spafit")
    layer = labels["params"]["bert"]["encoder"]["layer"]
    assert layer["0"]["attention"]["self"]["query"]["bias"] == "frozen"
    assert layer["2"]["attention"]["self"]["query"] == {"kernel": "frozen", "bias": "bias",
                                                          "lora_a": "frozen", "lora_b": "frozen"}
    assert layer["5"]["attention"]["self"]["value"] == {"kernel": "frozen", "bias": "bias",
                                                          "lora_a": "lora", "lora_b": "lora"}
    assert layer["5"]["output"]["LayerNorm"] == {"scale": "frozen", "bias": "frozen"}
    assert labels["params"]["bert"]["pooler"]["dense"]["kernel"] == "pooler"
    g = method(gpt2_tree(3)[0], "spafit", train_layernorm=True)
    assert g["transformer"]["h"]["2"]["attn"]["c_attn"]["lora_b"] == "lora"
    assert g["transformer"]["h"]["1"]["ln_1"] == {"scale": "layernorm", "bias": "layernorm"}
    assert g["transformer"]["ln_f"]["scale"] == "frozen" and g["score"]["kernel"] == "head"


def _nnx_model(L=3):
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.LoRALinear(H, H, lora_rank=R, rngs=rngs)
            self.value = nnx.LoRALinear(H, H, lora_rank=R, rngs=rngs)
            self.norm = nnx.LayerNorm(H, rngs=rngs)
            self.ff = nnx.Linear(H, H, rngs=rngs)

        def __call__(self, x):
            return x + self.ff(jax.nn.gelu(self.norm(self.query(x) + self.value(x))))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, H, rngs=rngs)
            self.layers = nnx.List([Layer(rngs) for _ in range(L)])
            self.head = nnx.Linear(H, C, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(x.mean(axis=1))

    return Model(nnx.Rngs(0))


def test_nnx_state_labels_split_merge_and_step():
    from flax import nnx
    model = _nnx_model(3)
    graphdef, state = nnx.split(model, nnx.Param)
    labels = masking.spafit_labels(state, 1, 2)
    lab = dict(pairs(state, labels))
    assert lab["layers/0/query/bias"] == "frozen" and lab["layers/1/query/bias"] == "bias"
    assert lab["layers/1/query/lora/lora_a"] == "frozen" and lab["layers/2/value/lora/lora_b"] == "lora"
    assert lab["layers/2/norm/bias"] == "frozen" and lab["layers/2/ff/kernel"] == "frozen"
    assert lab["head/kernel"] == "head" and lab["embed/embedding"] == "frozen"
    trainable, frozen = masking.split(state, labels)
    merged = masking.join(trainable, frozen)
    _assert_same(merged, state)
    nnx.update(model, merged)

    # B of LoRA starts at zero, so give the adapters a value to get gradients for lora_a too
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    tx = masking.stratified_optimizer(labels, {k: {"learning_rate": 0.1} for k in ("bias", "lora", "head")})
    opt_state = tx.init(trainable)
    ids, y = jnp.array([[1, 2, 3], [4, 5, 6]]), jnp.array([0, 2])

    @jax.jit
    def step(trainable, opt_state, frozen):
        def loss_fn(t):
            logits = nnx.merge(graphdef, masking.join(t, frozen))(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    new, _ = step(trainable, opt_state, frozen)
    for (path, a), b in zip(tree_paths.path_leaves(trainable), jax.tree.leaves(new)):
        assert not np.allclose(a, b), path


# ----------------------------------------------------------------------------- counts / summary
def test_count_params_and_summary():
    params, cf = bert_tree(6)
    labels = method(params, "spafit")
    counts = masking.count_params(params, labels)
    assert list(counts) == ["bias", "lora", "head", "pooler", "frozen"]
    assert counts["lora"] == 2 * cf["lora"] and counts["bias"] == 4 * cf["bias"]
    assert sum(counts.values()) == n_total(params)
    table = masking.summary(params, labels)
    lines = table.splitlines()
    assert lines[0].split() == ["label", "tensors", "parameters", "percent"]
    total = lines[-1].split()
    assert total[0] == "total" and total[2] == f"{n_total(params):,}" and total[3] == "100.00%"
    assert total[1] == str(len(jax.tree.leaves(params)))
    head = next(line.split() for line in lines if line.startswith("head"))
    assert head[1:3] == ["2", f"{cf['head']:,}"]
    assert head[3] == f"{100 * cf['head'] / n_total(params):.2f}%"
    assert any(line.startswith("trainable") for line in lines)


# ----------------------------------------------------------------------------- optimizer
def _jnp_tree(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def test_optimizer_state_holds_nothing_for_frozen_leaves():
    params = _jnp_tree(bert_tree(6)[0])
    labels = method(params, "spafit")
    trainable, _ = masking.split(params, labels)
    sched = optax.linear_schedule(1e-3, 0.0, 10)
    tx = masking.stratified_optimizer(labels, {
        "bias": {"learning_rate": 1e-3}, "lora": {"learning_rate": sched, "weight_decay": 0.01},
        "head": {"learning_rate": 1e-3, "b1": 0.8}, "pooler": {"learning_rate": 1e-4}, "unused": {"learning_rate": 1}})
    state = tx.init(trainable)
    leaves = jax.tree.leaves(state)
    n_tr = n_trainable(params, labels)
    # Adam mu and nu (f32) per trainable parameter + an int32 count per label + one schedule count
    assert sum(x.nbytes for x in leaves) == 2 * 4 * n_tr + 4 * 4 + 4
    frozen_shapes = {(V, H), (P, H), (H, I), (I, H)}  # shapes only frozen leaves have
    assert not any(x.shape in frozen_shapes for x in leaves)


def test_optimizer_jitted_update_changes_only_trainable_leaves():
    params = _jnp_tree(bert_tree(4)[0])
    labels = masking.method_labels(params, "spafit", n1=1, n2=2)
    trainable, frozen = masking.split(params, labels)
    tx = masking.stratified_optimizer(labels, {k: {"learning_rate": optax.constant_schedule(0.01), "weight_decay": 0.1}
                                               for k in ("bias", "lora", "head", "pooler")})
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen):
        loss = lambda t: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(masking.join(t, frozen)))
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    new_trainable, _ = step(trainable, opt_state, frozen)
    new = masking.join(new_trainable, frozen)
    for (path, label), a, b in zip(pairs(params, labels), jax.tree.leaves(params), jax.tree.leaves(new)):
        assert np.array_equal(a, b) == (label == "frozen"), path


def test_weight_decay_only_on_matrices():
    params = _jnp_tree(bert_tree(1)[0])
    labels = masking.method_labels(params, "full")
    trainable, _ = masking.split(params, labels)
    tx = masking.stratified_optimizer(labels, {k: {"learning_rate": 1.0, "weight_decay": 0.5}
                                               for k in ("weight", "bias", "layernorm", "lora", "head", "pooler")})
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(trainable), trainable)
    for (path, p), u in zip(tree_paths.path_leaves(trainable), jax.tree.leaves(updates)):
        np.testing.assert_allclose(u, -0.5 * p if p.ndim >= 2 else 0 * p, rtol=1e-6, err_msg=path)


def test_optimizer_bad_settings():
    params, _ = bert_tree(3)
    labels = method(params, "spafit")
    msg = _err(lambda: masking.stratified_optimizer(labels, {"bias": {"learning_rate": 1e-3}}),
               r"no optimizer settings for label\(s\) 'lora', 'head', 'pooler'")
    assert "labels present: bias, lora, head, pooler" in msg
    full = {k: {"learning_rate": 1.0} for k in ("bias", "lora", "head", "pooler")}
    _err(lambda: masking.stratified_optimizer(labels, full | {"lora": {"lr": 1.0}}), r"settings\['lora'\] must be a mapping with a learning_rate")
    _err(lambda: masking.stratified_optimizer(labels, full | {"lora": {"learning_rate": 1.0, "decay": 1}}), r"unknown key")
    frozen_all = jax.tree.map(lambda _: "frozen", labels)
    _err(lambda: masking.stratified_optimizer(frozen_all, full), r"every parameter frozen")


# ----------------------------------------------------------------------------- packaging / docs
def test_import_is_light():
    heavy = ("transformers", "datasets", "torch", "sklearn", "matplotlib", "spafit_jax.models.bert", "spafit_jax.models.hf")
    code = (f"import sys, spafit_jax.masking; light = 'flax' not in sys.modules; import spafit_jax.lora; "
            f"print(light, ' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", f"import spafit_jax.masking / .lora pulled in: {out.stdout.strip()}"


DOCS = ROOT / "docs" / "masking.md"
EXAMPLES = ("masking", "nnx", "scan", "nnx-scan", "lora")


def docs_example(name, path=DOCS):
    """The python block between the <!-- {name}-example:start/end --> markers of a markdown file."""
    text = Path(path).read_text()
    m = re.search(rf"<!-- {name}-example:start -->\s*```python\n(.*?)```\s*<!-- {name}-example:end -->", text, re.S)
    assert m, f"{path} has no ```python block between <!-- {name}-example:start/end --> markers"
    return m.group(1)


@pytest.mark.parametrize("name", EXAMPLES)
def test_docs_example_runs(name):
    code = docs_example(name)
    exec(compile(code, f"docs/masking.md:{name}-example", "exec"), {"__name__": "docs_example"})


def test_every_python_block_of_the_page_is_an_example():
    blocks = re.findall(r"```python\n", DOCS.read_text())
    assert len(blocks) == len(EXAMPLES)


def test_optimizer_state_layout_is_optax_own_and_frozen_leaves_are_refused():
    params = _jnp_tree(bert_tree(4)[0])
    labels = masking.method_labels(params, "spafit", n1=1, n2=2)
    trainable, _ = masking.split(params, labels)
    settings = {k: {"learning_rate": 1e-3} for k in ("bias", "lora", "head", "pooler")}
    ours = masking.stratified_optimizer(labels, settings).init(trainable)
    # what a checkpoint written with multi_transform over a labels tree holds: the same tree
    plain = optax.multi_transform({k: optax.adam(1e-3) for k in settings},
                                  jax.tree.map(lambda l: None if l == "frozen" else l, labels)).init(trainable)
    assert jax.tree.structure(ours) == jax.tree.structure(plain)
    tx = masking.stratified_optimizer(labels, settings)
    _err(lambda: tx.init(params), r"the optimizer got the frozen parameter 'bert/embeddings/.*masking.split")
    _err(lambda: tx.init({"nope": trainable}), r"a parameter 'nope/.*' its labels do not have")
