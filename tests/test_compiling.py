"""compiling.jit: XLA's CPU backend at level 2 unless XLA_FLAGS says otherwise; the same numbers as jax.jit."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.training import compiling
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification


def test_the_cpu_backend_compiles_at_level_2_unless_xla_flags_name_a_level(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert compiling.compiler_options() == {"xla_backend_optimization_level": compiling.CPU_OPT_LEVEL}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --xla_force_host_platform_device_count=2")
    assert compiling.compiler_options() == {}


def test_the_option_reaches_the_compiler_and_changes_no_numbers(tmp_path):
    # The persistent cache keys programs by their compile options: jax.jit and compiling.jit of one
    # function are two programs, compiling.jit twice is one.
    probe = """
import pathlib, sys, jax, jax.numpy as jnp
from spafit_jax.training import compiling
f = lambda x: jnp.tanh(x @ x.T).sum()
x = jnp.ones((64, 64)); jax.block_until_ready(x)  # (its own small program)
folder = pathlib.Path(sys.argv[1])
count = lambda: len([p for p in folder.iterdir() if p.name.endswith("-cache")])
compiling.jit(f)(x); a = count()
compiling.jit(f)(x); b = count()
jax.jit(f)(x); c = count()
print(a, b, c)
"""
    from tests.parallel_worker import env

    e = {**env(1), "JAX_COMPILATION_CACHE_DIR": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    e["XLA_FLAGS"] = " ".join(f for f in e["XLA_FLAGS"].split() if "optimization_level" not in f)
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=e, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b, c = map(int, out.stdout.split())
    assert (b, c) == (a, a + 1)

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64)
    model = BertForSequenceClassification(cfg, num_labels=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, (4, 16)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]

    def fwd(p, i):
        return model.apply({"params": p}, i, jnp.ones_like(i), jnp.zeros_like(i))

    np.testing.assert_allclose(compiling.jit(fwd)(params, ids), jax.jit(fwd)(params, ids), rtol=1e-5, atol=1e-6)
