"""`python -m spafit_jax.experiment`: a grid of runs (tasks x methods x grid points x seeds), then a report.

An experiment file (YAML) names what every cell shares and what varies:

    configs: [configs/default.yaml]            # base config files, in order
    overrides: {data.limit_train: 512}         # dotted config keys for every cell
    tasks:                                     # name -> config files and/or keys
      bbc_news: {data.task: bbc_news}
    methods:                                   # name -> config files and/or keys (and an own grid)
      bitfit: {config: configs/methods/bitfit.yaml}
      spafit: {method.name: spafit, grid: {method.n1: [1, 2], method.n2: [3, 4]}}
    grid: {}                                   # key -> values, for every method
    budgets: {short: {train.epochs: 2}, long: {train.epochs: 4}}   # optional: every method at every budget
    seeds: [0, 1, 2]                           # or a count: 3

Each cell is an ordinary run folder `EXP/runs/<task>/<method>/seed<k>` trained in this process
by `train.train_and_evaluate`, so resume, checkpoints and logs hold per cell. A cell's config is
`load_config(base + task + method files, base + task + method + grid keys, train.seed, command
line overrides)`. A bare name (`tasks: [bbc_news]`, `methods: [bitfit]`) sets data.task or
method.name; a file name (`tasks: [configs/glue/rte.yaml]`) is a config file. A grid point's
values become part of its method name (`spafit@n1=1,n2=3`); grid points that are not valid
configs (n1 > n2) are dropped with a note. With `budgets:` every method trains at every budget, named
`<method>-<budget>` (`full-long`); a task or method may not set a key the budgets declare. Re-running skips finished cells (results.json; a
note names the keys in which their config.yaml differs from the cell's config now), resumes
unfinished ones and retries failed ones; a failing cell writes its one-line error to
`<cell>/error.txt` and the grid goes on (`--fail-fast` stops). The folder records the experiment
(`experiment.yaml`, `experiment.json`): a changed experiment file on the same folder is refused (a new
--workdir), a folder holding a user's own experiment.yaml is left alone, and cells that ran on another
git commit are refused unless --allow-mixed-commits (then recorded).
"""

from __future__ import annotations
__import__("spafit_jax.launch").launch.require_extra(__name__)  # the [train] extra, before its imports

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from spafit_jax.experiments import expstate, selection
from spafit_jax.training import rundir
from spafit_jax.errors import ConfigError, SpafitError
from spafit_jax.experiments.grid import experiment_file, load_experiment, run_cells, select, tally


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m spafit_jax.experiment`."""
    p = argparse.ArgumentParser(prog="python -m spafit_jax.experiment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="the experiment file:\n\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, metavar="FILE", help="experiment file (configs/experiments/*.yaml)")
    p.add_argument("--workdir", required=True, metavar="EXP", help="experiment folder: runs/, report/, experiment.yaml")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only cells whose task/method/seed<k> matches (glob, or a substring); repeatable")
    p.add_argument("--shard", metavar="i/n", help="run every n-th selected cell from the i-th (0 <= i < n)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, train nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing cell")
    p.add_argument("--no-report", action="store_true", help="do not write EXP/report at the end")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="train here although cells of the experiment ran on another git commit (recorded)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every cell")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`cli.run_command`): 0 when every selected cell finished, 1 when some failed,
    2 for bad input, 130 on Ctrl-C."""
    from spafit_jax import cli

    parser = build_parser()
    parser.prog = cli.program("experiment")
    args = parser.parse_intermixed_args(None if argv is None else list(argv))

    def work() -> int:
        if selection.wanted(args.config):
            return selection.search_then_test(args)
        cells, notes = load_experiment(args.config, args.overrides)
        seeds = list(dict.fromkeys(c.seed for c in cells))
        cells = select(cells, args.only, args.shard)
        workdir = Path(args.workdir)
        text = experiment_file(args.config).read_text(encoding="utf-8")
        manifest = expstate.check_folder(workdir, text)
        changes = expstate.check_definition(manifest, {"experiment_file_sha256": expstate.sha(text)}, seeds, workdir)
        from spafit_jax.training.results import code_version

        allow = bool(args.allow_mixed_commits or (manifest or {}).get("allow_mixed_commits"))
        commits = expstate.check_commits(expstate.finished_folders(workdir) if workdir.is_dir() else [],
                                         code_version(), allow)
        for note in notes:
            print(note)
        if args.dry_run:
            for i, cell in enumerate(cells, 1):
                folder = cell.folder(workdir)
                state = ("finished" if (folder / rundir.RESULTS).exists() else "failed before"
                         if (folder / rundir.ERROR).exists() else "unfinished" if folder.exists() else "to do")
                print(f"[{i}/{len(cells)}] {cell.name}: {state} -> {folder}")
            return 0
        try:  # a copy of the experiment file; shards sharing EXP write it at once (they all hold the same text)
            expstate.write(workdir, text, manifest, {"experiment_file_sha256": expstate.sha(text)}, seeds, changes,
                           args.allow_mixed_commits)
        except OSError as e:
            raise ConfigError(f"cannot write {workdir / 'experiment.yaml'} ({e.strerror or e}); choose a writable "
                              "--workdir") from None
        if len(commits) > 1:
            print(f"mixed commits (--allow-mixed-commits): {', '.join(commits)}")
        from spafit_jax.training.compiling import use_compile_cache

        use_compile_cache(workdir / "jax_cache")  # the seeds of a method compile once
        status = run_cells(cells, workdir, fail_fast=args.fail_fast)
        counts, failed = tally(status)
        print(f"{counts['done']} trained, {counts['skipped']} finished before, {counts['failed']} failed, "
              f"{len(cells) - len(status)} not run" + ("; failures:\n" + "\n".join(failed) if failed else ""))
        if not args.no_report:
            from spafit_jax.experiments import reporting

            try:
                out = reporting.write_report(workdir)
                print(f"report: {out['index.html']}")
            except SpafitError as e:
                print(f"report: {e}", file=sys.stderr)
        return 1 if failed else 0

    return cli.run_command(work, compile_cache=False,
                           interrupted="interrupted; re-run the same command to resume (finished cells are kept)")


if __name__ == "__main__":
    sys.exit(main())
