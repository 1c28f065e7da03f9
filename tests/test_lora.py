"""LoRA: parameter paths, fresh-adapter identity, init, merge/unmerge, dropout, bad input, and PEFT."""

import importlib.util
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.errors import ConfigError
from spafit_jax.models.hf import load_pretrained
from spafit_jax.lora import TARGETS, LoRA, LoRAConfig, adapters, merge, unmerge
from tests.conftest import TINY
from tests.test_hf import inputs  # the shared padded, sentence-pair batch

CFG = BertConfig(**dict(TINY, vocab_size=120))  # 3 layers, hidden 32, intermediate 37
L = CFG.num_hidden_layers
NUM_LABELS = 3
# LoRA target -> its module inside encoder/layer/<i>, and the (in, out) features of its kernel
MODULE = {"query": "attention/self/query", "key": "attention/self/key", "value": "attention/self/value",
          "attention_output": "attention/output/dense", "intermediate": "intermediate/dense", "output": "output/dense"}
FEATURES = {"query": (32, 32), "key": (32, 32), "value": (32, 32), "attention_output": (32, 32),
            "intermediate": (32, 37), "output": (37, 32)}


def model_for(lora, config=CFG):
    return BertForSequenceClassification(config, lora=lora, num_labels=NUM_LABELS)


def shapes_tree(lora, config=CFG):
    """A model's parameter tree of ShapeDtypeStructs, traced only (no compute)."""
    model = model_for(lora, config)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))


def shapes(lora, config=CFG):
    """{path: shape} of a model's parameters."""
    return {"/".join(k): v.shape for k, v in flatten_dict(shapes_tree(lora, config)).items()}


def init(lora, seed=0, config=CFG):
    """(model, params). Eager on purpose: the ops are compiled once for the whole file, whereas
    jitting an unrolled init compiles the whole graph again for every configuration."""
    model = model_for(lora, config)
    return model, model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]


ALL8 = LoRAConfig(rank=8, alpha=16.0, targets=TARGETS)


@pytest.fixture(scope="module")
def plain():
    return init(None)


@pytest.fixture(scope="module")
def all8():
    return init(ALL8)


def flat(tree):
    return {"/".join(map(str, k)): v for k, v in flatten_dict(tree).items()}


def lora_paths(paths):
    return {p for p in paths if p.endswith(("lora_a", "lora_b"))}


def expected_lora_paths(targets, layers=range(L)):
    return {f"bert/encoder/layer/{i}/{MODULE[t]}/{leaf}" for i in layers for t in targets for leaf in ("lora_a", "lora_b")}


def randomize_b(params, seed=1, std=0.3, perturb=0.0):
    """B set to random non-zero values, so the adapters change the output; with `perturb`, noise
    of that size on every other leaf too (fresh biases are 0 and the fresh head gives logits ~0.01)."""
    rng = np.random.RandomState(seed)
    f = {p: (std * rng.randn(*v.shape) if p.endswith("lora_b") else v + perturb * rng.randn(*v.shape)).astype(v.dtype)
         for p, v in sorted(flat(params).items())}
    return unflatten_dict({tuple(p.split("/")): jnp.asarray(v) for p, v in f.items()})


def with_adapters(params, ad):
    """params with the adapter leaves of `ad` ({module path: {lora_a, lora_b}}) put in."""
    f = flat(params)
    f.update({f"{m}/{k}": v for m, leaves in ad.items() for k, v in leaves.items()})
    return unflatten_dict({tuple(p.split("/")): v for p, v in f.items()})


LABELS = np.array([0, 2, 1], np.int32)


def apply(model, params, **kw):
    return np.asarray(model.apply({"params": params}, *inputs(), **kw))


# ---- parameter paths ------------------------------------------------------------------------


def test_query_value_adapters_sit_beside_kernel_and_bias():
    plain = shapes(None)
    wrapped = shapes(LoRAConfig(rank=4, targets=("query", "value")))
    assert lora_paths(wrapped) == expected_lora_paths(("query", "value"))
    for i in range(L):
        for t in ("query", "value"):
            prefix = f"bert/encoder/layer/{i}/attention/self/{t}"
            assert wrapped[f"{prefix}/kernel"] == (32, 32) and wrapped[f"{prefix}/bias"] == (32,)
            assert wrapped[f"{prefix}/lora_a"] == (32, 4)  # in x r
            assert wrapped[f"{prefix}/lora_b"] == (4, 32)  # r x out
    # every other leaf keeps its path and shape
    assert {p: s for p, s in wrapped.items() if p not in lora_paths(wrapped)} == plain


@pytest.mark.parametrize("target", ["key", "attention_output", "intermediate", "output"])
def test_each_target_wraps_its_module(target):
    wrapped = shapes(LoRAConfig(rank=3, targets=(target,)))
    assert lora_paths(wrapped) == expected_lora_paths((target,))
    fin, fout = FEATURES[target]
    prefix = f"bert/encoder/layer/1/{MODULE[target]}"
    assert wrapped[f"{prefix}/kernel"] == (fin, fout)
    assert wrapped[f"{prefix}/lora_a"] == (fin, 3) and wrapped[f"{prefix}/lora_b"] == (3, fout)


def test_all_targets_and_layers_subset():
    wrapped = shapes(LoRAConfig(rank=2, targets=TARGETS, layers=(1, 2)))
    assert lora_paths(wrapped) == expected_lora_paths(TARGETS, layers=(1, 2))
    assert not any("layer/0/" in p for p in lora_paths(wrapped))
    assert {p: s for p, s in wrapped.items() if p not in lora_paths(wrapped)} == shapes(None)


def test_rank_pattern_gives_per_module_ranks_first_match_wins():
    cfg = LoRAConfig(rank=4, targets=("query", "value"), layers=(1, 2),
                     rank_pattern={"layer/2/value": 2, "value": 6, "layer/1/query": 1})
    assert [cfg.rank_for(i, t) for i in (1, 2) for t in ("query", "value")] == [1, 6, 4, 2]
    wrapped = shapes(cfg)
    got = {(i, t): wrapped[f"bert/encoder/layer/{i}/attention/self/{t}/lora_a"][1]
           for i in (1, 2) for t in ("query", "value")}
    assert got == {(1, "query"): 1, (1, "value"): 6, (2, "query"): 4, (2, "value"): 2}
    for (i, t), r in got.items():
        assert wrapped[f"bert/encoder/layer/{i}/attention/self/{t}/lora_b"] == (r, 32)


def test_rank_pattern_accepts_pairs_and_mapping_alike():
    a = LoRAConfig(rank_pattern={"layer/1/value": 2})
    b = LoRAConfig(rank_pattern=[["layer/1/value", 2]])
    assert a == b and a.rank_pattern == (("layer/1/value", 2),)
    hash(a)  # usable as a static module attribute
    assert LoRAConfig(targets="value").targets == ("value",)  # one name, not its letters
    assert LoRAConfig(targets=["query", "key"], layers=[np.int64(2)]).layers == (2,)


def test_without_lora_the_tree_and_values_are_the_plain_ones(plain, all8):
    assert model_for(None) == BertForSequenceClassification(CFG, num_labels=NUM_LABELS)
    assert shapes(None) == {p: v.shape for p, v in flat(plain[1]).items()}
    # the same seed gives the same base weights with or without adapters
    fw = flat(all8[1])
    assert set(fw) - lora_paths(fw) == set(flat(plain[1]))
    for p, v in flat(plain[1]).items():
        np.testing.assert_array_equal(fw[p], v, err_msg=p)


def test_hugging_face_weights_load_unchanged_into_the_wrapped_model(tiny_model_dir):
    from flax.serialization import msgpack_restore

    saved = flat(msgpack_restore((tiny_model_dir / "flax_model.msgpack").read_bytes()))
    cfg = LoRAConfig(rank=4, targets=("query", "value", "intermediate"), layers=(1, 2))
    model, wrapped = load_pretrained(tiny_model_dir, num_labels=2, lora=cfg)
    fw = flat(wrapped)
    assert lora_paths(fw) == expected_lora_paths(cfg.targets, cfg.layers)
    assert set(fw) - lora_paths(fw) == set(saved) | {"classifier/kernel", "classifier/bias"}
    for p, v in saved.items():  # every pre-trained leaf, bit for bit
        np.testing.assert_array_equal(fw[p], v, err_msg=p)
    for p in lora_paths(fw):
        if p.endswith("lora_b"):
            assert not np.any(fw[p]), p
        else:
            assert np.all(np.abs(fw[p]) > 0), p
    # a fresh adapter changes no output (B = 0)
    plain = {k: v for k, v in fw.items() if k not in lora_paths(fw)}
    plain = unflatten_dict({tuple(p.split("/")): v for p, v in plain.items()})
    ids, mask, types = inputs(vocab=model.config.vocab_size)
    np.testing.assert_array_equal(
        np.asarray(model.apply({"params": wrapped}, ids, mask, types)),
        np.asarray(BertForSequenceClassification(model.config, num_labels=2).apply({"params": plain}, ids, mask, types)))


# ---- fresh adapter and init -----------------------------------------------------------------


def test_fresh_adapter_leaves_logits_identical(plain, all8):
    fw = flat(all8[1])
    assert all(not np.any(fw[p]) for p in lora_paths(fw) if p.endswith("lora_b"))
    np.testing.assert_array_equal(apply(*all8), apply(*plain))


def test_a_is_kaiming_uniform_as_peft(all8):
    """PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in) = U(-1/sqrt(in), 1/sqrt(in))."""
    samples = {32: [], 37: []}
    a0 = {p: np.asarray(v) for p, v in flat(all8[1]).items() if p.endswith("lora_a")}
    for v in a0.values():
        samples[v.shape[0]].append(v.ravel())
    # different modules get different draws
    assert len({v.tobytes() for v in a0.values()}) == len(a0)
    for fan_in, chunks in samples.items():
        x = np.concatenate(chunks)
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(x).max() <= bound + 1e-7
        assert np.abs(x).max() > 0.97 * bound  # fills the interval
        assert abs(x.mean()) < 0.05 * bound
        assert abs(x.std() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b)
        hist, _ = np.histogram(x, bins=5, range=(-bound, bound))
        np.testing.assert_allclose(hist / x.size, 0.2, atol=0.04)  # flat, not normal


# ---- the LoRA module on its own ------------------------------------------------------------


def _lora_module(rslora=False, dropout=0.0, rank=4, alpha=6.0):
    mod = LoRA(nn.Dense(5, parent=None), rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
    x = jax.random.normal(jax.random.key(3), (2, 7, 6))
    params = mod.init(jax.random.key(0), x)["params"]
    params = dict(params, lora_b=jax.random.normal(jax.random.key(4), (rank, 5)))
    return mod, params, x


@pytest.mark.parametrize("rslora", [False, True])
def test_module_output_and_scaling(rslora):
    mod, p, x = _lora_module(rslora=rslora, rank=4, alpha=6.0)
    assert set(p) == {"kernel", "bias", "lora_a", "lora_b"}
    assert p["lora_a"].shape == (6, 4) and p["lora_b"].shape == (4, 5)
    scale = 6.0 / (2.0 if rslora else 4.0)
    assert LoRAConfig(rank=4, alpha=6.0, rslora=rslora).scaling(4) == scale
    want = x @ p["kernel"] + p["bias"] + scale * (x @ p["lora_a"]) @ p["lora_b"]
    np.testing.assert_allclose(mod.apply({"params": p}, x), want, atol=1e-5)


def test_scaling_alpha_over_r_vs_sqrt_r():
    assert LoRAConfig(rank=16, alpha=32.0).scaling(16) == 2.0
    assert LoRAConfig(rank=16, alpha=32.0, rslora=True).scaling(16) == 8.0
    assert LoRAConfig(rank=16, alpha=32.0, rslora=True).scaling(4) == 16.0  # per-module rank


def test_dropout_only_when_not_deterministic():
    mod, p, x = _lora_module(dropout=0.5)
    det = mod.apply({"params": p}, x)
    assert np.array_equal(det, mod.apply({"params": p}, x, deterministic=True))
    drop = lambda seed: mod.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})  # noqa: E731
    assert not np.allclose(drop(0), det, atol=1e-3)
    assert not np.allclose(drop(0), drop(1), atol=1e-3)
    np.testing.assert_array_equal(drop(0), drop(0))
    # only the adapter branch is dropped: with B = 0 the output is the base output
    p0 = dict(p, lora_b=jnp.zeros_like(p["lora_b"]))
    np.testing.assert_array_equal(
        mod.apply({"params": p0}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}),
        x @ p0["kernel"] + p0["bias"])


def test_dropout_in_the_model_only_when_not_deterministic():
    config = BertConfig(**dict(TINY, vocab_size=120, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model, params = init(LoRAConfig(rank=4, dropout=0.5), config=config)
    params = randomize_b(params, perturb=0.1)
    rngs = {"dropout": jax.random.key(0)}
    det = apply(model, params)
    np.testing.assert_array_equal(apply(model, params, deterministic=True), det)
    assert not np.allclose(apply(model, params, deterministic=False, rngs=rngs), det, atol=1e-4)
    no_drop = model_for(LoRAConfig(rank=4, dropout=0.0), config)
    np.testing.assert_allclose(apply(no_drop, params, deterministic=False, rngs=rngs), det, atol=1e-6)


# ---- merge / unmerge ------------------------------------------------------------------------

MERGE_CASES = {
    "query_value": LoRAConfig(rank=4, alpha=12.0),
    "all_rslora_patterns": LoRAConfig(rank=4, alpha=12.0, targets=TARGETS, layers=(1, 2), rslora=True,
                                      rank_pattern={"layer/2/(value|output)": 2}),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_unmerge(case):
    cfg = MERGE_CASES[case]
    model, fresh = init(cfg)
    params = randomize_b(fresh, perturb=0.1)
    base = apply(model, randomize_b(fresh, perturb=0.1, std=0.0))  # the same weights, B = 0
    plain_model = model_for(None)
    merged = merge(params, cfg)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(shapes_tree(None))
    lora_logits = apply(model, params)
    assert np.abs(lora_logits).max() > 0.3 and np.abs(lora_logits - base).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(apply(plain_model, merged), lora_logits, atol=1e-5)
    # only adapted kernels change
    fp, fm = flat(params), flat(merged)
    changed = {p for p in fm if not np.array_equal(fm[p], fp[p])}
    assert changed == {p.replace("lora_a", "kernel") for p in lora_paths(fp) if p.endswith("lora_a")}
    # merge does not modify its input
    assert "lora_a" in params["bert"]["encoder"]["layer"]["2"]["attention"]["self"]["value"]

    ad = adapters(params)
    assert set(ad) == {p.rsplit("/", 1)[0] for p in lora_paths(fp)}
    restored = unmerge(merged, ad, cfg)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    fr = flat(restored)
    for p, v in fp.items():
        np.testing.assert_allclose(fr[p], v, rtol=0, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(apply(model, restored), lora_logits, atol=1e-5)


def test_merge_matches_scaling_of_the_forward_pass():
    """merge with rslora on must fold alpha/sqrt(r); with the wrong config it would not match."""
    cfg = LoRAConfig(rank=4, alpha=12.0, rslora=True)
    model, params = init(cfg)
    params = randomize_b(params, perturb=0.1)
    logits = apply(model, params)
    np.testing.assert_allclose(apply(model_for(None), merge(params, cfg)), logits, atol=1e-5)
    wrong = merge(params, LoRAConfig(rank=4, alpha=12.0))
    assert np.abs(apply(model_for(None), wrong) - logits).max() > 1e-3


def test_merge_unmerge_on_frozen_and_wrapped_trees(all8):
    from flax.core import freeze

    params = randomize_b(all8[1])
    want = flat(merge(params, ALL8))

    def same(tree):
        got = flat(tree)
        return set(got) == set(want) and all(np.array_equal(got[p], want[p]) for p in want)

    assert same(merge(freeze(params), ALL8))
    wrapped = {"params": freeze(params)}  # a variables dict, as model.init returns it
    merged = merge(wrapped, ALL8)
    assert same(merged["params"])
    ad = adapters(wrapped)
    assert len(ad) == 6 * L and all(k.startswith("params/bert/encoder/layer/") for k in ad)
    for p, v in flat(unmerge(merged, ad, ALL8)["params"]).items():
        np.testing.assert_allclose(v, flat(params)[p], rtol=0, atol=1e-6, err_msg=p)


def test_unmerge_with_adapters_of_another_tree_fails():
    _, params = init(LoRAConfig(rank=2))
    ad = {"bert/encoder/layer/9/attention/self/query": adapters(params)["bert/encoder/layer/0/attention/self/query"]}
    with pytest.raises(ConfigError, match="layer/9"):
        unmerge(merge(params, LoRAConfig(rank=2)), ad, LoRAConfig(rank=2))


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "8"])
def test_bad_rank(rank):
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=rank)


@pytest.mark.parametrize("rank", [0, -2, 2.0])
def test_bad_rank_in_pattern(rank):
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoRAConfig(rank_pattern={"value": rank})


def test_unknown_target_lists_the_modules_that_exist():
    with pytest.raises(ConfigError) as e:
        LoRAConfig(targets=("query", "dense"))
    assert "dense" in str(e.value)
    for t in TARGETS:
        assert t in str(e.value)
    with pytest.raises(ConfigError, match="empty"):
        LoRAConfig(targets=())


@pytest.mark.parametrize("layers", [(3,), (1, 5), (-1,)])
def test_layers_out_of_range(layers):
    cfg = LoRAConfig(layers=layers)
    with pytest.raises(ConfigError, match=r"do not exist.*0\.\.2"):
        cfg.validate(L)
    with pytest.raises(ConfigError, match="do not exist"):
        shapes(cfg)


@pytest.mark.parametrize("layers", [(1.5,), ("a",), (True,)])
def test_layers_must_be_integers(layers):
    with pytest.raises(ConfigError, match="layers"):
        LoRAConfig(layers=layers)


@pytest.mark.parametrize("pattern", ["layer/7/value", "key", "layer/0/query"])
def test_rank_pattern_that_matches_nothing(pattern):
    # 'key' is not a target; layer 0 is not wrapped
    cfg = LoRAConfig(targets=("query", "value"), layers=(1, 2), rank_pattern={pattern: 2})
    with pytest.raises(ConfigError, match=re.escape(repr(pattern)) + ".*layer/1/query"):
        shapes(cfg)


def test_rank_pattern_that_is_not_a_regex():
    with pytest.raises(ConfigError, match="regular expression"):
        LoRAConfig(rank_pattern={"layer/(1": 2})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_bad_dropout(dropout):
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=dropout)


def test_bad_lora_fails_in_load_pretrained(tiny_model_dir):
    with pytest.raises(ConfigError, match="do not exist"):
        load_pretrained(tiny_model_dir, num_labels=2, lora=LoRAConfig(layers=(3,)))


# ---- against PEFT on PyTorch ---------------------------------------------------------------

PEFT_CASES = {
    # name: (our config, PEFT keyword arguments)
    "query_value": (LoRAConfig(rank=4, alpha=12.0), dict(target_modules=["query", "value"])),
    # SPAFIT's stratum 3: the late layers only; rsLoRA and a per-module rank on top
    "late_layers_rslora_rank_pattern": (
        LoRAConfig(rank=4, alpha=12.0, layers=(1, 2), rslora=True, rank_pattern={"layer/2/value": 2}),
        dict(target_modules=["query", "value"], layers_to_transform=[1, 2], use_rslora=True,
             rank_pattern={r"layer\.2\.attention\.self\.value": 2})),
    "all_targets_rank_pattern": (
        LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, layers=(2,), rank_pattern={"layer/2/(value|intermediate)": 2}),
        # PEFT refuses layers_to_transform with a regex target: the regex names layer 2 itself
        dict(target_modules=r".*\.layer\.2\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                            r"|intermediate\.dense|output\.dense)",
             rank_pattern={r"layer\.2\.(attention\.self\.value|intermediate\.dense)": 2})),
}
TORCH_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory):
    """A random PyTorch BertForSequenceClassification (all weights perturbed) saved as safetensors."""
    if importlib.util.find_spec("torch") is None:
        return None  # module fixtures come before conftest's reference policy, which then skips or fails
    import torch
    from transformers import BertConfig as TorchConfig
    from transformers import BertForSequenceClassification as TorchBert

    torch.manual_seed(0)
    model = TorchBert(TorchConfig(**dict(TINY, vocab_size=120), num_labels=NUM_LABELS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("torch_bert")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def torch_weights(torch_dir):
    """The torch model's weights mapped to our layout (what `load_pretrained` reads; its `lora=` is tested above)."""
    from spafit_jax.models.weights import read_weights

    if torch_dir is None:
        return None
    return {p: jnp.asarray(v) for p, v in read_weights(torch_dir).items() if not p.endswith("position_ids")}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_logits_and_gradients_match_peft(torch_dir, torch_weights, case):
    import optax
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import BertForSequenceClassification as TorchBert

    cfg, peft_kw = PEFT_CASES[case]
    model, fresh = init(cfg, seed=2)
    f = flat(fresh)
    assert set(f) - lora_paths(f) == set(torch_weights)
    f.update({p: v.astype(f[p].dtype) for p, v in torch_weights.items()})  # the torch weights, our fresh adapters
    params = randomize_b(unflatten_dict({tuple(p.split("/")): v for p, v in f.items()}))
    ad = adapters(params)

    ref = get_peft_model(TorchBert.from_pretrained(str(torch_dir)),
                         PeftConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, **peft_kw)).eval()
    peft_modules = {name[: -len(".lora_A")] for name, _ in ref.named_modules() if name.endswith(".lora_A")}
    assert peft_modules == {TORCH_PREFIX + p.replace("/", ".") for p in ad}  # PEFT wraps exactly what we wrap
    torch_ab = {}
    with torch.no_grad():
        for path, v in ad.items():
            mod = ref.get_submodule(TORCH_PREFIX + path.replace("/", "."))
            lora_a, lora_b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # (r, in), (out, r)
            assert mod.scaling["default"] == cfg.scaling(v["lora_a"].shape[1]), path
            bound = 1 / math.sqrt(lora_a.shape[1])  # both initialise A from U(-1/sqrt(in), 1/sqrt(in))
            assert lora_a.abs().max() <= bound and np.abs(v["lora_a"]).max() <= bound
            lora_a.copy_(torch.tensor(np.array(v["lora_a"]).T))
            lora_b.copy_(torch.tensor(np.array(v["lora_b"]).T))
            torch_ab[path] = lora_a, lora_b

    ids, mask, types = inputs()
    kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types, dtype=torch.long))
    with torch.no_grad(), ref.disable_adapter():
        base = ref(**kw).logits.numpy()
    out = ref(**kw).logits
    loss = torch.nn.functional.cross_entropy(out, torch.tensor(LABELS, dtype=torch.long))
    loss.backward()
    logits = apply(model, params)
    assert np.abs(out.detach().numpy() - base).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(logits, out.detach().numpy(), atol=1e-5)

    def our_loss(ad_leaves):  # differentiate the adapters only
        logits = model.apply({"params": with_adapters(params, ad_leaves)}, ids, mask, types)
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

    value, grads = jax.jit(jax.value_and_grad(our_loss))(ad)
    np.testing.assert_allclose(float(value), loss.item(), atol=1e-5)
    for path, (lora_a, lora_b) in torch_ab.items():
        np.testing.assert_allclose(grads[path]["lora_a"], lora_a.grad.numpy().T, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(grads[path]["lora_b"], lora_b.grad.numpy().T, atol=1e-4, err_msg=path)


def test_merge_reads_the_scalings_the_model_recorded_and_refuses_a_config_that_disagrees():
    cfg = LoRAConfig(rank=4, alpha=12.0, rslora=True, rank_pattern={"layer/2/value": 2})
    model = model_for(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    record = flat(variables["lora"])
    assert record["bert/encoder/layer/2/attention/self/value/scaling"] == pytest.approx(12.0 / math.sqrt(2))
    params = randomize_b(variables["params"], perturb=0.1)
    logits = apply(model, params)
    merged = merge({"params": params, "lora": variables["lora"]})
    assert set(merged) == {"params"}
    np.testing.assert_allclose(apply(model_for(None), merged["params"]), logits, atol=1e-5)
    with pytest.raises(ConfigError, match=r"merge: the LoRAConfig gives scaling .* was built with"):
        merge({"params": params, "lora": variables["lora"]}, LoRAConfig(rank=4, alpha=12.0, rank_pattern={"layer/2/value": 2}))
    with pytest.raises(ConfigError, match=r"has rank 4 but the LoRAConfig gives rank\(s\) \[8\]"):
        merge(params, LoRAConfig())  # a default config cannot shift the logits
