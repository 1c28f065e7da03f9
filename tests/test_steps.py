"""The stratified optimizer (`optimizer`) and the pruned train step (`steps`)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spafit_jax import masking
from spafit_jax.training import optimizer, steps
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.methods import FROZEN
from spafit_jax.training.plan import make_plan
from spafit_jax.config.schema import MethodConfig

CFG = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=64)
TRAIN = types.SimpleNamespace(lr=1e-3, lr_by_label={"head": 2e-3}, warmup_ratio=0.1, weight_decay=0.01,
                              max_grad_norm=1.0)


def setup(method, B=8, T=32, seed=0):
    plan = make_plan(MethodConfig(name=method, n1=2, n2=4), CFG.num_hidden_layers)  # spafit: LoRA on 4, 5
    model = BertForSequenceClassification(CFG, lora=plan.lora, num_labels=3)
    params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))["params"]
    plan = plan.label(params)
    trainable, frozen = plan.split(params)
    tx = optimizer.make_optimizer(plan, TRAIN, total_steps=10)
    state = steps.init_state(trainable, tx, seed)
    rng = np.random.RandomState(seed)
    batch = {
        "input_ids": rng.randint(1, 100, (B, T)).astype(np.int32),
        "attention_mask": np.ones((B, T), np.int32),
        "token_type_ids": np.zeros((B, T), np.int32),
        "labels": rng.randint(0, 3, (B,)).astype(np.int32),
        "weights": np.ones((B,), np.float32),
    }
    return model, params, plan, tx, state, frozen, batch


def step_fn(model, tx, **kw):
    return jax.jit(lambda s, f, b: steps.train_step(s, f, b, apply_fn=model.apply, tx=tx, **kw))


def flops(method):
    model, _, _, tx, state, frozen, batch = setup(method)
    cost = step_fn(model, tx).lower(state, frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def test_spafit_step_costs_at_most_062_of_full_flops():
    """N1 = L/3, N2 = 2L/3, LoRA on query/value: the backward below N1 and the bias-only weight
    gradients are pruned by XLA (theory ~0.56 of full fine-tuning)."""
    ratio = flops("spafit") / flops("full")
    assert ratio <= 0.62, ratio
    assert flops("head_only") < flops("bitfit") < flops("full")


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def test_optimizer_state_holds_nothing_for_frozen_leaves():
    _, params, plan, _, state, _, _ = setup("spafit")
    counts = plan.counts
    trained = plan.trainable_params
    # Adam: two float32 moments per trainable parameter, plus a few scalar counters.
    assert 8 * trained <= nbytes(state.opt_state) <= 8 * trained + 256
    full = setup("full")[4]
    assert nbytes(state.opt_state) < 0.05 * nbytes(full.opt_state)
    frozen_leaves = [x for x in jax.tree_util.tree_leaves(plan.split(params)[1])]
    assert sum(x.size for x in frozen_leaves) == counts[FROZEN]


def test_train_step_updates_only_trainable_leaves_and_lowers_loss():
    model, params, plan, tx, state, frozen, batch = setup("spafit")
    step = step_fn(model, tx)
    losses = []
    for _ in range(8):
        state, out = step(state, frozen, batch)
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0]
    new = masking.join(state.trainable, frozen)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), params, new)
    for path_changed, label in zip(jax.tree_util.tree_leaves(changed), jax.tree_util.tree_leaves(plan.labels)):
        if label == FROZEN:
            assert not path_changed
    assert int(state.step) == 8


def test_grad_accumulation_matches_one_big_batch():
    model, _, _, tx, state, frozen, batch = setup("bitfit")
    nodrop = BertForSequenceClassification(
        BertConfig(**{**CFG.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}), num_labels=3)
    s1, o1 = step_fn(nodrop, tx)(state, frozen, batch)
    s2, o2 = step_fn(nodrop, tx, grad_accum=4)(state, frozen, batch)
    np.testing.assert_allclose(o1["loss"], o2["loss"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.trainable, s2.trainable)


def test_padding_examples_do_not_count():
    model, _, _, tx, state, frozen, batch = setup("bitfit")
    half = {k: v[:4] for k, v in batch.items()}
    padded = dict(batch, weights=np.array([1] * 4 + [0] * 4, np.float32))
    ev = jax.jit(lambda t, f, b: steps.eval_step(t, f, b, apply_fn=model.apply))
    np.testing.assert_allclose(ev(state.trainable, frozen, half), ev(state.trainable, frozen, padded)[:4], atol=1e-6)
    a = steps.loss_sum(ev(state.trainable, frozen, padded), padded, False)
    b = steps.loss_sum(ev(state.trainable, frozen, half), half, False)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_regression_loss_is_mse():
    logits = jnp.array([[1.0], [3.0]])
    total, count = steps.loss_sum(logits, {"labels": jnp.array([0.0, 1.0]), "weights": jnp.ones(2)}, True)
    assert float(total) == pytest.approx(5.0) and float(count) == 2


def test_schedule_warms_up_then_decays_to_zero():
    s = optimizer.schedule(1.0, total_steps=100, warmup_ratio=0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(55)) == pytest.approx(0.5) and float(s(100)) == 0.0


def test_per_label_learning_rates():
    _, _, plan, _, _, _, _ = setup("spafit")
    lrs = optimizer.learning_rates(plan, TRAIN, 10, 1)
    assert lrs["head"] == pytest.approx(2 * lrs["bias"]) and set(lrs) == {"bias", "lora", "head", "pooler"}


def test_a_non_finite_step_is_skipped_and_flagged():
    model, _, _, tx, state, frozen, batch = setup("bitfit")
    step = step_fn(model, tx)
    good, out = step(state, frozen, batch)
    assert bool(out["finite"]) and int(good.step) == 1
    bad_batch = dict(batch, weights=batch["weights"] * np.float32("nan"))
    after, out = step(good, frozen, bad_batch)
    assert not bool(out["finite"]) and not np.isfinite(float(out["loss"]))
    assert int(after.step) == 2  # the data moves on ...
    for a, b in zip(jax.tree_util.tree_leaves((good.trainable, good.opt_state)),
                    jax.tree_util.tree_leaves((after.trainable, after.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # ... the parameters do not


def test_all_finite():
    assert bool(steps.all_finite({"a": jnp.ones(3), "b": None, "n": jnp.arange(3)}))
    assert not bool(steps.all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert bool(steps.all_finite({}))
