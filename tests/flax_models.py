"""Small Flax models of the shapes other projects use, and the check that a few steps train exactly the labels.

NNX with `nnx.List` layers and with `nnx.vmap`-stacked layers run by `nnx.scan`, a linen model with
`nn.scan` over its layers, and a non-BERT linen model whose layers use spafit_jax's LoRA wrapper.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spafit_jax import masking, tree_paths

H, R, C, L = 8, 2, 3, 4  # hidden, LoRA rank, classes, layers
SETTINGS = {k: {"learning_rate": 0.05, "weight_decay": 0.01} for k in ("bias", "lora", "head", "layernorm", "weight")}


def nnx_list_model(head="head"):
    """NNX: nnx.List of layers with nnx.LoRALinear, nnx.LoRA around a Linear, BatchNorm and a head."""
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.LoRALinear(H, H, lora_rank=R, rngs=rngs)
            self.mix = nnx.Sequential(nnx.Linear(H, H, rngs=rngs))
            self.proj = nnx.LoRA(H, R, H, base_module=nnx.Linear(H, H, rngs=rngs), rngs=rngs)
            self.bn = nnx.BatchNorm(H, rngs=rngs)

        def __call__(self, x):
            return x + self.bn(self.proj(jax.nn.gelu(self.attn(x) + self.mix(x))), use_running_average=True)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Layer(rngs) for _ in range(L)])
            setattr(self, head, nnx.Linear(H, C, rngs=rngs))
            self.head_name = head

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return getattr(self, self.head_name)(x)

    return Model(nnx.Rngs(0))


def nnx_scan_model():
    """NNX: layers stacked by nnx.vmap (one row per layer) and run by nnx.scan, nnx.LoRALinear and RMSNorm."""
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.LoRALinear(H, H, lora_rank=R, rngs=rngs)
            self.norm = nnx.RMSNorm(H, rngs=rngs)

        def __call__(self, x):
            return x + self.norm(jax.nn.gelu(self.attn(x)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Layer(rngs)

            self.layers = make(rngs)
            self.head = nnx.Linear(H, C, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, layer):
                return layer(x)

            return self.head(body(x, self.layers))

    return Model(nnx.Rngs(0))


def linen_scan_model():
    """linen: nn.scan over L blocks (parameters stacked on axis 0 under ScanBlock_0), LoRA wrapper inside."""
    import flax.linen as nn

    from spafit_jax.lora import LoRA

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = LoRA(nn.Dense(H, parent=None), rank=R, alpha=4.0, name="attn")(x)
            return x + nn.LayerNorm(name="ln")(jax.nn.gelu(h)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True}, length=L)
            x, _ = scan()(x, None)
            return nn.Dense(C, name="classifier")(x)

    return Model()


def linen_lora_model():
    """linen, not BERT: blocks_<i> with the LoRA wrapper around Dense ("mix") and DenseGeneral ("heads")."""
    import flax.linen as nn

    from spafit_jax.lora import LoRA

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = LoRA(nn.Dense(H, parent=None), rank=R, alpha=4.0, name="mix")(x)
            h = LoRA(nn.DenseGeneral((2, H // 2), parent=None), rank=R, alpha=2.0, rslora=True, name="heads")(jax.nn.gelu(h))
            return x + nn.RMSNorm(name="rms_norm")(h.reshape(x.shape))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(L):
                x = Block(name=f"blocks_{i}")(x)
            return nn.Dense(C, name="head")(x)

    return Model()


def batch(seed=0, n=6):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, H)), jnp.float32), jnp.asarray(rng.integers(0, C, n))


def opt_floats(state):
    """Number of floating-point numbers in an optimizer state (Adam's mu and nu)."""
    return sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


def trained_exactly(before, after, labels):
    """Asserts that a leaf (a row of a stacked leaf) changed iff its label trains it."""
    lookup = dict(tree_paths.path_leaves(labels))
    for (path, a), (_, b) in zip(tree_paths.path_leaves(before), tree_paths.path_leaves(after)):
        a, b, label = np.asarray(a), np.asarray(b), lookup[path]
        if isinstance(label, masking.Rows):
            rows = np.moveaxis(a, label.axis, 0), np.moveaxis(b, label.axis, 0)
            got = [not np.array_equal(x, y) for x, y in zip(*rows)]
            want = [label.start <= r < label.stop for r in range(len(got))]
            assert got == want, (path, label, got)
        else:
            assert (not np.array_equal(a, b)) == (label != "frozen"), (path, label)


def n_trainable(params, labels):
    return sum(n for k, n in masking.count_params(params, labels).items() if k != "frozen")


def linen_train(model_fn, params, labels, steps=3):
    """A few AdamW steps of the linen split/join loop; returns (new params, optimizer state)."""
    x, y = batch()
    trainable, frozen = masking.split(params, labels)
    tx = masking.stratified_optimizer(labels, SETTINGS)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model_fn(masking.join(t, frozen), x), y).mean()
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return masking.join(trainable, frozen), state
