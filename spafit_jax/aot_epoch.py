"""`python -m spafit_jax.aot_epoch --topology v5e-8 --tokenizer minilm data.task=tweets`: an ESTIMATED epoch on a TPU.

The work: `spafit_jax/tpu/epoch.py`.
"""

from __future__ import annotations

import argparse
import json
import sys

from spafit_jax.tpu import specs as tpu_specs
from spafit_jax.config.files import load_config
from spafit_jax.errors import DataError
from spafit_jax.tpu import epoch


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.aot_epoch`."""
    p = argparse.ArgumentParser(
        prog="python -m spafit_jax.aot_epoch",
        description="Estimate one training epoch and one evaluation of a real length distribution on a TPU "
                    "topology, bucketed (today's batching) against packed (data.packing=true), from programs "
                    "compiled for the topology on this machine. Every time is an estimate. Needs libtpu: "
                    + tpu_specs.install_hint() + ".",
        epilog="examples:\n  python -m spafit_jax.aot_epoch --topology v5litepod-8 --tokenizer minilm "
               "model.name=bert-large-cased data.task=tweets\n  python -m spafit_jax.aot_epoch --topology v5e:2x4 "
               "--lengths train.txt --eval-lengths dev.txt --config configs/glue/sst2.yaml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="as `python -m spafit_jax.aot --topology`")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable), as train")
    p.add_argument("--lengths", metavar="FILE", help="train token counts, one per line (else data.task is tokenised)")
    p.add_argument("--eval-lengths", metavar="FILE", help="with --lengths: evaluation token counts (else no eval)")
    p.add_argument("--tokenizer", metavar="NAME", help="without --lengths: the tokenizer that tokenises data.task "
                   "(default model.name; a named architecture such as bert-large-cased has none offline)")
    p.add_argument("--compile", choices=("all", "none"), default="all",
                   help="all: compile every shape (roofline step); none: our FLOPs at peak only, a lower bound")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as train")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`): 0, or 2 with one line for bad input."""
    from spafit_jax import cli

    args = build_parser().parse_intermixed_args(argv)

    def show(r):  # each program as it compiles (they can take minutes each): JSON on stdout, else a line
        if args.json:
            print(json.dumps(r), flush=True)
        elif args.compile == "all":
            print(f"compiled {r['strategy']} {r['program']}: est. step {epoch.seconds_text(r['est_step_seconds'])} s in "
                  f"{r['compile_seconds']:.0f} s", file=sys.stderr, flush=True)

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        tpu_specs.prepare(compile_cache=False)
        if args.eval_lengths and not args.lengths:
            raise DataError("--eval-lengths needs --lengths (the train token counts)")
        if args.lengths:
            train = epoch.read_lengths(args.lengths, cfg.data.max_length)
            evl = epoch.read_lengths(args.eval_lengths, cfg.data.max_length) if args.eval_lengths else None
        else:
            train, evl = epoch.task_lengths(cfg, args.tokenizer or cfg.model.name)
        records = epoch.estimate(cfg, args.topology, train, evl, compile_=args.compile == "all", progress=show)
        if args.json:
            print("\n".join(json.dumps(r) for r in records if r["record"] != "aot_epoch_program"))
        else:
            print(epoch.format_text(records))
        return 0

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
