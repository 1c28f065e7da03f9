"""Shared fixtures: tiny models written by the tests themselves, and the reference-test policy.

Tests marked `reference` compare with PyTorch transformers / peft. Without torch they skip,
except when SPAFIT_REQUIRE_REFERENCE=1 (set by .ci/run), where a missing peer is a failure.
"""

import importlib.util
import os
import shutil

import pytest

REQUIRE_REFERENCE = os.environ.get("SPAFIT_REQUIRE_REFERENCE") == "1"

# Many tests compile the same tiny-model steps: share compiled executables between tests,
# xdist workers and the subprocesses they start (same machine, same jax).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
TINY = dict(
    vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
)


@pytest.fixture(autouse=True)
def _reference_policy(request):
    if "reference" not in request.keywords:
        return
    missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
    if missing and REQUIRE_REFERENCE:
        pytest.fail(f"SPAFIT_REQUIRE_REFERENCE=1 but {missing} is not installed; run `make test`")
    if missing:
        pytest.skip(f"reference peer not installed: {missing}")


@pytest.fixture(scope="session")
def minilm_dir():
    from spafit_jax.models.hf import resolve

    return resolve("minilm")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT (3 layers, hidden 32) with MiniLM's tokenizer, saved as flax_model.msgpack."""
    import jax

    from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
    from spafit_jax.models.hf import save_pretrained

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(**TINY)
    params = BertForSequenceClassification(config, num_labels=2).init(
        jax.random.key(0), jax.numpy.zeros((1, 8), "int32")
    )["params"]
    params = {"bert": params["bert"]}  # a base model: the head is the task's
    save_pretrained(folder, config, params)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder
