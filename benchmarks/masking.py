"""spafit_jax.masking on models of other shapes: scanned vs unrolled layers, and NNX's pruned backward.

Prints one JSON line per measurement:
- `scanned_vs_unrolled`: the same pre-LN transformer-like stack (L blocks, LoRA on the mixing Dense)
  unrolled (blocks_0 ... blocks_{L-1}) and under `nn.scan` (one row per layer), trained with SPAFIT:
  optimizer-state bytes (unrolled, scanned with rows sliced, and what the scanned state would be if
  whole stacked leaves were kept), the median step time and the compile time (XLA's cost analysis
  counts a loop body once, so FLOPs do not compare a scan with its unrolled twin).
- `nnx_flops`: the FLOPs of an NNX train step (nnx.grad over DiffState(0, trainable)) for SPAFIT,
  BitFit, LoRA and full fine-tuning, against full.

    .venv/bin/python benchmarks/masking.py --layers 12 --dim 256 --batch 16 --seq 64 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, environment, median  # noqa: E402

from spafit_jax import masking, tree_paths  # noqa: E402
from spafit_jax.lora import LoRA  # noqa: E402
from spafit_jax.methods import FROZEN, TRAINABLE_LABELS  # noqa: E402

SETTINGS = {k: {"learning_rate": 1e-3, "weight_decay": 0.01} for k in TRAINABLE_LABELS}


class Block(nn.Module):
    dim: int
    rank: int

    @nn.compact
    def __call__(self, x, _=None):
        h = LoRA(nn.Dense(self.dim, parent=None), rank=self.rank, alpha=2.0 * self.rank, name="mix")(nn.LayerNorm(name="ln")(x))
        x = x + nn.Dense(self.dim, name="out")(nn.gelu(nn.Dense(4 * self.dim, name="up")(nn.gelu(h))))
        return x, None


class Unrolled(nn.Module):
    layers: int
    dim: int
    rank: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x, _ = Block(self.dim, self.rank, name=f"blocks_{i}")(x)
        return nn.Dense(4, name="head")(x.mean(axis=1))


class Scanned(Unrolled):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = scan(self.dim, self.rank, name="blocks")(x, None)
        return nn.Dense(4, name="head")(x.mean(axis=1))


def _bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _time(step, args, steps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    out = step(*args)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return compile_s, times


def linen_case(model, x, y, n1: int, n2: int, steps: int) -> dict:
    params = model.init(jax.random.key(0), x)["params"]
    labels = masking.spafit_labels(params, n1, n2)
    trainable, frozen = masking.split(params, labels)
    tx = masking.stratified_optimizer(labels, SETTINGS)
    state = tx.init(trainable)

    def step(trainable, state, frozen, x, y):
        loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": masking.join(t, frozen)}, x), y).mean()
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    jitted = jax.jit(step)
    compile_s, times = _time(jitted, (trainable, state, frozen, x, y), steps)
    whole = sum(x.size for (_, x), (_, l) in zip(tree_paths.path_leaves(params), tree_paths.path_leaves(labels)) if l != FROZEN)
    counts = masking.count_params(params, labels)
    return {"opt_state_bytes": _bytes(state), "opt_state_bytes_whole_leaves": 2 * 4 * whole,
            "trainable_params": sum(v for k, v in counts.items() if k != FROZEN),
            "compile_s": compile_s, "step_ms_median": 1e3 * median(times)}


def nnx_flops(layers: int, dim: int, rank: int, x, y) -> dict:
    from flax import nnx

    class NBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(dim, rngs=rngs)
            self.mix = nnx.LoRALinear(dim, dim, lora_rank=rank, rngs=rngs)
            self.up, self.out = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

        def __call__(self, x):
            return x + self.out(nnx.gelu(self.up(nnx.gelu(self.mix(self.ln(x))))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([NBlock(rngs) for _ in range(layers)])
            self.head = nnx.Linear(dim, 4, rngs=rngs)

        def __call__(self, x):
            for block in self.layers:
                x = block(x)
            return self.head(x.mean(axis=1))

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    out = {}
    n1, n2 = masking.resolve_strata(layers)
    for method in ("full", "spafit", "bitfit", "lora"):
        model = Net(nnx.Rngs(0))
        labels = masking.method_labels(model, method, **(dict(n1=n1, n2=n2) if method == "spafit" else {}))
        trainable = masking.trainable(labels)
        opt = nnx.Optimizer(model, masking.stratified_optimizer(labels, SETTINGS), wrt=trainable)

        @nnx.jit
        def step(model, opt, x, y):
            grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model, x, y)
            opt.update(model, grads)

        cost = step.lower(model, opt, x, y).compile().cost_analysis()
        out[method] = (cost[0] if isinstance(cost, list) else cost).get("flops")
    return {"n1": n1, "n2": n2, "flops": out, "vs_full": {k: v / out["full"] for k, v in out.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch, a.seq, a.dim)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, a.batch))
    n1, n2 = masking.resolve_strata(a.layers)
    shape = dict(layers=a.layers, dim=a.dim, rank=a.rank, batch=a.batch, seq=a.seq, n1=n1, n2=n2)
    env = environment()
    cases = {"unrolled": Unrolled(a.layers, a.dim, a.rank), "scanned": Scanned(a.layers, a.dim, a.rank)}
    results = {name: linen_case(m, x, y, n1, n2, a.steps) for name, m in cases.items()}
    emit({"measure": "scanned_vs_unrolled", **shape, **results,
          "step_ratio_scanned": results["scanned"]["step_ms_median"] / results["unrolled"]["step_ms_median"], **env})
    emit({"measure": "nnx_flops", **shape, **nnx_flops(a.layers, a.dim, a.rank, x, y), **env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
