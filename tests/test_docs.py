"""Every command and code block of README.md and docs/*.md runs as written (docs/results/ aside).

The convention the pages follow:

- ```bash and ```python blocks run, in page order, from a fresh working folder per page that holds
  links to the repository's top-level files and folders (so `--config configs/...` reads the real
  configs and `runs/...` is written in the temporary folder). A page's python blocks share one
  namespace; its bash and python blocks share the folder, so a later block may use an earlier one's run.
- A bash line `python -m spafit_jax.X ARGS` or `spafit-X ARGS` (console scripts from pyproject.toml)
  without shell operators runs in this process, as the command's `main()` with `sys.argv` set, exactly
  as `python -m` or the console script would call it; it must exit 0. Any other line runs with `bash -e`
  (this interpreter's folder first on PATH) and must exit 0; a `VAR=value` line sets a variable for
  the page's later lines (each line is its own shell, so `cd` or `export` do not carry over).
- ```bash requires-network, ```bash requires-tpu and ```bash requires-time blocks (the hub or a
  package index, a TPU VM or gcloud, or minutes to hours of compute) are not run; each of their
  command lines is checked offline instead (after `$VAR` / `${VAR}` of the page's earlier `VAR=value`
  lines are put in; a line still holding a `$`, e.g. inside a loop, gets only the path check):
  `train` resolves its config with `--print-config`, `experiment` lists its cells with `--dry-run`,
  every other `spafit_jax` command parses its arguments (argparse) and each `--config` file exists;
  a `tpu_scripts/*.sh` line runs with `--dry-run` (it prints the gcloud commands, calls nothing);
  `make T` names a Makefile target; a path under a repository folder (configs/, tpu_scripts/, ...) exists.
  ```python requires-... blocks are compiled, not run.
- Other blocks (```text, ```yaml, ```console, no language) are not run.
- The same train command (same arguments) on a later page reuses the earlier page's run folder.
"""

import argparse
import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
TAGS = ("requires-network", "requires-tpu", "requires-time")
SHELL_OPERATORS = re.compile(r"[|;&<>`$()]")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAINED: dict[tuple[str, ...], Path] = {}  # a train command's arguments -> its run folder


def blocks(page: str) -> list[tuple[str, str, str, int]]:
    """(language, tag, code, line) of every fenced block of a page."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^```([\w-]*)[ \t]*([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        found.append((m.group(1), m.group(2), m.group(3), text.count("\n", 0, m.start()) + 1))
    return found


def commands(code: str) -> list[str]:
    """The logical lines of a bash block: continuations joined, a here-document kept with its line,
    comments and blank lines dropped."""
    lines, rest = [], code.replace("\\\n", " ").splitlines()
    while rest:
        line = rest.pop(0)
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)", line)
        if heredoc:
            end = rest.index(heredoc.group(1))
            line, rest = "\n".join([line, *rest[:end + 1]]), rest[end + 1:]
        if line.strip() and shlex.split(line.splitlines()[0], comments=True):
            lines.append(line.strip())
    return lines


def console_scripts() -> dict[str, str]:
    """`spafit-X` -> "module:function" from pyproject.toml's [project.scripts]."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section.group(1) if section else "", re.M))


def entry(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(module, function, args) of a spafit_jax command line, None for anything else."""
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("spafit_jax."):
        return words[2], "main", words[3:]
    scripts = console_scripts()
    if words[0] in scripts:
        module, function = scripts[words[0]].split(":")
        return module, function, words[1:]
    return None


def call(module: str, function: str, prog: str, args: list[str]) -> int:
    """Runs a command's entry point in this process with sys.argv set; its exit status."""
    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        status = getattr(importlib.import_module(module), function)()
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = saved
    return 0 if status is None else status if isinstance(status, int) else 1


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


@contextlib.contextmanager
def parse_only():
    """argparse raises _Parsed(namespace) once the outermost parse of a command line is done."""
    originals = {n: getattr(argparse.ArgumentParser, n) for n in ("parse_known_args", "parse_known_intermixed_args")}
    depth = [0]

    def wrap(original):
        def parse(self, *a, **k):
            depth[0] += 1
            try:
                result = original(self, *a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result[0])
            return result
        return parse

    for name, original in originals.items():
        setattr(argparse.ArgumentParser, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(argparse.ArgumentParser, name, original)


def check_offline(line: str, where: str, capsys, variables: dict[str, str]) -> None:
    """A command line of a requires-... block, checked as far as it can be without running it."""
    for name, value in variables.items():
        line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
    words = shlex.split(line, comments=True)
    assignment = re.fullmatch(r"(\w+)=(\S*)", " ".join(words))
    if assignment:
        variables[assignment.group(1)] = assignment.group(2)
        return
    target = entry(words)
    unresolved = "$" in line  # a loop variable, a command substitution: only the paths can be checked
    if unresolved or words[0] in ("for", "do", "done", "if", "then", "else", "fi", "while"):
        pass
    elif target and target[0] == "spafit_jax.train":
        assert call(*target[:2], words[0], [*target[2], "--print-config"]) == 0, f"{where}: {line}"
    elif target and target[0] == "spafit_jax.experiment":
        assert call(*target[:2], words[0], [*target[2], "--dry-run"]) == 0, f"{where}: {line}"
    elif target:
        with parse_only(), pytest.raises(_Parsed) as parsed:
            call(*target[:2], words[0], target[2])
        configs = getattr(parsed.value.namespace, "config", None) or []
        for path in [configs] if isinstance(configs, str) else configs:
            assert Path(path).exists(), f"{where}: {path} does not exist ({line})"
    elif re.fullmatch(r"tpu_scripts/\w+\.sh", words[0]):  # they print what they would run, gcloud not needed
        proc = subprocess.run(["bash", words[0], "--dry-run", *words[1:]], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{where}: `{line}` --dry-run exited {proc.returncode}: {proc.stderr[-2000:]}"
    elif words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for goal in words[1:]:
            assert re.search(rf"^{re.escape(goal)}:", makefile, re.M), f"{where}: no Makefile target {goal}"
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - {"runs"}
    for word in words:
        if word.split("/")[0] in tops and "/" in word and not re.search(r"[*?$]", word):
            assert Path(word).exists(), f"{where}: {word} does not exist ({line})"
    capsys.readouterr()


def run_line(line: str, where: str, folder: Path, capsys, variables: dict[str, str]) -> str:
    """A bash command line, in this process when it is a spafit_jax command, else with bash -e (the page's
    `VAR=value` lines in its environment); its stdout."""
    words = shlex.split(line, comments=True)
    assignment = re.fullmatch(r"(\w+)=(\S*)", " ".join(words))
    if assignment:
        variables[assignment.group(1)] = assignment.group(2)
        return ""
    target = None if SHELL_OPERATORS.search(line) else entry(words)
    if target is None:
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])  # python, spafit-X
        proc = subprocess.run(["bash", "-ec", line], cwd=folder, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **OFFLINE, **variables, "PATH": path})
        assert proc.returncode == 0, f"{where}: `{line}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout
    module, function, args = target
    workdir = args[args.index("--workdir") + 1] if "--workdir" in args else None
    key = tuple(words)
    if module == "spafit_jax.train" and key in TRAINED and workdir and not Path(workdir).exists():
        shutil.copytree(TRAINED[key], workdir, symlinks=True)
        return ""
    status = call(module, function, words[0], args)
    out = capsys.readouterr()
    assert status == 0, f"{where}: `{line}` exited {status}\n{out.out[-3000:]}\n{out.err[-3000:]}"
    if module == "spafit_jax.train" and workdir:
        TRAINED[key] = folder / workdir
    return out.out


def workspace(tmp_path: Path) -> Path:
    """A folder that reads like the repository root: links to its top-level entries, no runs/."""
    for entry_ in ROOT.iterdir():
        if not entry_.name.startswith(".") and entry_.name not in ("runs", "exported"):
            (tmp_path / entry_.name).symlink_to(entry_)
    return tmp_path


@pytest.mark.parametrize("page", PAGES)
def test_page_blocks_run(page, tmp_path, monkeypatch, capsys):
    """Each runnable block of a page runs; each requires-... block's commands are checked offline."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    folder = workspace(tmp_path)
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": "__docs__"}
    printed: dict[str, str] = {}  # a command line -> what it printed
    variables: dict[str, str] = {}  # the page's shell variables (VAR=value lines)
    for language, tag, code, line in blocks(page):
        where = f"{page}:{line}"
        assert not tag or tag in TAGS, f"{where}: unknown block tag {tag!r}; use one of {TAGS} or none"
        if language == "python":
            compiled = compile(code, where, "exec")
            if not tag:
                exec(compiled, namespace)
        elif language == "bash":
            for command in commands(code):
                if tag:
                    check_offline(command, where, capsys, variables)
                else:
                    printed[command] = run_line(command, where, folder, capsys, variables)
    left_behind(page, printed)


def _json_lines(text: str) -> int:
    return sum(line.startswith("{") for line in text.splitlines())


def left_behind(page: str, printed: dict[str, str]) -> None:
    """What a page's commands must have written or printed, beyond exiting 0 (cwd: its folder)."""
    if page in ("README.md", "docs/after-training.md"):
        assert _json_lines(Path("predictions.jsonl").read_text()) == 2  # articles.txt: two texts
        assert (Path("exported/hf/config.json").exists() and Path("exported/hf/model.safetensors").exists())
    if page == "docs/after-training.md":
        csv_predict = next(out for line, out in printed.items() if "predict" in line and "articles.csv" in line)
        assert _json_lines(csv_predict) == 3, csv_predict  # articles.csv: three rows, JSON lines on stdout
        assert Path("exported/peft/adapter_config.json").exists() and Path("exported/flax/flax_model.msgpack").exists()
    if page == "docs/experiments.md":
        table = Path("runs/exp-tiny/report/table.md").read_text()
        assert "spafit@n1=1" in table and "spafit@n1=2" in table, table


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names a file or folder of the repository."""
    missing = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target) and not ((ROOT / page).parent / target).exists():
                missing.append(f"{page}: {target}")
    assert not missing, missing
