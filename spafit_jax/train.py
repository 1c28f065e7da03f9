"""`spafit-train` / `python -m spafit_jax.train`: fine-tune a BERT with SPAFIT (or a baseline) and evaluate it.

The work: `spafit_jax/training/trainer.py`.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import sys

from spafit_jax import cli
from spafit_jax.training import trainer


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`): bad input is one line on stderr and exit status 2;
    Ctrl-C checkpoints and exits 130 (a second Ctrl-C aborts at once)."""
    def work() -> int:
        cfg, args = cli.parse_args(argv)
        run = trainer.train_and_evaluate(cfg, args.workdir, overwrite=args.overwrite)
        return 130 if run.interrupted else 0

    return cli.run_command(work, interrupted="interrupted; nothing was saved since the last checkpoint (if any); "
                                             "re-run the same command to resume from it")


if __name__ == "__main__":
    sys.exit(main())
