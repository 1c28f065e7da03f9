"""The one command-line wrapper every command runs in (`cli.run_command`) and the program names it shows."""

import errno
import sys

import pytest

from spafit_jax import aot, cli, experiment, export, predict, protocol, report, train
from spafit_jax.errors import ConfigError


@pytest.mark.parametrize("argv0,want", [("/venv/bin/spafit-train", "spafit-train"),
                                        ("/x/spafit_jax/train.py", "python -m spafit_jax.train"),
                                        ("spafit-predict", "python -m spafit_jax.train")])
def test_program_name_follows_the_console_script(monkeypatch, argv0, want):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert cli.program("train") == want


@pytest.mark.parametrize("main", [train.main, predict.main, export.main, experiment.main, report.main, protocol.main,
                                  aot.main])
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


@pytest.mark.parametrize("main,args", [(protocol.main, ["{tmp}/no-experiment"]),
                                       (aot.main, ["--topology", "v9z:1x1"])])
def test_protocol_and_aot_say_bad_input_in_one_line_through_run_command(main, args, tmp_path, capsys):
    """Like every command: one `error:` line naming the problem and its fix, exit status 2, nothing written."""
    status = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not list(tmp_path.iterdir())
