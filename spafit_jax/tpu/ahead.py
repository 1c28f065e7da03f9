"""The work behind `python -m spafit_jax.aot` (its command line and --help: `spafit_jax/aot.py`).

With `libtpu` installed (`pip install "jax[tpu]==<jax version>"`), JAX describes a TPU slice that is
not attached (`jax.experimental.topologies.get_topology_desc`) and XLA compiles for it. This module
builds the exact programs the trainer runs on such a slice -- the mesh driver's train step and eval
step (`parallel.mesh_driver`), for every bucket length, with the run's dtypes, `parallel.fsdp`,
gradient accumulation, LoRA placement and the frozen-stratum cache -- from abstract shapes only
(`jax.eval_shape`: no weights, no data), compiles them, and reads XLA's memory and cost analyses:
HBM per chip against the chip's capacity, FLOPs per step, and a roofline estimate of the step time.

On several hosts every process runs the same SPMD program on its rows of each global batch, so the
program compiled here over all of the slice's devices is the one each host runs. The pmap driver
cannot be compiled this way (`jax.pmap` has no ahead-of-time lowering for devices that are not
attached); for `parallel.mode=pmap` the mesh driver's figures are shown. Chip figures are in
`tpu_specs`; the roofline is an estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

# The trainer's names this module builds on, imported here once.
from spafit_jax.training import parallel
from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.config.files import Config
from spafit_jax.training.frozen import DTYPES as CACHE_DTYPES, cache_depth, upper_model
from spafit_jax.training.optimizer import make_optimizer
from spafit_jax.training.steps import init_state
from spafit_jax.training.plan import Plan, make_plan

GIB = tpu_specs.GIB
TOTAL_STEPS = 1000  # the schedule's length does not change a program's shapes


@dataclasses.dataclass
class Setup:
    """What every program of one config shares: the model, the plan, the abstract state, the driver."""

    cfg: Config
    topo: tpu_specs.Topology
    model: Any
    plan: Plan
    params: Any  # abstract parameters (shapes)
    state: Any  # abstract TrainState, placed as the driver places it
    frozen: Any  # abstract frozen parameters, placed as the driver places them
    driver: Any  # parallel.Driver over the topology's devices
    num_labels: int
    cache_n1: int  # > 0: the train step starts at this layer (train.cache_frozen)


#: the fields of the train step's arguments as the HBM table splits them (trainable, optimizer state, frozen base,
#: batch), in the order `argument_bytes` returns them.
ARGUMENTS = ("trainable_bytes", "optimizer_bytes", "frozen_bytes", "batch_bytes")

def _abstract(tree, sharding_of):
    import jax

    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of(s)), tree)


def setup(cfg: Config, topo: tpu_specs.Topology) -> Setup:
    """The model (from the named architecture or config.json), the plan, the optimizer, the abstract
    train state and frozen parameters on the topology's devices, and the mesh driver."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from spafit_jax.models.hf import build_model, init_params
    from spafit_jax.training.loading import check_max_length

    model_cfg = tpu_specs.model_config(cfg.model.name)
    check_max_length(cfg, model_cfg)
    num_labels = tpu_specs.num_labels(cfg.data)
    plan = make_plan(cfg.method, model_cfg.num_hidden_layers)
    model = build_model(model_cfg, plan.lora, num_labels=num_labels, dtype=jnp.dtype(cfg.model.dtype),
                        param_dtype=jnp.dtype(cfg.model.param_dtype))
    if cfg.data.packing:  # a family that cannot take packed rows: one line, before anything compiles
        from spafit_jax.data import packing

        packing.check_model(model, f"model.name={cfg.model.name} ({type(model).__name__})")
    params = init_params(model, shapes_only=True)
    plan = plan.label(params)
    trainable, frozen = plan.split(params)
    t = cfg.train
    tx = make_optimizer(plan, t, TOTAL_STEPS)
    state = jax.eval_shape(lambda tr: init_state(tr, tx, t.seed), trainable)
    cache_n1, train_model = 0, None
    if t.cache_frozen:  # the step starts at layer n1 from cached hidden states (`frozen.Cache.train_model`)
        cache_n1 = cache_depth(plan)
        train_model = upper_model(model, cache_n1)
    driver = parallel.mesh_driver(model.apply, tx, is_regression=num_labels == 1, grad_accum=t.grad_accum,
                                  fsdp=cfg.parallel.fsdp, train_model=train_model, devices=topo.devices)
    mesh = driver.mesh
    state = _abstract(state, lambda s: NamedSharding(mesh, P()))  # put_state: replicated
    frozen = _abstract(frozen, functools.partial(parallel.fsdp_sharding, mesh))  # put_frozen
    return Setup(cfg, topo, model, plan, params, state, frozen, driver, num_labels, cache_n1)


def batch_shapes(s: Setup, batch: int, length: int, train: bool) -> dict:
    """The abstract global batch of the step, its rows sharded as `Driver.put_batch` shards them (with
    data.packing: `batch` packed rows of K = data.max_segments segments, as `packing.assemble` builds them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = NamedSharding(s.driver.mesh, P((parallel.AXIS, parallel.FSDP)))
    spec = {k: ((batch, length), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    per_row = (batch, s.cfg.data.max_segments) if s.cfg.data.packing else (batch,)  # packed: one label per segment
    spec["labels"] = (per_row, jnp.float32 if s.num_labels == 1 else jnp.int32)
    spec["weights"] = (per_row, jnp.float32)
    if s.cfg.data.packing:  # the model's packed mode (`steps.packed_kwargs`); attention_mask holds segment ids
        spec["segment_starts"] = (per_row, jnp.int32)
    if train and s.cache_n1:
        spec["hidden"] = ((batch, length, s.model.config.hidden_size), CACHE_DTYPES[s.cfg.train.cache_dtype])
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in spec.items()}


def leaf_bytes(x, layout=None) -> int:
    """Bytes of one chip's shard of abstract array `x`; with its device `layout`, padded to the layout's tiles
    as the TPU stores it (a (32, 37) float32 tiled (8, 128) takes 32 x 128 x 4 bytes; a scalar one tile)."""
    import numpy as np

    shape = list(x.sharding.shard_shape(x.shape))
    tiling = getattr(layout, "tiling", None)
    if tiling:
        shape = [shape[d] for d in layout.major_to_minor] or [1]
        tile = tiling[0]
        for i, t in enumerate(tile, start=len(shape) - len(tile)):
            if i >= 0:
                shape[i] = -(-shape[i] // t) * t
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def argument_bytes(args: tuple, formats) -> list[int]:
    """Per-chip bytes of each argument tree of a compiled program, padded to its input layouts."""
    import jax

    out = []
    for tree, fmt in zip(args, formats):
        leaves, layouts = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(fmt)
        if len(layouts) != len(leaves):
            layouts = [None] * len(leaves)
        # an argument the program does not read (eval's labels) is dropped by jit: its format has no layout
        out.append(sum(0 if f is not None and getattr(f, "layout", 0) is None else leaf_bytes(x, getattr(f, "layout", None))
                       for x, f in zip(leaves, layouts)))
    return out


def compile_program(s: Setup, kind: str, batch: int, length: int) -> dict:
    """Compiles the train or eval step for one (global batch, length) and returns its figures
    (one JSON-able dict; see `figures`)."""
    b = batch_shapes(s, batch, length, kind == "train")
    t0 = time.perf_counter()
    if kind == "train":
        st = s.state
        args = (st.trainable, (st.opt_state, st.step, st.rng), s.frozen, b)
        lowered = s.driver.step.lower(st, s.frozen, b)
    else:
        args = (s.state.trainable, (), s.frozen, b)
        lowered = s.driver.eval_logits.lower(s.state.trainable, s.frozen, b)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (XLA raises its own runtime errors)
        needs = tpu_specs.out_of_memory(str(e))
        if needs is None:
            name = program_row(s, kind, batch, length)["program"]
            raise tpu_specs.AotError(f"XLA could not compile {name} for {s.topo.name}: "
                                     f"{str(e).splitlines()[0][:300]}") from None
        parts = dict(zip(ARGUMENTS, argument_bytes(args, [None] * 4)))
        return refused(s, kind, batch, length, parts, needs, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    formats = compiled.input_formats[0]
    if kind == "train":  # (state, frozen, batch) -> the state's trainable / optimizer parts
        state_fmt = formats[0]
        formats = (state_fmt.trainable, (state_fmt.opt_state, state_fmt.step, state_fmt.rng), formats[1], formats[2])
    else:
        formats = (formats[0], (), formats[1], formats[2])
    parts = dict(zip(ARGUMENTS, argument_bytes(args, formats)))
    return figures(s, kind, batch, length, compiled, parts, seconds)


def program_row(s: Setup, kind: str, batch: int, length: int) -> dict:
    """The fields every program's row starts with: its names and sizes, the model and method, the chip, our model
    FLOPs per chip."""
    chips = len(s.topo.devices)
    flops = tpu_specs.model_flops(s.params, s.plan, s.model.config, batch, length, train=kind == "train",
                                  start_layer=s.cache_n1 if kind == "train" else 0)
    d = s.cfg.data
    name = f"{kind}[R={batch},T={length},K={d.max_segments}]" if d.packing else f"{kind}[B={batch},T={length}]"
    return {"program": name, "kind": kind, "packed_segments": d.max_segments if d.packing else None,
            "model": s.cfg.model.name,
            "method": s.cfg.method.name, "topology": s.topo.name, "chip": s.topo.chip.name,
            "chips": chips, "hosts": s.topo.hosts, "global_batch": batch, "rows_per_host": batch // s.topo.hosts,
            "seq_len": length, "hbm_capacity_bytes": s.topo.chip.hbm_bytes, "model_flops_per_chip": flops / chips}


def refused(s: Setup, kind: str, batch: int, length: int, parts: dict, temp: int, seconds: float) -> dict:
    """The figures of a program XLA refused to compile for want of HBM: its arguments (unpadded) and the
    temporaries XLA said it needs; no cost analysis."""
    args = sum(parts.values())
    return {
        **program_row(s, kind, batch, length), "fits": False, "hbm_per_chip_bytes": args + temp,
        **parts, "temp_bytes": temp, "argument_bytes": args, "flops_per_chip": None,
        "est_step_seconds": None, "est_mfu": None, "compile_seconds": seconds,
        "xla": "RESOURCE_EXHAUSTED: XLA refused the program for want of HBM",
    }


def figures(s: Setup, kind: str, batch: int, length: int, compiled, parts: dict, seconds: float) -> dict:
    """One program's figures: per-chip HBM (XLA's memory analysis, split by what the arguments hold),
    XLA's FLOPs and bytes per chip, our model FLOPs, and the roofline estimate of the step."""
    chip = s.topo.chip
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    args, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    code = int(mem.generated_code_size_in_bytes)
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    hbm = max(peak, args + out - alias + temp) + code
    flops = float(cost.get("flops", 0.0))
    accessed = float(cost.get("bytes accessed", 0.0))
    row = program_row(s, kind, batch, length)
    model_flops = row["model_flops_per_chip"]
    # XLA counts a loop's body once (train.grad_accum > 1 scans the micro-batches): our count is the floor
    step = max(max(flops, model_flops) / chip.peak_flops, accessed / chip.hbm_bandwidth)
    return {
        **row, "fits": hbm <= chip.hbm_bytes, "hbm_per_chip_bytes": hbm, **parts, "temp_bytes": temp,
        "output_bytes": out, "alias_bytes": alias, "code_bytes": code, "argument_bytes": args,
        "flops_per_chip": flops, "bytes_accessed_per_chip": accessed,
        "est_step_seconds": step, "est_mfu": model_flops / (step * chip.peak_flops) if step else None,
        "compile_seconds": seconds,
    }


def programs(s: Setup, shapes: str = "all", steps: str = "both") -> list[tuple[str, int, int]]:
    """(kind, global batch, length) of every program the run compiles: train and eval steps (`steps`:
    both, train or eval) at every bucket length (`shapes="largest"`: only the longest, the most memory)."""
    cfg = s.cfg
    # data.max_shapes fits buckets to the data: then max_length alone; data.packing: one shape, max_length
    buckets = [cfg.data.max_length] if cfg.data.packing else cfg.data.bucket_lengths()
    if shapes == "largest":
        buckets = buckets[-1:]
    t = cfg.train
    parallel.check_batch(t.batch_size, "train.batch_size", t.grad_accum, devices=len(s.topo.devices))
    parallel.check_batch(t.eval_batch_size, "train.eval_batch_size", devices=len(s.topo.devices))
    return ([("train", t.batch_size, n) for n in buckets if steps != "eval"]
            + [("eval", t.eval_batch_size, n) for n in buckets if steps != "train"])


#: `--max-batch` stops at this many examples per chip: far past any useful batch, and XLA's TPU compile of a
#: tiny model's step at a hundred thousand rows takes minutes.
MAX_ROWS_PER_CHIP = 4096


def max_batch(s: Setup, length: int, known: dict | None = None, probes: int = 6, progress=None,
              rows_per_chip: int = MAX_ROWS_PER_CHIP) -> tuple[int, list[dict], bool]:
    """The largest global train batch (a multiple of chips x grad_accum, at most `rows_per_chip` per chip)
    whose step fits at `length`; the figures of every probe; and whether the bound stopped the search.

    HBM grows about linearly with the batch, so each guess is where the line through the largest batch that
    fits and the smallest that does not (at first: two compiled batches) meets the chip's capacity, and a
    guess that fits is checked one unit higher, which for a linear need ends the search in two compiles.
    At most `probes` compiles beyond `known`; the result then fits but may not be the largest.
    `progress(figures)` is called after each compile."""
    unit = len(s.topo.devices) * s.cfg.train.grad_accum
    top = max(unit, rows_per_chip * len(s.topo.devices) // unit * unit)
    cap = s.topo.chip.hbm_bytes
    seen = {}
    if known is not None:
        seen[known["global_batch"]] = known

    def fits(b):
        if b not in seen:
            seen[b] = compile_program(s, "train", b, length)
            if progress is not None:
                progress(seen[b])
        return seen[b]["fits"]

    def crossing(a, b):  # the batch where the line through probes a and b reaches the capacity
        ha, hb = seen[a]["hbm_per_chip_bytes"], seen[b]["hbm_per_chip_bytes"]
        return a + (cap - ha) * (b - a) / (hb - ha) if hb > ha else None

    budget = probes + len(seen)
    b0 = known["global_batch"] if known else unit
    if not fits(b0):
        return 0, [seen[b] for b in sorted(seen)], False
    if b0 < top:
        fits(min(b0 * 2, top))
    sides = []  # whether each guess fitted: two on one side in a row and the next guess bisects
    while len(seen) < budget:
        lo = max(b for b in seen if seen[b]["fits"])
        hi = min((b for b in seen if not seen[b]["fits"]), default=None)
        if lo >= top or (hi is not None and hi - lo <= unit):
            break
        if hi is None:  # not bracketed yet: extend the line through the two largest batches, or double
            below = max(b for b in seen if b < lo) if len(seen) > 1 else None
            line = crossing(below, lo) if below is not None else None
            guess = min(int(line) // unit * unit if line is not None else 2 * lo, top)
        elif len(sides) >= 2 and sides[-1] == sides[-2]:
            guess = (lo + hi) // 2 // unit * unit
        else:
            guess = min(int(crossing(lo, hi)) // unit * unit, hi - unit)
        sides.append(fits(max(guess, lo + unit)))  # a line that says lo is the largest: check one unit up
    best = max(b for b in seen if seen[b]["fits"])
    return best, [seen[b] for b in sorted(seen)], best >= top


def _size(n: float) -> str:
    return f"{n / GIB:.2f}G" if n >= GIB / 10 else f"{n / 2**20:.1f}M"


def format_table(rows: list[dict], topo: tpu_specs.Topology) -> str:
    """A text table of the programs' figures: bytes per chip (G = GiB, M = MiB), GFLOP per chip, estimated ms and MFU."""
    head = (f"{'program':<22} {'fits':<4} {'HBM/chip':>8} {'frozen':>7} {'train.':>7} {'optim.':>7} {'batch':>7} "
            f"{'temp':>7} {'XLA GFLOP':>10} {'model GFLOP':>11} {'est. ms':>8} {'est. MFU':>8} {'compile s':>9}")
    c = topo.chip
    lines = [f"{topo.name}: {len(topo.devices)} x {c.name} ({c.hbm_bytes / GIB:.2f} GiB HBM usable, {c.peak_flops / 1e12:.0f} "
             f"TFLOP/s bf16, {c.hbm_bandwidth / 1e9:.0f} GB/s each) on {topo.hosts} host(s); figures per chip; "
             "step time and MFU are a roofline estimate, not a measurement", head]
    for r in rows:
        mfu = "-" if r["est_mfu"] is None else f"{100 * r['est_mfu']:.0f}%"
        num = lambda x, scale, f: "-" if x is None else format(x * scale, f)  # noqa: E731
        sizes = " ".join(f"{_size(r[k]):>7}" for k in ("frozen_bytes", "trainable_bytes", "optimizer_bytes",
                                                        "batch_bytes", "temp_bytes"))
        lines.append(f"{r['program']:<22} {'yes' if r['fits'] else 'NO':<4} {_size(r['hbm_per_chip_bytes']):>8} {sizes} "
                     f"{num(r['flops_per_chip'], 1e-9, '.1f'):>10} {r['model_flops_per_chip'] / 1e9:>11.1f} "
                     f"{num(r['est_step_seconds'], 1e3, '.2f'):>8} {mfu:>8} {r['compile_seconds']:>9.1f}")
    lines.append(f"{len(rows)} program(s)")
    return "\n".join(lines)


def advice(row: dict, s: Setup) -> str:
    """The one line that says which program does not fit and what to change."""
    cfg, chips = s.cfg, len(s.topo.devices)
    fixes = ["lower train.batch_size (--max-batch finds the largest)" if row["kind"] == "train"
             else "lower train.eval_batch_size"]
    if cfg.parallel.fsdp < chips:
        fixes.append(f"shard the frozen weights with parallel.fsdp={chips}")
    if cfg.model.dtype != "bfloat16" or cfg.model.param_dtype != "bfloat16":
        fixes.append("use model.dtype=bfloat16 model.param_dtype=bfloat16")
    if row["kind"] == "train":
        fixes.append(f"train.grad_accum={cfg.train.grad_accum * 2}")
    fixes.append("shorter data.max_length / data.buckets")
    return (f"{row['program']} does not fit on {s.topo.name}: it needs {row['hbm_per_chip_bytes'] / GIB:.2f} GiB per "
            f"chip, above the {row['hbm_capacity_bytes'] / GIB:.2f} GiB of a {s.topo.chip.name}; " + ", ".join(fixes))


def run(cfg: Config, topology: str, *, shapes: str = "all", steps: str = "both", find_max: bool = False,
        progress=None) -> tuple[list[dict], Setup, dict]:
    """Compiles every program of `cfg` for `topology`; returns (figures per program, the setup, extras:
    notes and, with `find_max`, the largest batch)."""
    topo = tpu_specs.topology(topology)
    s = setup(cfg, topo)
    notes = []
    if cfg.parallel.mode == "pmap":
        notes.append("parallel.mode=pmap cannot be compiled ahead of time (jax.pmap has no lowering for devices "
                     "that are not attached); these are the mesh driver's programs, same per-chip batch")
    if cfg.train.grad_accum > 1:
        notes.append(f"train.grad_accum={cfg.train.grad_accum} makes the train step a loop over micro-batches, whose "
                     "body XLA's cost analysis counts once: its FLOPs and bytes are low by up to that factor (the "
                     "estimate takes the larger of XLA's FLOPs and the model FLOPs)")
    if cfg.data.packing:
        notes.append("data.packing: R = train.batch_size packed rows of data.max_length (the most a step can need, "
                     "when every example fills a row; with shorter examples the trainer's R is smaller: "
                     "`python -m spafit_jax.aot_epoch` derives it from a length distribution)")
    elif cfg.data.max_shapes is not None:
        notes.append("data.max_shapes fits the bucket lengths to the data: compiled at data.max_length only")
    rows = [compile_program(s, kind, b, n) for kind, b, n in programs(s, shapes, steps)]
    extra = {"notes": notes}
    if find_max and any(r["kind"] == "train" for r in rows):
        longest = max((r for r in rows if r["kind"] == "train"), key=lambda r: r["seq_len"])
        best, probes, bounded = max_batch(s, longest["seq_len"], longest, progress=progress)
        extra.update(max_batch=best, max_batch_seq_len=longest["seq_len"], max_batch_probes=len(probes) - 1,
                     max_batch_bounded=bounded)
    return rows, s, extra
