"""Linen beyond BERT: an nn.scan model (stacked layers) and a model of its own with the LoRA wrapper.

Each trains a few steps with SPAFIT, BitFit and LoRA plans: exactly the labelled leaves (rows) change
and the optimizer holds Adam moments for the trainable parameters (rows) only. Then what is refused.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafit_jax import lora, masking, tree_paths
from spafit_jax.errors import ConfigError, MaskingError, SpafitError
from tests.flax_models import (H, L, R, batch, linen_lora_model, linen_scan_model, linen_train, n_trainable,
                               opt_floats, trained_exactly)

PLANS = {"spafit": dict(n1=1, n2=3), "bitfit": {}, "lora": {}}


@pytest.fixture(scope="module")
def models():
    x, _ = batch()
    out = {}
    for kind, make in (("scan", linen_scan_model), ("own", linen_lora_model)):
        model = make()
        variables = model.init(jax.random.key(0), x)
        out[kind] = model, variables
    return out


def _one(err, fn, match):
    with pytest.raises(err, match=match) as e:
        fn()
    assert isinstance(e.value, SpafitError) and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("kind", ["scan", "own"])
@pytest.mark.parametrize("method", list(PLANS))
def test_linen_trains_exactly_the_labels(models, kind, method):
    model, variables = models[kind]
    params = variables["params"]
    labels = masking.method_labels(params, method, **PLANS[method])
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    new, state = linen_train(apply, params, labels)
    trained_exactly(params, new, labels)
    assert opt_floats(state) == 2 * n_trainable(params, labels)


def test_stacked_rows_labels_and_counts(models):
    params = models["scan"][1]["params"]
    assert masking.num_layers(params) == L
    lab = dict(tree_paths.path_leaves(masking.spafit_labels(params, 1, 3, train_layernorm=True)))
    assert repr(lab["ScanBlock_0/attn/bias"]) == "Rows('bias', 1, 4, axis=0)"
    assert (lab["ScanBlock_0/attn/lora_a"].start, lab["ScanBlock_0/ln/scale"].start) == (3, 1)
    assert lab["ScanBlock_0/attn/kernel"] == "frozen" and lab["classifier/kernel"] == "head"
    mask = jax.tree_util.tree_map_with_path(masking.trainable(masking.spafit_labels(params, 1, 3)), params)
    assert mask["ScanBlock_0"]["attn"]["kernel"] is False and mask["ScanBlock_0"]["attn"]["bias"] is True
    assert mask["classifier"]["kernel"] is True  # the filter is a predicate on linen key paths too
    counts = masking.count_params(params, masking.spafit_labels(params, 1, 3))
    assert counts["bias"] == 3 * H and counts["lora"] == 1 * 2 * H * R
    assert sum(counts.values()) == sum(x.size for x in jax.tree.leaves(params))
    # the layer axis named explicitly: the same labels, and axis 1 read as such
    same = masking.spafit_labels(params, 1, 3, stacked="ScanBlock_0/")
    assert dict(tree_paths.path_leaves(same)) == dict(tree_paths.path_leaves(masking.spafit_labels(params, 1, 3)))
    moved = {"enc": jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1) if x.ndim > 1 else x, params["ScanBlock_0"]),
             "head": params["classifier"]}
    moved["enc"]["attn"]["bias"] = jnp.zeros((2, L))  # (features, layers)
    moved["enc"]["ln"] = {"scale": jnp.zeros((2, L))}
    got = dict(tree_paths.path_leaves(masking.spafit_labels(moved, 1, 3, stacked=("enc/", 1))))
    assert (got["enc/attn/lora_b"].start, got["enc/attn/lora_b"].axis) == (3, 1)


def test_stacked_layout_refusals(models):
    params = dict(models["scan"][1]["params"])
    _one(MaskingError, lambda: masking.spafit_labels(params, 1, 3, stacked="nothing/"), r"stacked='nothing/' matches no parameter")
    _one(MaskingError, lambda: masking.spafit_labels(params, 1, 3, stacked=("ScanBlock_0/", "x")), r"not a regex or a \(regex, axis\)")
    bad = {"ScanBlock_0": dict(params["ScanBlock_0"], extra={"bias": jnp.zeros((L + 1, 2))}),
           "classifier": params["classifier"]}
    msg = _one(MaskingError, lambda: masking.spafit_labels(bad, 1, 3), r"one size along axis 0 .* but saw")
    assert "ScanBlock_0/extra/bias (5, 2)" in msg and "stacked=(regex, axis)" in msg


def test_lora_wrapper_merge_is_exact_for_dense_and_dense_general(models):
    model, variables = models["own"]
    x, _ = batch()
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(v.dtype), variables["params"])
    trained = {"params": params, "lora": variables["lora"]}
    merged = lora.merge(trained)
    assert set(merged) == {"params"} and not lora.adapters(merged["params"])
    logits = model.apply(trained, x)
    from flax.traverse_util import flatten_dict
    kernels = {k: v.shape for k, v in flatten_dict(merged["params"]).items() if k[-1] == "kernel"}
    assert kernels[("blocks_0", "heads", "kernel")] == (H, 2, H // 2)
    # the merged tree runs in the adapted model with zero adapters: same logits
    zeros = jax.tree.map(jnp.zeros_like, lora.adapters(params))
    again = lora.unmerge(merged["params"], zeros, variables["lora"])
    np.testing.assert_allclose(model.apply({"params": again}, x), logits, atol=1e-5)
    restored = lora.unmerge(merged["params"], lora.adapters(params), variables["lora"])
    np.testing.assert_allclose(model.apply({"params": restored}, x), logits, atol=1e-5)
    # a LoRAConfig that disagrees with what the model recorded is refused, one that fits its ranks is used
    _one(ConfigError, lambda: lora.merge(trained, lora.LoRAConfig(rank=R, modules=None)), r"scaling .* was built with")
    _one(ConfigError, lambda: lora.merge(params, lora.LoRAConfig(modules=None)), r"has rank 2 but the LoRAConfig gives rank\(s\) \[8\]")
    _one(ConfigError, lambda: lora.merge(params), r"pass the variables of model.init")


@pytest.mark.parametrize("base,match", [
    (lambda: nn.Conv(4, (3,), parent=None), r"not nn.Conv: merge could not fold"),
    (lambda: nn.Embed(10, 4, parent=None), r"not nn.Embed"),
    (lambda: nn.DenseGeneral(4, batch_dims=(0,), axis=-1, parent=None), r"batch_dims")])
def test_lora_wrapper_refuses_what_it_cannot_merge(base, match):
    x = jnp.ones((2, 5, 4), jnp.float32)
    _one(ConfigError, lambda: lora.LoRA(base(), rank=2, alpha=4.0).init(jax.random.key(0), x), match)


def test_lora_wrapper_base_bound_elsewhere():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return lora.LoRA(nn.Dense(4), rank=2, alpha=4.0, name="q")(x)  # no parent=None

    msg = _one(ConfigError, lambda: Model().init(jax.random.key(0), jnp.ones((1, 3))), r"bound to Model as 'Dense_0'")
    assert "parent=None" in msg


def test_lora_targets_any_name_or_regex():
    cfg = lora.LoRAConfig(targets=("mix", "attn_.*"), modules=None)
    assert cfg.wraps(0, "mix") and cfg.wraps(3, "attn_q") and not cfg.wraps(0, "mixer")
    assert lora.LoRAConfig(targets=("query|value",)).matched() == ("query", "value")
    _one(ConfigError, lambda: lora.LoRAConfig(targets=("mix",)), r"match no module.*modules=None")
    _one(ConfigError, lambda: lora.LoRAConfig(targets=("(",), modules=None), r"neither a module name nor a regular")
