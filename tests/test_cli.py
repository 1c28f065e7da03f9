"""The one command-line wrapper every command runs in (`cli.run_command`) and the program names it shows."""

import errno
import sys

import pytest

from spafit_jax import cli, experiment, export, predict, report, train
from spafit_jax.errors import ConfigError


@pytest.mark.parametrize("argv0,want", [("/venv/bin/spafit-train", "spafit-train"),
                                        ("/x/spafit_jax/train.py", "python -m spafit_jax.train"),
                                        ("spafit-predict", "python -m spafit_jax.train")])
def test_program_name_follows_the_console_script(monkeypatch, argv0, want):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert cli.program("train") == want


@pytest.mark.parametrize("main", [train.main, predict.main, export.main, experiment.main, report.main])
def test_every_command_shows_its_console_script_name(main, monkeypatch, capsys):
    name = main.__module__.rsplit(".", 1)[1]
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/spafit-{name}"])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: spafit-{name} ")


def _raise(exc):
    def work():
        raise exc
    return work


@pytest.mark.parametrize("work,status,line", [
    (lambda: None, 0, None),
    (lambda: 1, 1, None),
    (_raise(ConfigError("train.lr=-1 must be > 0; use e.g. train.lr=1e-3")), 2, "error: train.lr=-1 must be > 0"),
    (_raise(OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")), 2,
     "error: /runs/a/metrics.jsonl: No space left on device; free disk space"),
    (_raise(KeyboardInterrupt()), 130, "stopped here"),
])
def test_run_command_turns_errors_into_one_line_and_a_status(work, status, line, capsys):
    assert cli.run_command(work, compile_cache=False, interrupted="stopped here") == status
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.startswith(line) and err.count("\n") == 1, err


def test_a_bug_is_not_hidden():
    with pytest.raises(ZeroDivisionError):
        cli.run_command(lambda: 1 / 0, compile_cache=False)
