"""Inference benchmark: merged SPAFIT (lora.merge -> plain model) vs plain BERT vs the unmerged LoRA model.

    python benchmarks/infer.py --model minilm --batch 64 --seq 128 --steps 10

The SPAFIT adapters get random non-zero B (as after training), so merging changes the kernels.
The forward passes are timed in one process, one call each per round (plain, merged, unmerged,
plain_control, plain, ...). `plain_control` is the plain model compiled a second time: its ratio
to plain is the noise floor of the run (an A/A test). Prints one `infer` record per variant and
`infer_ratio` records (variant / plain, round by round). The merged model must run as fast as
the plain one: it is the same module with other kernel values, and `same_program_as_plain`
says whether XLA compiled it to the very same program.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from spafit_jax.training import compiling  # noqa: E402
from spafit_jax import lora as lora_lib
from spafit_jax.models import hf  # noqa: E402


def trained_adapters(params, seed: int, scale: float = 0.02):
    """params with every lora_b drawn at random (a fresh B is zero, which would make merging trivial)."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(rng.normal(0.0, scale, value.shape), value.dtype)
    return unflatten_dict(flat)


def forward(model, params, batch):
    """A compiled deterministic forward pass, its compile seconds and FLOPs."""
    f = compiling.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                         deterministic=True))
    t0 = time.perf_counter()
    compiled = f.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    return compiled, compile_s, common.flops_of(compiled)


def program(compiled) -> str:
    """The optimised HLO of a compiled function without its module-name line (for identity checks)."""
    return "\n".join(compiled.as_text().splitlines()[1:])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.set_defaults(batch=64)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    env = common.environment()
    built = common.build(args.model, "spafit", num_labels=args.num_labels, dtype=args.dtype, n1=args.n1, n2=args.n2,
                         rank=args.rank, alpha=args.alpha, seed=args.seed)
    unmerged = trained_adapters(built.params, args.seed)
    merged = lora_lib.merge(unmerged, built.plan.lora)
    plain_model = hf.family_classes(built.config.model_type)[1](  # the same family without adapters
        built.config, built.model.dtype, built.model.param_dtype, None, num_labels=args.num_labels)
    plain = unflatten_dict({p: v for p, v in flatten_dict(built.params).items() if p[-1] not in ("lora_a", "lora_b")})
    batch = jax.device_put(common.random_batch(built.config, args.batch, args.seq, args.num_labels, args.seed))

    variants = {
        "plain": (plain_model, plain),
        "merged": (plain_model, merged),
        "unmerged": (built.model, unmerged),
        "plain_control": (plain_model, plain),
    }
    compiled, info, outputs = {}, {}, {}
    for name, (model, params) in variants.items():
        c, compile_s, flops = forward(model, params, batch)
        outputs[name] = np.asarray(c(params, batch))
        compiled[name] = (c, params)
        info[name] = {"compile_s": compile_s, "flops_per_call": flops, "param_bytes": common.tree_bytes(params),
                      "lora_leaves": sum(p[-1] in ("lora_a", "lora_b") for p in flatten_dict(params)),
                      "same_program_as_plain": program(c) == program(compiled["plain"][0]) if compiled else True}
    merge_error = float(np.max(np.abs(outputs["merged"] - outputs["unmerged"])))

    runners = {name: (lambda c=c, p=p: c(p, batch).block_until_ready()) for name, (c, p) in compiled.items()}
    times = common.round_robin(runners, args.steps, args.warmup, args.gap)
    mem = common.memory()
    env["loadavg_1m_end"] = common.load_average()
    for name in variants:
        med = common.median(times[name])
        rec = {"benchmark": "infer", "variant": name, "model": args.model, "n1": built.plan.n1, "n2": built.plan.n2,
               "rank": args.rank, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "steps": args.steps,
               "warmup": args.warmup, "call_s_median": med, "call_s_min": min(times[name]), "call_s": times[name],
               "examples_per_s": args.batch / med, **info[name]}
        if info[name]["flops_per_call"]:
            rec["flops_per_s"] = info[name]["flops_per_call"] / med
        if name == "merged":
            rec["max_abs_logit_diff_vs_unmerged"] = merge_error
        rec.update(mem)
        rec.update(env)
        common.emit(rec)
    for name in ("merged", "unmerged", "plain_control"):
        pairs = [a / b for a, b in zip(times[name], times["plain"])]
        common.emit({"benchmark": "infer_ratio", "a": name, "b": "plain", "model": args.model, "batch": args.batch,
                     "seq": args.seq, "dtype": args.dtype, "pair_ratios": pairs, "median_ratio": common.median(pairs),
                     "ratio_of_medians": common.median(times[name]) / common.median(times["plain"]),
                     "ratio_of_minima": min(times[name]) / min(times["plain"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
