"""Train-step benchmark: our jitted step per method, optionally against PyTorch + PEFT in the same run.

    python benchmarks/step.py --model minilm --method spafit full --vs-torch --steps 10
    python benchmarks/step.py --model bert-large --method spafit full --dtype bfloat16 --batch 32   # GPU / TPU

Prints one JSON object per line: a `step` record per runner (ours: impl "spafit_jax"; the peer:
impl "torch+peft"), then `step_ratio` records comparing runners round by round. All runners are
timed in one process, one step each per round (A B A B ...), so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from spafit_jax.training import compiling, frozen, optimizer, steps  # noqa: E402
from spafit_jax.config.files import TrainConfig  # noqa: E402
from spafit_jax.training.plan import make_plan  # noqa: E402
from spafit_jax.config.schema import MethodConfig  # noqa: E402

TOTAL_STEPS = 10_000  # length of the learning-rate schedule (its value does not change the timing)
CACHED = "spafit_cached"  # spafit's step as the frozen-stratum cache runs it (train.cache_frozen=true)
METHODS = (*common.METHODS, CACHED)


# ------------------------------------------------------------------------------------ ours
@dataclasses.dataclass
class Runner:
    """One thing to time: `run()` does one step and blocks until its results exist."""

    name: str
    run: callable
    info: dict


def jax_runner(built: common.Built, batch_np: dict, seed: int, train_model=None, extra: dict | None = None) -> Runner:
    """Our train step for `built` (jit, state donated), compiled ahead of time.

    `train_model` = (apply_fn, batch keys) replaces `built.model.apply` of `steps.INPUTS` in the step
    and `extra` (arrays) joins the batch: `cached_inputs` gives both for the step of the frozen-stratum cache.
    """
    trainable, frozen_half = built.plan.split(built.params)
    tx = optimizer.make_optimizer(built.plan, TrainConfig(), TOTAL_STEPS)
    state = steps.init_state(trainable, tx, seed)
    batch = {**jax.device_put(batch_np), **(extra or {})}
    apply_fn, inputs = train_model or (built.model.apply, steps.INPUTS)
    step = compiling.jit(functools.partial(steps.train_step, apply_fn=apply_fn, inputs=inputs, tx=tx),
                         donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen_half, batch).compile()
    compile_s = time.perf_counter() - t0
    # Optimizer state of full fine-tuning of the same model, from shapes only.
    base = unflatten_dict({p: v for p, v in flatten_dict(built.params).items() if p[-1] not in ("lora_a", "lora_b")})
    full = make_plan(MethodConfig(name="full"), built.plan.num_layers).label(base)
    full_trainable, _ = full.split(base)
    full_tx = optimizer.make_optimizer(full, TrainConfig(), TOTAL_STEPS)
    full_opt = jax.eval_shape(full_tx.init, full_trainable)
    full_opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(full_opt))
    counts = built.plan.counts
    holder = {"state": state}

    def run():
        new, out = compiled(holder["state"], frozen_half, batch)
        jax.block_until_ready((new, out))
        holder["state"], holder["loss"] = new, out["loss"]

    opt_bytes = common.tree_bytes(state.opt_state)
    info = {
        "compile_s": compile_s, "flops_per_step": common.flops_of(compiled),
        "trainable_params": built.plan.trainable_params,
        "total_params": built.plan.total_params, "params_by_label": counts,
        "trainable_bytes": common.tree_bytes(trainable), "opt_state_bytes": opt_bytes,
        "opt_state_bytes_full": full_opt_bytes, "opt_state_fraction_of_full": opt_bytes / full_opt_bytes,
    }
    return Runner("jax", run, info)


def cached_inputs(built: common.Built, batch_np: dict) -> tuple[tuple, dict]:
    """((apply_fn, batch keys), {"hidden": ...}) of the step with the frozen-stratum cache (`frozen.build_cache`):
    the embeddings and layers 0 .. N1-1 run once here, the step starts at layer N1 (`upper`)."""
    n1 = built.plan.frozen_depth
    if n1 == 0 or n1 != built.plan.n1:
        raise SystemExit(f"{CACHED}: the plan freezes the embeddings and {n1} leading layers, not n1={built.plan.n1}; "
                         "it needs n1 >= 1")
    inputs = [batch_np[k] for k in steps.INPUTS]
    hidden = built.model.apply({"params": built.params}, *inputs, method="lower", n1=n1)
    hidden = jax.block_until_ready(hidden)
    return (functools.partial(built.model.apply, method="upper", n1=n1), frozen.CACHE_INPUTS), {"hidden": hidden}


def jax_logits(built: common.Built, batch_np: dict) -> np.ndarray:
    """Deterministic logits of our model (for the same-model check against torch)."""
    f = jax.jit(lambda p, b: built.model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                               b["token_type_ids"], deterministic=True))
    return np.asarray(f(built.params, batch_np))


# ------------------------------------------------------------------------------------ torch
def torch_state_dict(params) -> dict:
    """Our Flax tree as a transformers BertForSequenceClassification state dict (LoRA leaves skipped)."""
    import torch

    out = {}
    for path, value in flatten_dict(params).items():
        leaf = path[-1]
        if leaf in ("lora_a", "lora_b"):
            continue
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            leaf, value = "weight", value.T
        elif leaf in ("embedding", "scale"):
            leaf = "weight"
        out[".".join(path[:-1] + (leaf,))] = torch.from_numpy(np.array(value, np.float32, copy=True))
    return out


_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def torch_model(built: common.Built, method: str, num_labels: int, rank: int, alpha: float):
    """The same model in transformers (our weights copied in) with the method's trainability.

    LoRA through peft (`layers_to_transform` = n2..L-1 for spafit), layer biases (not
    LayerNorm) unfrozen by hand for layers >= n1 (spafit) or all layers (bitfit); classifier and
    pooler train in every method; full trains everything.
    """
    import transformers
    from peft import LoraConfig, get_peft_model

    if built.config.model_type != "bert":
        raise SystemExit(f"error: --vs-torch compares BERT models only; {built.name} is {built.config.model_type} "
                         "(leave --vs-torch out to time our step alone)")
    cfg = transformers.BertConfig(**dataclasses.asdict(built.config), num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg)
    missing, unexpected = model.load_state_dict(torch_state_dict(built.params), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto torch BERT: missing {missing[:3]}, unexpected {unexpected[:3]}")
    L = built.config.num_hidden_layers
    if method in ("lora", "spafit"):
        layers = list(range(L)) if method == "lora" else list(range(built.plan.n2, L))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=["query", "value"], layers_to_transform=layers))
    first_bias_layer = {"bitfit": 0, "spafit": built.plan.n1}.get(method)
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if method == "full" or ".classifier." in f".{name}" or ".pooler." in name:
            p.requires_grad_(True)
        elif first_bias_layer is not None and m and int(m.group(1)) >= first_bias_layer \
                and name.endswith(".bias") and "LayerNorm" not in name:
            p.requires_grad_(True)
        elif "lora_" not in name:
            p.requires_grad_(False)
    return model


def torch_runner(built: common.Built, method: str, batch_np: dict, args, ours_logits=None) -> Runner:
    """PyTorch + PEFT train step: forward, cross-entropy, backward, clip, AdamW over trainable params.

    With `ours_logits`, records the largest logit difference at the shared initial weights
    (a fresh LoRA B is zero on both sides): evidence that both sides run the same model.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    device = torch_device()
    model = torch_model(built, method, args.num_labels, args.rank, args.alpha).to(device)
    diff = None if ours_logits is None else float(np.max(np.abs(ours_logits - torch_logits(model, batch_np))))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tc = TrainConfig()
    opt = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": tc.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=tc.lr)
    batch = {k: torch.from_numpy(v).to(device) for k, v in batch_np.items()}
    labels = batch["labels"].long()
    autocast = (functools.partial(torch.autocast, device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
        opt.step()
        sync()

    first_step_s = common.timed(run)
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    info = {
        "first_step_s": first_step_s, "threads": torch.get_num_threads(), "torch_device": device,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "opt_state_bytes": opt_bytes, "max_abs_logit_diff_vs_ours": diff,
    }
    return Runner("torch", run, info)


def torch_device() -> str:
    """"cuda" when JAX runs on a GPU and torch sees one, else "cpu"."""
    import torch

    return "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"


def torch_logits(model, batch_np: dict) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(batch_np[k]).to(device) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out.logits.float().cpu().numpy()


# ------------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--method", nargs="+", default=["spafit"], choices=METHODS,
                   help=f"{CACHED}: spafit's step starting at layer N1 from precomputed hidden states "
                        "(train.cache_frozen=true; no torch peer)")
    p.add_argument("--vs-torch", action="store_true", help="also time PyTorch + PEFT, alternating with ours")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--isolate", action="store_true",
                   help="one process per method (clean peak memory per method; no alternation across methods)")
    p.add_argument("--peak-flops", type=float, default=None, help="chip peak FLOP/s for MFU (default: table by device kind)")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the matmul that measures the machine peak")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of 3 of our steps per method here")
    return p.parse_args(argv)


def isolate(argv: list[str], methods: list[str]) -> int:
    """Re-runs this script once per method, passing its JSON lines through."""
    rest, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a == "--method"
        if not skip and a != "--isolate":
            rest.append(a)
    rc = 0
    for m in methods:
        rc |= subprocess.call([sys.executable, __file__, *rest, "--method", m])
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.isolate and len(args.method) > 1:
        return isolate(argv, args.method)
    warnings.filterwarnings("ignore", message=".*donated.*")
    if args.vs_torch:
        import torch

        torch.set_num_threads(args.torch_threads or common.cpu_cores())
    env = common.environment(with_torch=args.vs_torch)
    peak = common.matmul_peak(args.dtype, args.matmul_n)
    if args.vs_torch:
        peak["torch_matmul_peak_flops_per_s"] = common.torch_matmul_peak(args.dtype, peak["matmul_n"], torch_device())
    chip_peak = args.peak_flops or common.chip_peak_flops(args.dtype)

    runners: dict[str, Runner] = {}
    setup: dict[str, dict] = {}
    for method in args.method:
        built = common.build(args.model, "spafit" if method == CACHED else method, num_labels=args.num_labels,
                             dtype=args.dtype, n1=args.n1, n2=args.n2, rank=args.rank, alpha=args.alpha,
                             seed=args.seed)
        batch = common.random_batch(built.config, args.batch, args.seq, args.num_labels, args.seed)
        train_model, extra = cached_inputs(built, batch) if method == CACHED else (None, None)
        ours = jax_runner(built, batch, args.seed, train_model=train_model, extra=extra)
        setup[method] = {"n1": built.plan.n1, "n2": built.plan.n2, "num_layers": built.config.num_hidden_layers}
        runners[f"{method}/jax"] = ours
        if args.vs_torch and method != CACHED:  # no torch peer of the cached step
            theirs = torch_runner(built, method, batch, args, ours_logits=jax_logits(built, batch))
            theirs.info["same_trainable_params"] = theirs.info["trainable_params"] == ours.info["trainable_params"]
            runners[f"{method}/torch"] = theirs
        del built

    times = common.round_robin({k: r.run for k, r in runners.items()}, args.steps, args.warmup, args.gap)
    mem = common.memory()
    env["loadavg_1m_end"] = common.load_average()
    if args.profile:
        for key, r in runners.items():
            if key.endswith("/jax"):
                with jax.profiler.trace(os.path.join(args.profile, key.replace("/", "_"))):
                    for _ in range(3):
                        r.run()

    for key, r in runners.items():
        method, impl = key.split("/")
        med = common.median(times[key])
        rec = {
            "benchmark": "step", "impl": "spafit_jax" if impl == "jax" else "torch+peft", "model": args.model,
            "method": method, **setup[method], "rank": args.rank, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "step_s_median": med,
            "step_s_min": min(times[key]), "step_s": times[key], "examples_per_s": args.batch / med, **r.info,
        }
        flops = runners[f"{method}/jax"].info["flops_per_step"]
        if flops:
            rec["flops_per_s"] = flops / med  # for torch: our XLA count of the same work over its time
            rec.update(peak)
            rec["fraction_of_matmul_peak"] = rec["flops_per_s"] / peak["matmul_peak_flops_per_s"]
            if chip_peak:
                rec["chip_peak_flops_per_s"] = chip_peak
                rec["mfu"] = rec["flops_per_s"] / chip_peak
        rec.update(mem)
        rec["memory_note"] = "process-wide peak over every runner of this run" if len(runners) > 1 else "this runner"
        rec.update(env)
        common.emit(rec)

    def ratio(a: str, b: str, what: str) -> None:
        pairs = [x / y for x, y in zip(times[a], times[b])]
        common.emit({"benchmark": "step_ratio", "what": what, "a": a, "b": b, "model": args.model,
                     "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                     "pair_ratios": pairs, "median_ratio": common.median(pairs),
                     "ratio_of_medians": common.median(times[a]) / common.median(times[b]),
                     "ratio_of_minima": min(times[a]) / min(times[b])})

    for method in args.method:
        if args.vs_torch and method != CACHED:
            ratio(f"{method}/jax", f"{method}/torch", "ours / PyTorch+PEFT, same method")
        if method != "full" and "full" in args.method:
            ratio(f"{method}/jax", "full/jax", "ours: method / full fine-tuning")
        if method == CACHED and "spafit" in args.method:
            ratio(f"{method}/jax", "spafit/jax", "ours: spafit with the frozen-stratum cache / spafit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
