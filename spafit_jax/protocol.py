"""`python -m spafit_jax.protocol EXP [--out DIR] [--publish DIR]`: the report of an experiment run with a `select:`
section; `python -m spafit_jax.protocol --from-published DIR`: the same tables recomputed from published evidence.

The work: `spafit_jax/experiments/protocol_report.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spafit_jax.experiments import protocol_report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2; a
    published table that its evidence does not reproduce exits 1."""
    from spafit_jax import cli

    p = argparse.ArgumentParser(prog=cli.program("protocol"), description=__doc__.split("\n\n")[0])
    p.add_argument("exp", metavar="EXP", nargs="?", help="the experiment folder (--workdir of an experiment with select:)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="where to write (default EXP/report, or with --from-published: "
                                                  "write the recomputed tables there instead of comparing)")
    where.add_argument("--publish", metavar="DIR", help="write the report and the evidence (predictions, each cell's "
                                                      "results and config, counts) for docs/results/<name>")
    p.add_argument("--from-published", metavar="DIR", help="recompute the tables from DIR's evidence and compare "
                                                           "them with DIR's (exit 1 if any differs)")
    args = p.parse_args(argv)
    if (args.exp is None) == (args.from_published is None):
        p.error("name an experiment folder EXP, or --from-published DIR (not both)")
    if args.from_published and args.publish:
        p.error("--publish reads an experiment folder, not --from-published")

    def work() -> int:
        if args.from_published:
            differ = protocol_report.recompute(args.from_published, args.out)
            if differ:
                print(f"error: {', '.join(differ)} of {args.from_published} differ from what its evidence gives; "
                      "republish it with --publish", file=sys.stderr)
                return 1
            print(f"recomputed from {args.from_published}/evidence: " +
                  (f"written to {args.out}" if args.out else f"{', '.join(protocol_report.TABLES)} identical"))
            return 0
        files = protocol_report.write_report(args.exp, args.publish or args.out, publish=bool(args.publish))
        print(f"report: {', '.join(str(f) for f in files.values())}")
        return 0

    return cli.run_command(work, compile_cache=False)


if __name__ == "__main__":
    sys.exit(main())
