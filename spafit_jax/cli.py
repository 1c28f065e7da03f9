"""The command lines: the one wrapper every command runs in (`run_command`, `program`), and the trainer's
parser (argparse over `config.load_config`)."""

import argparse
import dataclasses
import logging
import os
import sys
from typing import Callable, Sequence

import yaml

from spafit_jax.training import rundir
from spafit_jax.config.files import CONFIGS_DIR, SECTIONS, Config, default, format_value, load_config, to_dict
from spafit_jax.errors import SpafitError

__all__ = ["build_parser", "parse_args", "format_fields", "program", "run_command"]


def program(command: str) -> str:
    """The program name a command's usage and errors show: `spafit-<command>` when it runs as that console
    script (sys.argv[0]), else `python -m spafit_jax.<command>`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name == f"spafit-{command}" else f"python -m spafit_jax.{command}"


def run_command(work: Callable[[], int | None], *, compile_cache: bool = True,
                interrupted: str = "interrupted; re-run the same command to resume") -> int:
    """Runs a command line's `work` the way every command does, returning the exit status.

    Logging at WARNING (Orbax's and the datasets library's routine notices off), the persistent compile
    cache on (`compiling.use_compile_cache`, unless `compile_cache` is False), then `work()`: its status
    (None is 0); a SpafitError or an OSError (the path, what happened, what to do:
    `rundir.describe_os_error`) is one `error:` line on stderr and status 2; Ctrl-C is the line
    `interrupted` and status 130. argparse's own usage errors (status 2) and --help (0) pass through.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notices
    try:
        import datasets

        datasets.disable_progress_bars()  # "Generating train split" bars of small files
    except ImportError:  # the light install: masking and LoRA only
        pass
    try:
        if compile_cache:
            from spafit_jax.training.compiling import use_compile_cache

            use_compile_cache()  # a rerun or a resume loads the compiled steps
        status = work()
    except SpafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {rundir.describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def format_fields() -> str:
    """Every config field with its default and a short description, grouped by section."""
    lines = []
    for s, cls in SECTIONS.items():
        lines.append(f"  {s}:  {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            left = f"    {s}.{f.name} = {format_value(default(s, f.name))}"
            lines.append(f"{left:<44} {f.metadata.get('help', '')}" if len(left) < 44 else
                         f"{left}\n{'':<44} {f.metadata.get('help', '')}")
    return "\n".join(lines)


_DESCRIPTION = """\
Fine-tune a BERT encoder with SPAFIT (Stratified Progressive Adaptation Fine-tuning): layers below N1
stay frozen, layers N1..N2-1 train only their biases (BitFit), layers N2..L-1 train LoRA adapters plus
biases, and the task head trains. Full fine-tuning, BitFit, LoRA and head-only run from the same CLI."""

_EXAMPLES = """\
examples:
  # the offline demo: MiniLM on BBC News with SPAFIT (N1=2, N2=4 of 6 layers), 1 epoch, CPU is enough
  python -m spafit_jax.train

  # a GLUE task with bert-large-cased, as in the paper; later --config files win
  python -m spafit_jax.train --config configs/glue/sst2.yaml --config configs/methods/spafit.yaml

  # dotted overrides (values are YAML) after the files
  python -m spafit_jax.train train.max_steps=100 train.log_every=5
  python -m spafit_jax.train --config configs/glue/rte.yaml --config configs/methods/lora.yaml \\
      train.lr=5e-4 method.lora_targets=[query,key,value] --workdir runs/rte-lora

  # length-grouped batches and 8 fitted bucket lengths are the default; the frozen layers can run once
  # (faster, but no dropout in them); data.group_by_length=false data.max_shapes=null: the older batching
  python -m spafit_jax.train --config configs/tweets.yaml train.cache_frozen=true

  # print the resolved config and exit
  python -m spafit_jax.train --config configs/glue/mnli.yaml --config configs/methods/bitfit.yaml --print-config

shipped config files (--config glue/mrpc.yaml finds one from any folder; default.yaml is the offline demo;
experiments/ holds grids for python -m spafit_jax.experiment --config experiments/<name>.yaml):
{shipped}
Every run writes its resolved config to <workdir>/config.yaml, which --config accepts.

compiled steps are kept in ~/.cache/spafit_jax/jax (a rerun, a resume or another seed loads them);
SPAFIT_COMPILE_CACHE=DIR moves it, SPAFIT_COMPILE_CACHE=off turns it off. On a CPU the programs
compile at XLA's backend level 2 (same speed, less compile time); XLA_FLAGS=--xla_backend_optimization_level=3
restores XLA's default.
"""


def shipped_configs() -> str:
    """The shipped config files, one line per folder (configs/, glue/, methods/, experiments/, ...)."""
    root = CONFIGS_DIR
    folders = sorted({p.parent for p in root.rglob("*.yaml")}, key=lambda d: (d != root, str(d)))
    return "\n".join(f"  {'configs/' if d == root else d.relative_to(root).as_posix() + '/'}: "
                     + " ".join(sorted(p.name for p in d.glob("*.yaml"))) for d in folders)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.train`."""
    parser = argparse.ArgumentParser(
        prog=program("train"),
        description=_DESCRIPTION,
        epilog=_EXAMPLES.format(shipped=shipped_configs()) + "\nconfig fields (section.key = default), settable in YAML or as overrides:\n"
        + format_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help="YAML config file; repeat to compose (later files win, key by key). "
        "Without any, the built-in defaults run the offline demo. See configs/.",
    )
    parser.add_argument(
        "--workdir", default=None, metavar="DIR",
        help="run folder for config.yaml, metrics.jsonl, TensorBoard events, checkpoints and results.json "
        "(default: runs/<task>-<method>-<timestamp>). Re-running with the same DIR resumes an unfinished run.",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="allow reusing a DIR that holds a finished run (its results are replaced)",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="override config fields, e.g. train.lr=5e-4 method.n1=8 method.lora_targets=[query,value]",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line and load the config it names. Raises ConfigError; --help exits 0.

    Options may come before, between or after the overrides. With --print-config the resolved
    YAML is printed and SystemExit(0) raised.
    """
    parser = build_parser()
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False))
        raise SystemExit(0)
    return config, args
