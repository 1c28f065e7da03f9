"""`python -m spafit_jax.predict --workdir RUN --input FILE`: label new text with a trained run.

The work: `spafit_jax/after_training/predicting.py`.
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import sys
from typing import Sequence

from spafit_jax.after_training import predicting
from spafit_jax.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.predict`."""
    p = argparse.ArgumentParser(prog="python -m spafit_jax.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--input", required=True, help="csv/tsv/json/jsonl/parquet/txt file, or - for stdin")
    p.add_argument("--output", help="output file: .jsonl or .csv / .tsv (default, or -: JSON lines on stdout); never "
                   "the --input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--encoding", default="utf-8", help="encoding of the --input file or stdin (default: utf-8)")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number (default: best)")
    p.add_argument("--text-column", help="column of the first text (default: the run's)")
    p.add_argument("--text-pair-column", help="column of the second text (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: train.eval_batch_size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`); bad input is one line on stderr and exit status 2."""
    from spafit_jax import cli
    from spafit_jax.after_training.run import load_run

    parser = build_parser()
    parser.prog = cli.program("predict")
    args = parser.parse_args(argv)

    def work():
        if args.batch_size is not None and args.batch_size < 1:
            raise DataError(f"--batch-size {args.batch_size} must be >= 1; leave it out for train.eval_batch_size")
        predicting.check_input(args.input, args.encoding)
        output = predicting.check_output(args.output, args.input, args.overwrite, args.workdir)  # before any work
        spec = predicting.run_spec(args.workdir) or load_run(args.workdir, args.checkpoint).spec  # the latter raises
        if args.text_pair_column and spec.text_b is None:
            raise DataError(f"--text-pair-column {args.text_pair_column}: the task of {args.workdir} "
                            f"({spec.name}) takes single texts; leave --text-pair-column out")
        texts, pairs = predicting.read_texts(args.input, args.text_column or spec.text_a,
                                  args.text_pair_column or spec.text_b, args.encoding)
        run = load_run(args.workdir, args.checkpoint)
        batch = args.batch_size or run.config.train.eval_batch_size
        predictions = run.predict(texts, pairs, batch_size=batch, progress=len(texts) > predicting.PROGRESS_ABOVE)
        predicting.write(predicting.rows(run, predictions), output)

    return cli.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
