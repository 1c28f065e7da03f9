"""`python -m spafit_jax.export --workdir RUN --out DIR --format hf|peft|flax`: take a trained model out.

The work: `spafit_jax/after_training/exporting.py`.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import sys
from typing import Sequence

from spafit_jax.after_training import outputs
from spafit_jax.after_training import exporting


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli
    from spafit_jax.after_training.run import load_run

    p = argparse.ArgumentParser(prog=cli.program("export"), description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the run folder")
    p.add_argument("--out", required=True,
                   help="the folder to write: new, empty, or an earlier export with --overwrite")
    p.add_argument("--format", required=True, choices=exporting.FORMATS, help="hf (merged PyTorch), peft (adapter) or flax")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number (default: best)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (whole)")
    args = p.parse_args(argv)

    def work():
        outputs.check_folder(args.out, overwrite=args.overwrite, **exporting.protected(args.workdir))  # before loading
        out = exporting.export(load_run(args.workdir, args.checkpoint), args.out, args.format, overwrite=args.overwrite)
        print(f"wrote {args.format} export to {out}")

    return cli.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
