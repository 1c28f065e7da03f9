"""Tests of spafit_jax.training.plan (the trainability plan built once per run) and of the owners of each fact."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from spafit_jax import masking
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.config.files import MethodConfig
from spafit_jax.errors import MaskingError
from spafit_jax.training.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=24,
                  max_position_embeddings=32)


def params_for(plan):
    model = BertForSequenceClassification(TINY, jnp.float32, jnp.float32, plan.lora, num_labels=3)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def lora_layers(params):
    return sorted({masking.layer_index(p) for p in _paths(params) if p.endswith("lora_a")})


def _paths(tree):
    return ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_spafit_defaults_place_lora_on_the_last_third():
    plan = make_plan(MethodConfig(), TINY.num_hidden_layers)
    assert (plan.n1, plan.n2) == (2, 4)
    assert plan.lora.layers == (4, 5) and plan.lora.targets == ("query", "value") and plan.lora.rank == 8
    params = params_for(plan)
    assert lora_layers(params) == [4, 5]
    plan = plan.label(params)
    labels = dict(zip(_paths(params), jax.tree_util.tree_leaves(plan.labels)))
    assert all(v == "frozen" for p, v in labels.items() if masking.layer_index(p) in (0, 1))
    assert {v for p, v in labels.items() if masking.layer_index(p) in (2, 3)} == {"frozen", "bias"}
    assert "lora" in {v for p, v in labels.items() if masking.layer_index(p) == 5}
    assert plan.counts == masking.count_params(params, plan.labels)
    assert 0 < plan.trainable_params < plan.total_params == sum(plan.counts.values())


@pytest.mark.parametrize("name,lora_on", [("lora", list(range(6))), ("bitfit", []), ("full", []), ("head_only", [])])
def test_baselines(name, lora_on):
    plan = make_plan(MethodConfig(name=name, lora_rank=4), 6)
    assert (plan.n1, plan.n2) == (None, None)
    assert (plan.lora is not None) == bool(lora_on)
    params = params_for(plan)
    assert lora_layers(params) == lora_on
    counts = plan.label(params).counts
    if name == "full":
        assert counts.get("frozen", 0) == 0
    if name == "head_only":
        assert set(counts) == {"head", "pooler", "frozen"}


def test_describe_and_summary():
    plan = make_plan(MethodConfig(n1=1, n2=3, lora_targets=("query", "key", "value")), 6)
    params = params_for(plan)
    plan = plan.label(params)
    d = plan.describe()
    assert (d["method"], d["n1"], d["n2"]) == ("spafit", 1, 3)
    assert d["trainable_params"] == plan.trainable_params and d["params_by_label"] == plan.counts
    assert d["trainable_percent"] == pytest.approx(100 * plan.trainable_params / plan.total_params)
    text = plan.summary(params)
    assert "frozen layers 0..0, bias-only 1..2, LoRA + bias 3..5" in text and "trainable" in text


def test_stratum3_lora_only_variant_freezes_the_late_biases_only():
    both = make_plan(MethodConfig(n1=2, n2=4), 6)
    only = make_plan(MethodConfig(n1=2, n2=4, stratum3_bias=False), 6)
    params = params_for(both)
    a = dict(zip(_paths(params), jax.tree_util.tree_leaves(both.label(params).labels)))
    b = dict(zip(_paths(params), jax.tree_util.tree_leaves(only.label(params).labels)))
    changed = {p for p in a if a[p] != b[p]}
    late_biases = {p for p in a if masking.layer_index(p) in (4, 5) and p.endswith("/bias") and a[p] == "bias"}
    assert changed == late_biases and len(late_biases) > 0 and all(b[p] == "frozen" for p in changed)
    assert {v for p, v in b.items() if masking.layer_index(p) in (4, 5)} == {"frozen", "lora"}
    assert {v for p, v in b.items() if masking.layer_index(p) in (2, 3)} == {"frozen", "bias"}
    assert "LoRA only 4..5" in only.label(params).summary(params)


def test_strata_that_do_not_fit_the_model():
    with pytest.raises(MaskingError, match="method.n2=9 exceeds the 6 layers"):
        make_plan(MethodConfig(n1=2, n2=9), 6)


def test_plan_split_is_masking_split():
    plan = make_plan(MethodConfig(), 6)
    params = params_for(plan)
    plan = plan.label(params)
    trainable, frozen = plan.split(params)
    assert jax.tree_util.tree_structure(masking.join(trainable, frozen)) == jax.tree_util.tree_structure(params)


KINDS = {"full": (["all weights"] * 6, 0, ("weight", "bias", "layernorm", "head", "pooler")),
         "bitfit": (["bias only"] * 6, 0, ("bias", "head", "pooler")),
         "lora": (["LoRA"] * 6, 0, ("lora", "head", "pooler")),
         "head_only": (["frozen"] * 6, 6, ("head", "pooler")),
         "spafit": (["frozen"] * 2 + ["bias only"] * 2 + ["LoRA + bias"] * 2, 2, ("bias", "lora", "head", "pooler"))}


@pytest.mark.parametrize("method", list(KINDS))
def test_the_plan_answers_layer_kinds_frozen_depth_and_trainable_labels(method):
    """The plan is the one owner of strata: the report's picture, the cache's depth and the optimizer's groups."""
    extra = {"train_layernorm": True} if method == "full" else {}
    plan = make_plan(MethodConfig(name=method, **extra), 6)
    plan = plan.label(params_for(plan))
    kinds, depth, labels = KINDS[method]
    assert plan.layer_kinds() == kinds and plan.frozen_depth == depth and plan.trainable_labels == labels
    assert plan.describe()["layer_kinds"] == kinds
    lora_only = make_plan(MethodConfig(n1=1, n2=3, stratum3_bias=False), 6)
    assert lora_only.label(params_for(lora_only)).layer_kinds() == ["frozen", "bias only", "bias only"] + ["LoRA"] * 3


# --- one owner per fact -----------------------------------------------------------------------------

# (what, a literal that only its owner writes, the owner)
FACTS = [
    ("methods", r'"full",\s*"bitfit"', "spafit_jax/methods.py"),
    ("trainable labels", r'"weight",\s*"bias",\s*"layernorm"', "spafit_jax/methods.py"),
    ("LoRA targets", r'"attention_output",\s*"intermediate"', "spafit_jax/methods.py"),
    ("GLUE tasks", r'"sst2"', "spafit_jax/data/tasks.py"),
    ("paddings", r'"bucket",\s*"max_length"', "spafit_jax/data/batching.py"),
    ("parallel modes", r'"mesh",\s*"pmap"', "spafit_jax/config/schema.py"),
    ("dtypes", r'"float32",\s*"bfloat16"', "spafit_jax/config/schema.py"),
    ("the frozen label", r'"frozen"', "spafit_jax/methods.py"),
]


@pytest.mark.parametrize("what,literal,owner", FACTS, ids=[f[0] for f in FACTS])
def test_each_list_is_written_once(what, literal, owner):
    sources = sorted((ROOT / "spafit_jax").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    holders = [p.relative_to(ROOT).as_posix() for p in sources if re.search(literal, p.read_text())]
    assert holders == [owner], f"{what} written in {holders}; only {owner} may list them"
