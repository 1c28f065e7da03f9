"""`python -m spafit_jax.aot --topology v5e:2x4`: compile the trainer's programs for a TPU topology on a CPU host.

The work: `spafit_jax/tpu/ahead.py`.
"""

from __future__ import annotations

import argparse
import json
import sys

from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.config.files import load_config
from spafit_jax.tpu import ahead


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.aot` (`spafit-aot`)."""
    from spafit_jax import cli

    p = argparse.ArgumentParser(
        prog=cli.program("aot"),
        description="Compile the trainer's train and eval steps for a TPU topology on this (CPU) machine, from "
                    "shapes only, and report HBM per chip, FLOPs and an estimated step time. Needs libtpu: "
                    + tpu_specs.install_hint() + ". Exit status 2 when a program does not fit.",
        epilog="examples:\n  python -m spafit_jax.aot --topology v5litepod-8 --config configs/glue/sst2.yaml "
               "--config configs/methods/spafit.yaml\n  python -m spafit_jax.aot --topology v4:4x4x4 --json "
               "model.name=bert-base-uncased train.batch_size=256\n\ntopologies: "
               + tpu_specs.TOPOLOGY_HELP + "\nnamed architectures (no download): " + ", ".join(tpu_specs.ARCHITECTURES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v4:4x4x4, or an accelerator "
                   "type: v4-8, v5litepod-8, v5p-8, v6e-8")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable), as train")
    p.add_argument("--shapes", choices=("all", "largest"), default="all",
                   help="compile every bucket length (all) or only the longest (largest: the most memory)")
    p.add_argument("--steps", choices=("both", "train", "eval"), default="both", help="which steps to compile")
    p.add_argument("--max-batch", action="store_true", help="also find the largest global train batch that fits")
    p.add_argument("--json", action="store_true", help="one JSON object per line and program")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as train")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`): 0 when every program fits, 2 when one does not or the
    input is bad (one line on stderr)."""
    from spafit_jax import cli

    args = build_parser().parse_intermixed_args(argv)

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        tpu_specs.prepare(compile_cache=False)
        report = lambda r: print(f"--max-batch: {r['program']} needs {r['hbm_per_chip_bytes'] / ahead.GIB:.2f} GiB per chip: "  # noqa: E731
                                 f"{'fits' if r['fits'] else 'does not fit'}", file=sys.stderr, flush=True)
        rows, s, extra = ahead.run(cfg, args.topology, shapes=args.shapes, steps=args.steps, find_max=args.max_batch,
                             progress=report)
        if args.json:
            for r in rows:
                print(json.dumps(r))
            if "max_batch" in extra:
                print(json.dumps({"max_batch": extra["max_batch"], "seq_len": extra["max_batch_seq_len"],
                                  "topology": s.topo.name, "probes": extra["max_batch_probes"],
                                  "bounded": extra["max_batch_bounded"]}))
        else:
            print(ahead.format_table(rows, s.topo))
            for note in extra["notes"]:
                print(f"note: {note}")
            if "max_batch" in extra:
                bound = (f" or more (the search's bound: {ahead.MAX_ROWS_PER_CHIP} examples per chip)"
                         if extra["max_batch_bounded"] else "")
                print(f"largest train batch that fits at T={extra['max_batch_seq_len']}: {extra['max_batch']}{bound} "
                      f"after {extra['max_batch_probes']} more compiles")
        bad = [r for r in rows if not r["fits"]]
        if bad:
            print(f"error: {ahead.advice(bad[0], s)}", file=sys.stderr)
            return 2
        return 0

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
