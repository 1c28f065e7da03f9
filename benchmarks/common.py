"""Helpers shared by the benchmark scripts: models, batches, timers, peaks, memory, environment.

Every script prints one JSON object per measurement (`emit`). Models are `minilm` (the
pre-trained all-MiniLM-L6-v2), random `tiny` / `bert-base` / `bert-large` configs, or a folder
that `spafit_jax.models.hf.load_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from spafit_jax.models import hf
from spafit_jax import methods
from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.models.bert import BertConfig, BertForSequenceClassification
from spafit_jax.config.schema import DTYPES, MethodConfig
from spafit_jax.training.plan import Plan, make_plan

# Random configs (weights drawn from the BERT initialiser; timing does not depend on them).
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=128),
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
METHODS = tuple(m for m in methods.METHODS if m != "head_only")  # the methods of the paper

# Dense bfloat16 peak FLOP/s of one JAX device, by device_kind (substring, lower case, first match):
# the TPUs from `tpu_specs` (one owner of the chip figures), then the GPUs.
CHIP_PEAK_BF16: tuple[tuple[str, float], ...] = tpu_specs.DEVICE_PEAK_FLOPS + (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10g", 70e12), ("a10", 125e12),
    ("v100", 125e12), ("t4", 65e12),
)


def emit(record: dict) -> None:
    """Prints one measurement as a single JSON line (flushed, so a pipe sees it at once)."""
    print(json.dumps(record, default=_json_default), flush=True)


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    return str(x)


def median(xs) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions(with_torch: bool = False) -> dict[str, str]:
    import flax
    import jaxlib
    import optax

    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
    if with_torch:
        import peft
        import torch
        import transformers

        v.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    return v


def environment(with_torch: bool = False) -> dict[str, Any]:
    """Device, machine and versions: the context every record carries."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "cpu": cpu_model(), "cores": cpu_cores(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(with_torch), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_1m_start": load_average(),
    }


def load_average() -> float | None:
    """The 1-minute load average (other processes on a shared machine add noise; record it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def chip_peak_flops(dtype: str) -> float | None:
    """The accelerator's dense bf16 peak FLOP/s from `CHIP_PEAK_BF16` (None on CPU or unknown chips).

    For float32 on GPUs / TPUs the matmul units run at a lower rate; the measured matmul peak
    (`matmul_peak`) is then the better yardstick.
    """
    dev = jax.devices()[0]
    if dev.platform == "cpu" or dtype != "bfloat16":
        return None
    kind = dev.device_kind.lower()
    for key, peak in CHIP_PEAK_BF16:
        if key in kind:
            return peak
    return None


def matmul_peak(dtype: str, n: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of the best of `repeats` timed n x n @ n x n jnp matmuls (the machine's practical peak)."""
    if n is None:
        n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(1), (n, n), dt)
    b = jax.random.normal(jax.random.key(2), (n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"matmul_n": n, "matmul_peak_flops_per_s": 2.0 * n**3 / best}


def torch_matmul_peak(dtype: str, n: int = 2048, device: str = "cpu", repeats: int = 5) -> float:
    """The same measurement with torch.matmul (MKL / oneDNN on CPU, cuBLAS on CUDA)."""
    import torch

    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def memory() -> dict[str, Any]:
    """Peak memory: device `peak_bytes_in_use` on GPU/TPU, process peak RSS (getrusage) on CPU."""
    dev = jax.devices()[0]
    out: dict[str, Any] = {"peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        out["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    return out


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")))


def flops_of(compiled) -> float | None:
    """FLOPs of a compiled XLA computation (cost analysis; None when the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends raise instead of returning nothing)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of fn, which must block until its results are ready."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_robin(runners: dict[str, Callable[[], Any]], steps: int, warmup: int, gap: float = 0.0) -> dict[str, list[float]]:
    """Times each runner once per round, in order (A B A B ...), after `warmup` untimed rounds.

    `gap` seconds of sleep before every timed call let another library's spinning worker
    threads go idle first.
    """
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):
        for name, fn in runners.items():
            if gap:
                time.sleep(gap)
            times[name].append(timed(fn))
    return times


# ------------------------------------------------------------------------------------ models
@dataclasses.dataclass
class Built:
    """A model with its parameters for one method, and what the trainer would derive from it."""

    name: str
    config: BertConfig
    model: BertForSequenceClassification
    params: dict
    plan: Plan  # the trainer's plan: strata, LoRA placement, labels
    folder: Path | None


def model_config(name: str) -> tuple[BertConfig, Path | None]:
    """(config, folder or None) for a random config name, an alias or a folder."""
    if name in RANDOM_MODELS:
        return BertConfig(**RANDOM_MODELS[name]), None
    folder = hf.resolve(name)
    return hf.read_config(folder), folder


def build(name: str, method: str, *, num_labels: int = 2, dtype: str = "float32", n1=None, n2=None,
          rank: int = 8, alpha: float = 16.0, seed: int = 0) -> Built:
    """The model and parameters for `method` with the trainer's plan (LoRA placement, labels)."""
    config, folder = model_config(name)
    plan = make_plan(MethodConfig(name=method, n1=n1, n2=n2, lora_rank=rank, lora_alpha=alpha),
                     config.num_hidden_layers)
    lora = plan.lora
    dt = jnp.dtype(dtype)
    if folder is None:
        model = BertForSequenceClassification(config, dt, jnp.float32, lora, num_labels=num_labels)
        params = random_params(model, config, seed)
    else:
        model, params = hf.load_pretrained(folder, num_labels=num_labels, dtype=dt, seed=seed, lora=lora)
    return Built(name, config, model, params, plan.label(params), folder)


def random_params(model, config: BertConfig, seed: int = 0) -> dict:
    """BERT-style random parameters drawn in numpy from the shapes alone (no init compile).

    Kernels and embeddings N(0, initializer_range), biases 0, LayerNorm scales 1, LoRA A
    U(+-1/sqrt(fan_in)) and B 0, as the Flax initialisers would give (timing does not depend on them).
    """
    shapes = hf.init_params(model, shapes_only=True)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in ("bias", "lora_b"):
            x = np.zeros(leaf.shape, np.float32)
        elif name == "scale":
            x = np.ones(leaf.shape, np.float32)
        elif name == "lora_a":
            bound = 1.0 / np.sqrt(leaf.shape[0])
            x = rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        else:
            x = rng.standard_normal(leaf.shape, np.float32) * np.float32(config.initializer_range)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_batch(config: BertConfig, batch: int, seq: int, num_labels: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A train batch of random token ids (no padding), in the layout data.py produces."""
    if seq > config.max_position_embeddings:
        raise SystemExit(f"--seq {seq} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    low = min(1000, config.vocab_size - 1)
    return {
        "input_ids": rng.integers(low, config.vocab_size, (batch, seq), dtype=np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, num_labels, (batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }


def add_model_args(p) -> None:
    """--model / --batch / --seq / --dtype / --steps / --warmup / strata and LoRA options."""
    p.add_argument("--model", default="minilm",
                   help="minilm | tiny | bert-base | bert-large (random configs) | a model folder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--steps", type=int, default=10, help="timed steps (rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (rounds) after compiling")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--n1", type=strata_arg, default=None, help="SPAFIT N1: layer count (2) or fraction of L (0.33)")
    p.add_argument("--n2", type=strata_arg, default=None, help="SPAFIT N2: layer count (4) or fraction of L (0.67)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap", type=float, default=0.0,
                   help="seconds to sleep before each timed call (lets spinning worker threads idle)")


def strata_arg(text: str) -> int | float:
    """An --n1/--n2 value as masking expects it: "4" is a layer count, "0.5" a fraction of L."""
    return float(text) if any(c in text for c in ".eE") else int(text)
