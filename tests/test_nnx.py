"""NNX as it reads: labels from the module, `wrt=masking.trainable(labels)`, `nnx.DiffState`, a few steps.

nnx.List layers (nnx.LoRALinear, nnx.LoRA, nnx.Sequential, BatchNorm) and nnx.vmap/nnx.scan stacked
layers: exactly the labelled leaves (rows) change, the optimizer holds Adam moments for the trainable
parameters (rows) only, and XLA prunes the backward pass below the first trainable layer.
"""

import jax
import numpy as np
import optax
import pytest

from spafit_jax import masking, tree_paths
from spafit_jax.errors import MaskingError
from tests.flax_models import (L, SETTINGS, batch, n_trainable, nnx_list_model, nnx_scan_model, opt_floats,
                               trained_exactly)

nnx = pytest.importorskip("flax.nnx")
PLANS = {"spafit": dict(n1=1, n2=3), "bitfit": {}, "lora": {}}


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train(model, labels, steps=3):
    """The natural NNX loop: nnx.Optimizer(wrt=trainable), nnx.grad over DiffState(0, trainable)."""
    trainable = masking.trainable(labels)
    opt = nnx.Optimizer(model, masking.stratified_optimizer(labels, SETTINGS), wrt=trainable)

    @nnx.jit
    def step(model, opt, x, y):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model, x, y)
        opt.update(model, grads)

    x, y = batch()
    for _ in range(steps):
        step(model, opt, x, y)
    return opt


@pytest.mark.parametrize("kind", ["list", "scan"])
@pytest.mark.parametrize("method", list(PLANS))
def test_nnx_trains_exactly_the_labels(kind, method):
    model = {"list": nnx_list_model, "scan": nnx_scan_model}[kind]()
    labels = masking.method_labels(model, method, **PLANS[method])
    assert isinstance(labels, nnx.State) and all(isinstance(v, str) for v in jax.tree.leaves(labels))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    opt = train(model, labels)
    trained_exactly(before, nnx.state(model, nnx.Param), labels)
    assert opt_floats(nnx.state(opt, nnx.OptState)) == 2 * n_trainable(model, labels)
    if kind == "scan":  # stacked leaves train by rows: spafit's LoRA in rows n2.., its biases in rows n1..
        lab = dict(tree_paths.path_leaves(labels))
        want = {"spafit": (3, 1), "bitfit": (None, 0), "lora": (0, None)}[method]
        for path, start in zip(("layers/attn/lora/lora_a", "layers/attn/bias"), want):
            assert (lab[path] == "frozen") if start is None else (lab[path].start, lab[path].stop) == (start, L)


def test_nnx_labels_name_what_trains():
    model = nnx_list_model()
    lab = dict(tree_paths.path_leaves(masking.spafit_labels(model, 1, 3, train_layernorm=True)))
    assert lab["layers/0/attn/bias"] == "frozen" and lab["layers/1/attn/bias"] == "bias"
    assert lab["layers/2/proj/lora_a"] == "frozen" and lab["layers/3/proj/lora_b"] == "lora"
    assert lab["layers/3/attn/lora/lora_a"] == "lora" and lab["layers/3/proj/base_module/kernel"] == "frozen"
    assert lab["layers/1/bn/scale"] == lab["layers/1/bn/bias"] == "layernorm"  # BatchNorm is a norm
    assert lab["layers/3/mix/layers/0/bias"] == "bias" and lab["head/kernel"] == "head"
    assert not any("mean" in p or "var" in p for p in lab)  # batch statistics are not parameters
    f = masking.trainable(masking.spafit_labels(model, 1, 3))
    assert f(("layers", 3, "proj", "lora_a"), None) and not f(("layers", 0, "attn", "bias"), None)
    assert f("head/bias") and not f(("layers", 1, "bn", "mean"), None)


def test_nnx_head_by_another_name():
    model = nnx_list_model(head="out_proj")
    with pytest.raises(MaskingError, match=r"no task head found.*head_pattern="):
        masking.spafit_labels(model, 1, 3)
    labels = masking.spafit_labels(model, 1, 3, head_pattern="out_proj")
    assert dict(tree_paths.path_leaves(labels))["out_proj/kernel"] == "head"
    assert "head" in masking.summary(model, labels)


def test_nnx_backward_is_pruned_below_the_trainable_layers():
    model = nnx_list_model()
    graphdef, state = nnx.split(model)
    x, y = batch()

    def flops(labels):
        trainable = masking.trainable(labels)

        def grads(state):
            return nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(nnx.merge(graphdef, state), x, y)

        return jax.jit(grads).lower(state).compile().cost_analysis()["flops"]

    full, late = flops(masking.method_labels(model, "full")), flops(masking.method_labels(model, "spafit", n1=3, n2=4))
    assert late < 0.7 * full, (late, full)
