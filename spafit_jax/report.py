"""`python -m spafit_jax.report EXP [RUN_FOLDERS...] [--out DIR]`: finished runs as a table and pictures.

The work: `spafit_jax/experiments/reporting.py`.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from spafit_jax.experiments import reporting
from spafit_jax.experiments.tables import ReportError


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli

    p = argparse.ArgumentParser(prog=cli.program("report"), description=__doc__.split("\n\n")[0])
    p.add_argument("exp", metavar="EXP", help="experiment folder (its runs/), or a run folder")
    p.add_argument("folders", nargs="*", metavar="RUN_FOLDER", help="more run folders to compare")
    p.add_argument("--out", metavar="DIR", help="where to write (default EXP/report)")
    args = p.parse_args(argv)

    def work() -> None:
        if not Path(args.exp).is_dir():
            raise ReportError(f"{args.exp} is not a folder; pass an experiment folder (--workdir of the experiment)")
        files = reporting.write_report(args.exp, args.folders, args.out)
        print(f"report: {files['index.html']} ({', '.join(files)})")

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
