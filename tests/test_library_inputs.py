"""The library as a Flax user from another project calls it, with the inputs they get wrong.

Each bad input is refused by us in one line that names the argument and a valid example (a
`MaskingError` or `ConfigError`, both `ValueError`s), never a traceback from `re`, jax or MLIR and
never a plan that quietly trains something else.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafit_jax import lora, masking, tree_paths
from spafit_jax.errors import ConfigError, MaskingError, SpafitError

H, L = 8, 4


def _one(err, fn, match):
    with pytest.raises(err, match=match) as e:
        fn()
    assert isinstance(e.value, SpafitError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    return str(e.value)


def _init(module, x=None):
    return module.init(jax.random.key(0), jnp.ones((2, 4)) if x is None else x)


def _unrolled(n=3, bias=True, norm=False, lora_leaves=False):
    def layer():
        d = {"dense": {"kernel": np.zeros((H, H), np.float32)}}
        if bias:
            d["dense"]["bias"] = np.zeros(H, np.float32)
        if norm:
            d["norm"] = {"scale": np.ones(H, np.float32)}
        if lora_leaves:
            d["dense"] |= {"lora_a": np.zeros((H, 2), np.float32), "lora_b": np.zeros((2, H), np.float32)}
        return d
    return {"layers": {str(i): layer() for i in range(n)}, "head": {"kernel": np.zeros((H, 2), np.float32)}}


# ----------------------------------------------------------------------------- errors
def test_our_input_errors_are_value_errors():
    assert issubclass(MaskingError, ValueError) and issubclass(MaskingError, SpafitError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, SpafitError)
    with pytest.raises(ValueError):
        masking.method_labels(_unrolled(), "adapter")


# ----------------------------------------------------------------------------- the LoRA module
@pytest.mark.parametrize("rank", [0, -1, -2, 2.5, True, "4", None])
def test_lora_rank_is_refused_at_construction(rank):
    msg = _one(ConfigError, lambda: lora.LoRA(nn.Dense(3, parent=None), rank=rank, alpha=4.0), r"LoRA rank must be")
    assert repr(rank) in msg and "rank=8" in msg


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "16", None, True])
def test_lora_alpha_is_refused_at_construction(alpha):
    _one(ConfigError, lambda: lora.LoRA(nn.Dense(3, parent=None), rank=2, alpha=alpha), r"LoRA alpha must be .*alpha=16")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_lora_dropout_and_rslora_are_refused_at_construction(dropout):
    _one(ConfigError, lambda: lora.LoRA(nn.Dense(3, parent=None), rank=2, alpha=2.0, dropout=dropout), r"LoRA dropout must be")
    _one(ConfigError, lambda: lora.LoRA(nn.Dense(3, parent=None), rank=2, alpha=2.0, rslora="yes"), r"LoRA rslora must be True or False")


def test_lora_accepts_numpy_numbers_and_refuses_inside_a_model():
    out = _init(lora.LoRA(nn.Dense(3, parent=None), rank=np.int64(2), alpha=np.float32(4.0), dropout=0.1))
    assert out["params"]["lora_a"].shape == (4, 2) and float(out["lora"]["scaling"]) == 2.0

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return lora.LoRA(nn.Dense(3, parent=None), rank=0, alpha=4.0, name="q")(x)

    _one(ConfigError, lambda: _init(Model()), r"LoRA rank must be an integer > 0, got 0")


@pytest.mark.parametrize("base", [None, nn.Dense, "dense"])
def test_lora_base_that_is_not_a_module(base):
    _one(ConfigError, lambda: _init(lora.LoRA(base, rank=2, alpha=2.0)), r"LoRA wraps nn.Dense or nn.DenseGeneral")


# ----------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("pattern,match", [
    (r"enc_\d+", r"layer_pattern='enc_\\\\d\+' has no capture group"),
    (r"enc_(\d+", r"layer_pattern='enc_\(\\\\d\+' is not a valid regex"),
    (3, r"layer_pattern=3 is not a regex string"),
    (r"(enc)_\d+", r"group 1 of layer_pattern='\(enc\)_\\\\d\+' matched 'enc' in 'enc_0/dense/bias'")])
def test_layer_pattern_mistakes(pattern, match):
    tree = {"enc_0": {"dense": {"bias": np.zeros(3)}}, "enc_1": {"dense": {"bias": np.zeros(3)}},
            "classifier": {"bias": np.zeros(2)}}
    for fn in (lambda: masking.num_layers(tree, layer_pattern=pattern),
               lambda: masking.spafit_labels(tree, 0, 2, layer_pattern=pattern),
               lambda: masking.method_labels(tree, "bitfit", layer_pattern=pattern)):
        msg = _one(MaskingError, fn, match)
        assert r"layer_pattern=r'enc_(\d+)/'" in msg
    _one(MaskingError, lambda: masking.layer_index("enc_0/x", pattern), match.split(" in ")[0])
    assert masking.num_layers(tree, layer_pattern=r"enc_(\d+)") == 2


@pytest.mark.parametrize("pattern,match", [("(cls", r"head_pattern='\(cls' is not a valid regex"),
                                           (3, r"head_pattern=3 is not a regex string")])
@pytest.mark.parametrize("method", ["spafit", "bitfit", "head_only", "full"])
def test_head_pattern_mistakes(pattern, match, method):
    msg = _one(MaskingError, lambda: masking.method_labels(_unrolled(), method, n1=1, n2=3, head_pattern=pattern), match)
    assert "head_pattern='out_proj'" in msg


# ----------------------------------------------------------------------------- stacked layers
def _stacked(axis, lora_leaves=False):
    """One Dense(H) + a norm scale per layer, L layers stacked on `axis`; no leaf tells H from L."""
    leaves = {"dense": {"kernel": np.zeros((L, H, H)), "bias": np.zeros((L, H))}, "norm": {"scale": np.ones((L, H))}}
    if lora_leaves:
        leaves["dense"] |= {"lora_a": np.zeros((L, H, 2)), "lora_b": np.zeros((L, 2, H))}
    leaves = jax.tree.map(lambda x: np.moveaxis(x, 0, axis), leaves)
    return {"layers": leaves, "head": {"kernel": np.zeros((H, 2)), "bias": np.zeros(2)}}


@pytest.mark.parametrize("axis", [0, 1])
def test_ambiguous_stacking_is_refused_naming_stacked(axis):
    params = _stacked(axis)
    for fn in (lambda: masking.num_layers(params), lambda: masking.spafit_labels(params, 2, 3),
               lambda: masking.method_labels(params, "bitfit"), lambda: masking.num_layers(params, stacked="layers/")):
        msg = _one(MaskingError, fn, r"stacked layers under .* could run along axis 0 \((4|8) layers\) or axis 1 \((4|8) layers\)")
        assert "stacked=('layers/', 0)" in msg and "stacked=('layers/', 1)" in msg
    assert masking.num_layers(params, stacked=("layers/", axis)) == L
    labels = dict(tree_paths.path_leaves(masking.spafit_labels(params, 2, L, stacked=("layers/", axis))))
    assert repr(labels["layers/dense/bias"]) == f"Rows('bias', 2, {L}, axis={axis})"
    assert masking.count_params(params, masking.spafit_labels(params, 2, L, stacked=("layers/", axis)))["bias"] == 2 * H


def test_unambiguous_stacking_is_still_detected():
    assert masking.num_layers(_stacked(0, lora_leaves=True)) == L  # lora_b's axis 1 is the rank: only axis 0 fits
    params = _stacked(1, lora_leaves=True)
    msg = _one(MaskingError, lambda: masking.num_layers(params), r"one size along axis 0 .* but saw")
    assert "axis 1 has one size (4) in every leaf: pass stacked=('layers/', 1)" in msg


# ----------------------------------------------------------------------------- bias-free models
def test_bitfit_and_spafit_agree_on_a_model_without_biases_or_norms():
    params = _unrolled(bias=False, lora_leaves=True)
    _one(MaskingError, lambda: masking.method_labels(params, "bitfit"), r"bitfit: no layer has a bias or norm scale to train")
    _one(MaskingError, lambda: masking.spafit_labels(params, 1, 3), r"stratum 2 \(layers 1\.\.2\) has no bias or norm scale")
    # with norms, both train the norm scales in place of the missing biases (the documented stand-in)
    normed = _unrolled(bias=False, norm=True)
    bitfit = dict(tree_paths.path_leaves(masking.method_labels(normed, "bitfit")))
    spafit = dict(tree_paths.path_leaves(masking.spafit_labels(normed, 1, 3)))
    assert bitfit["layers/0/norm/scale"] == "layernorm" and spafit["layers/0/norm/scale"] == "frozen"
    assert bitfit["layers/2/norm/scale"] == spafit["layers/2/norm/scale"] == "layernorm"


def test_lora_on_the_head_only_is_not_lora_on_the_layers():
    params = _unrolled()
    params["head"] |= {"lora_a": np.zeros((H, 2)), "lora_b": np.zeros((2, 2))}
    _one(MaskingError, lambda: masking.method_labels(params, "lora"), r"lora: no layer has lora_a/lora_b leaves")


# ----------------------------------------------------------------------------- what is not a parameter tree
@pytest.mark.parametrize("params,match", [
    ({}, r"params \(dict\) holds no parameters"), (None, r"params \(NoneType\) holds no parameters"),
    (np.zeros(3), r"params is a single ndarray, not a tree of named parameters"),
    ("params", r"params is a single str"), (nn.Dense(3), r"params is a single Dense"),
    ({"layers": {"0": {"bias": "bias"}}, "head": {"bias": np.zeros(2)}}, r"parameter 'layers/0/bias' is a str, not an array")])
@pytest.mark.parametrize("method", ["full", "head_only", "spafit"])
def test_what_is_not_a_parameter_tree(params, match, method):
    msg = _one(MaskingError, lambda: masking.method_labels(params, method, n1=0, n2=0), match)
    assert "model.init(rng, x)['params']" in msg
    _one(MaskingError, lambda: masking.label_params(params, [(".*", "frozen")]), match)


def test_variables_with_other_collections_are_refused():
    variables = _init(lora.LoRA(nn.Dense(3, parent=None), rank=2, alpha=2.0))  # {"params", "lora": scalings}
    for method in ("full", "bitfit"):
        _one(MaskingError, lambda: masking.method_labels(variables, method), r"variable collections \['lora'\] beside 'params'")
    assert masking.method_labels({"params": variables["params"]}, "full")["params"]["lora_a"] == "lora"


def test_an_nnx_state_with_batch_statistics_is_refused():
    nnx = pytest.importorskip("flax.nnx")
    from tests.flax_models import nnx_list_model

    model = nnx_list_model()
    msg = _one(MaskingError, lambda: masking.method_labels(nnx.state(model), "full"), r"holds \d+ variable\(s\) that are not parameters")
    assert "BatchStat at 'layers/0/bn/mean'" in msg and "nnx.state(model, nnx.Param)" in msg
    labels = masking.method_labels(nnx.state(model, nnx.Param), "full")
    assert not any(p.endswith(("mean", "var")) for p, _ in tree_paths.path_leaves(labels))


@pytest.mark.parametrize("flag", ["train_layernorm", "train_pooler", "stratum3_bias"])
def test_flags_are_booleans(flag):
    params = _unrolled(lora_leaves=True)
    _one(MaskingError, lambda: masking.spafit_labels(params, 1, 2, **{flag: "no"}), rf"{flag}='no' is not True or False")
    _one(MaskingError, lambda: masking.method_labels(params, "bitfit", **{flag: 1}), rf"{flag}=1 is not True or False")


def test_labels_and_params_swapped_or_mixed_up():
    params = _unrolled(lora_leaves=True)
    labels = masking.spafit_labels(params, 1, 2)
    for fn in (lambda: masking.split(params, params), lambda: masking.trainable(params),
               lambda: masking.count_params(params, jax.tree.map(lambda _: 1, params))):
        _one(MaskingError, fn, r"labels leaf 'head/kernel' is a (ndarray|int), not a label string")
    trainable, frozen = masking.split(params, labels)
    _one(MaskingError, lambda: masking.join(trainable, labels), r"join got a tree of labels")
    _one(MaskingError, lambda: masking.split(params, masking.spafit_labels(_unrolled(4, lora_leaves=True), 1, 2)),
         r"labels do not have the structure of params")
    _one(MaskingError, lambda: masking.label_params(params, [(3, "bias")]), r"rule 0 is \(3, 'bias'\)")


@pytest.mark.parametrize("settings,match", [
    ({"bias": {"learning_rate": 1.0}, "head": {"learning_rate": 1.0}, "adapter": {"learning_rate": 1.0}},
     r"no optimizer settings for label\(s\) 'lora'.*labels present: bias, lora, head"),
    ({"bias": {"learning_rate": 1.0}, "lora": {"learning_rate": 1.0}, "head": {"learning_rate": 1.0},
      "adapter": {"lr": 1.0}}, r"settings\['adapter'\] must be a mapping with a learning_rate"),
    ([("bias", 1.0)], r"settings is a list"),
    ({k: {"learning_rate": "1e-3"} for k in ("bias", "lora", "head")}, r"settings\['bias'\]\['learning_rate'\]='1e-3' is not"),
    ({k: {"learning_rate": -1.0} for k in ("bias", "lora", "head")}, r"'learning_rate'\]=-1.0 is not a number >= 0"),
    ({k: {"learning_rate": 1e-3, "weight_decay": "x"} for k in ("bias", "lora", "head")}, r"'weight_decay'\]='x'"),
    ({k: {"learning_rate": 1e-3, "b2": 1.0} for k in ("bias", "lora", "head")}, r"'b2'\]=1.0 is not in \[0, 1\)")])
def test_optimizer_settings_mistakes(settings, match):
    labels = masking.spafit_labels(_unrolled(lora_leaves=True), 1, 2)
    _one(MaskingError, lambda: masking.stratified_optimizer(labels, settings), match)


def test_optimizer_takes_schedules_numpy_and_jax_scalars_and_labels_it_knows():
    params = _unrolled(lora_leaves=True)
    labels = masking.spafit_labels(params, 1, 2)
    settings = {"bias": {"learning_rate": np.float32(1e-3)}, "lora": {"learning_rate": jnp.asarray(1e-3)},
                "head": {"learning_rate": lambda step: 1e-3}, "layernorm": {"learning_rate": 1e-3}}  # layernorm: unused
    trainable, _ = masking.split(params, labels)
    masking.stratified_optimizer(labels, settings).init(jax.tree.map(jnp.asarray, trainable))


@pytest.mark.parametrize("L", ["6", -1, 2.5, True])
def test_resolve_strata_needs_a_layer_count(L):
    _one(MaskingError, lambda: masking.resolve_strata(L), r"num_layers=.* is not a layer count")


def test_lora_inside_nn_scan_without_an_axis_for_its_collection():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + lora.LoRA(nn.Dense(4, parent=None), rank=2, alpha=4.0, name="mix")(x), None

    def net(axes):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=3)(name="layers")(x, None)[0]
        return Net()

    _one(ConfigError, lambda: _init(net({"params": 0})), r"variable_axes=\{'params': 0, 'lora': 0\}")
    assert _init(net({"params": 0, "lora": 0}))["lora"]["layers"]["mix"]["scaling"].shape == (3,)


def test_layers_stacked_on_the_last_axis_are_named_in_the_error_and_train_by_rows():
    params = _stacked(-1, lora_leaves=True)  # kernel (H, H, L), bias (H, L), lora_b (2, H, L)
    msg = _one(MaskingError, lambda: masking.num_layers(params), r"one size along axis 0")
    assert "axis -1 has one size (4) in every leaf: pass stacked=('layers/', -1)" in msg
    labels = masking.spafit_labels(params, 1, 3, stacked=("layers/", -1))
    assert masking.count_params(params, labels)["bias"] == 3 * H


def test_nnx_vmap_layers_without_lora_name_the_ambiguity():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(H, H, rngs=rngs)

            self.layers, self.head = make(rngs), nnx.Linear(H, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    _one(MaskingError, lambda: masking.method_labels(model, "bitfit"), r"axis 0 \(4 layers\) or axis 1 \(8 layers\)")
    labels = dict(tree_paths.path_leaves(masking.method_labels(model, "bitfit", stacked=("layers/", 0))))
    assert repr(labels["layers/bias"]) == "Rows('bias', 0, 4, axis=0)" and labels["layers/kernel"] == "frozen"


def test_stacked_layers_without_biases_or_norms_refuse_stratum_2_as_unrolled_ones_do():
    params = {"layers": {"dense": {"kernel": np.zeros((L, H, H)), "lora_a": np.zeros((L, H, 2)),
                                   "lora_b": np.zeros((L, 2, H))}}, "head": {"kernel": np.zeros((H, 2))}}
    _one(MaskingError, lambda: masking.spafit_labels(params, 1, 3), r"stratum 2 \(layers 1\.\.2\) has no bias or norm scale")
    _one(MaskingError, lambda: masking.method_labels(params, "bitfit"), r"bitfit: no layer has a bias or norm scale")
    assert masking.spafit_labels(params, 3, 3)["layers"]["dense"]["lora_a"].start == 3


def test_stacked_labels_of_a_deeper_model_are_refused_not_miscounted():
    def tree(n):
        return {"layers": {"dense": {"kernel": jnp.zeros((n, H, H)), "bias": jnp.zeros((n, H)),
                                     "lora_a": jnp.zeros((n, H, 2)), "lora_b": jnp.zeros((n, 2, H))}},
                "head": {"kernel": jnp.zeros((H, 2))}}
    labels, params = masking.spafit_labels(tree(6), 2, 4), tree(4)
    match = r"labels of another model: 'layers/dense/bias' has shape \(4, 8\) but its label trains rows 2\.\.5"
    _one(MaskingError, lambda: masking.count_params(params, labels), match)
    _one(MaskingError, lambda: masking.split(params, labels), match)
    trainable = {"layers": {"dense": {k: params["layers"]["dense"][k] for k in ("bias", "lora_a", "lora_b")}},
                 "head": params["head"]}
    tx = masking.stratified_optimizer(labels, {k: {"learning_rate": 1.0} for k in ("bias", "lora", "head")})
    _one(MaskingError, lambda: tx.init(trainable), match)
