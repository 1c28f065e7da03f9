"""Where the commands after training write (predict's --output, export's --out): checked before any
work, written atomically, and never over what we did not write.

`check_file` / `write_file` serve a single output file (a temporary file beside it, then a rename);
`check_folder` / `replace_folder` serve an export folder, which is written whole into a temporary
folder and swapped in, the old one (an export of ours, `MARKER`) deleted only once the new one is
complete. `run_places` names what a run folder's trainer owns (its files and folders, its base model),
which `check_file` and `check_folder` never let another command write; `check_files_ours` /
`write_files` serve a command that writes named files into a folder the user may share (report's --out):
never over a file that command did not write there (its marker, `.spafit-<command>.json`, lists them).
Every refusal is an `OutputError`: one line naming the path, the option and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from spafit_jax.errors import SpafitError
from spafit_jax.training import rundir
from spafit_jax.training.rundir import write_atomic

MARKER = ".spafit-export.json"  # written into every export folder: the folder is ours to replace
PSEUDO = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
          "pstore", "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "efivarfs", "selinuxfs", "autofs",
          "nsfs", "hugetlbfs", "rpc_pipefs"}  # file systems that look like folders but hold no files


class OutputError(SpafitError):
    """An output path cannot be used as it is (one line: the path, the option, the fix)."""


def _mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, from /proc/self/mountinfo; [] where unreadable."""
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) > 4 and kind:
            out.append((fields[4].replace("\\040", " ").replace("\\011", "\t"), kind[0]))
    return out


def file_system(path: Path) -> str | None:
    """The type of the file system that holds `path` (the longest mount point above it), if known."""
    path, best = str(path), ("", None)
    for point, kind in _mounts():
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, kind)
    if best[1] is None:  # no mount table: the usual places of the kernel's own file systems
        for top, kind in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs")):
            if path == top or path.startswith(top + "/"):
                return kind
    return best[1]


def _place(path: str | os.PathLike, flag: str, what: str) -> Path:
    """`path` as an absolute path, refused (OutputError) when it cannot name a new file or folder."""
    text = os.fspath(path)
    if not str(text).strip():
        raise OutputError(f"{flag} is empty; name the {what} to write")
    if any(ord(c) < 32 or ord(c) == 127 for c in str(text)):
        raise OutputError(f"{flag} {str(text)!r} holds a control character (a pasted newline or tab?); name the "
                          f"{what} without it")
    full = Path(os.path.abspath(Path(text).expanduser()))
    kind = file_system(Path(os.path.realpath(full)))
    if kind in PSEUDO:
        raise OutputError(f"{flag} {full} is on the {kind} pseudo-filesystem, which holds no {what}s; choose a "
                          "path on a disk")
    above = full.parent
    while not above.exists() and not above.is_symlink():
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{flag} {full}: {above} is a file, not a folder; choose a {what} in an existing folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {full}: the folder {above} is not writable; make it writable or choose another "
                          f"{flag}")
    return full


class RunPlaces:
    """What the trainer owns of a run folder (`run_places`): its own files (`rundir.OWN_FILES`, whether or
    not they exist yet), its own folders (`rundir.OWN_FOLDERS`, the moved-aside `.overwritten-*` runs) and
    its base model folder; no other command writes over or into them."""

    def __init__(self, workdir: str | os.PathLike, model_folder: Path | None = None):
        self.folder = Path(os.path.realpath(Path(workdir).expanduser()))
        self.files = {self.folder / name: f"the run's {name}" for name in rundir.OWN_FILES}
        self.sealed = {self.folder / name: f"the run's {name}/" for name in rundir.OWN_FOLDERS}
        self.sealed.update({p: "an earlier run moved aside by --overwrite" for p in self.folder.glob(
            rundir.OVERWRITTEN + "*")})
        if model_folder is not None:
            self.sealed[Path(os.path.realpath(model_folder))] = "the run's base model (model.name)"

    def check_file(self, path: Path, flag: str) -> None:
        """Refuses (OutputError) a file `path` that is one of the run's files or inside one of its folders."""
        real = Path(os.path.realpath(path))
        if real in self.files:
            raise OutputError(f"{flag} {path} is {self.files[real]} ({self.folder}); writing there would break the "
                              f"run: choose a file outside the run's own files, e.g. {self.folder / 'predictions.jsonl'}")
        for folder, what in self.sealed.items():
            if folder == real or folder in real.parents:
                raise OutputError(f"{flag} {path} is inside {what} ({folder}); writing there would change what the "
                                  "run saved: choose a file outside it")

    def export_kwargs(self) -> dict[str, dict[Path, str]]:
        """`check_folder`'s `protected` (the run folder, the base model: never it nor a folder holding it) and
        `sealed` (its own folders: nor inside them) for this run."""
        model = {p: w for p, w in self.sealed.items() if "base model" in w}
        return {"protected": {self.folder: "the run folder", **model},
                "sealed": {p: w for p, w in self.sealed.items() if p not in model}}


def run_places(workdir: str | os.PathLike, model_name: str | None = None) -> RunPlaces:
    """The `RunPlaces` of the run folder `workdir` (its base model from `model_name`, else from its
    config.yaml where readable): what `check_file(runs=...)` and `check_folder` keep other commands out of."""
    from spafit_jax.models import hf

    if model_name is None:
        import yaml

        try:
            raw = yaml.safe_load((Path(workdir) / rundir.CONFIG).read_text(encoding="utf-8"))
            model_name = raw["model"]["name"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
            model_name = None
    try:
        local = model_name and (model_name in hf.ALIASES or Path(model_name).expanduser().exists())
        model = hf.resolve(model_name) if local else None  # a hub id is never downloaded here
    except Exception:  # noqa: BLE001 (a model that is gone, or a hub id offline: nothing there to protect)
        model = None
    return RunPlaces(workdir, model)


def check_file(output: str | os.PathLike, *, flag: str = "--output", inputs: Mapping[str, str] = {},
               overwrite: bool = False, suffixes: Mapping[str, str] = {}, runs: Sequence[RunPlaces] = ()) -> Path:
    """The absolute path of an output file that may be written: none of `inputs` ({flag: path} the command
    reads), none of the files or folders of `runs` (`run_places`), not a folder, not a pseudo-file, ending in
    one of `suffixes` ({suffix: what}; any when empty), and not an existing file unless `overwrite`."""
    check_not_input(output, inputs, flag)
    path = _place(output, flag, "file")
    for places in runs:
        places.check_file(path, flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; name a file in it (e.g. {path / 'predictions.jsonl'})")
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} {path} is not a regular file; choose a file on a disk")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {path}: unknown output type {path.suffix.lower() or '(no suffix)'!r}; end the name "
                          f"in {', '.join(f'{k} ({v})' for k, v in suffixes.items())}")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it or choose another {flag}")
    return path


def check_not_input(output: str | os.PathLike, inputs: Mapping[str, str], flag: str = "--output") -> None:
    """Refuses an output that is one of `inputs` ({flag: path}; "-" is stdin), however it is spelled or linked."""
    for other_flag, other in inputs.items():
        if other and other != "-" and _same(Path(os.path.abspath(Path(output).expanduser())), Path(other)):
            raise OutputError(f"{flag} {output} is the {other_flag} file; writing there would replace what is read: "
                              f"choose another {flag}")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def describe(e: OSError, flag: str) -> str:
    """One line for an OSError met while writing an output: the path, what happened, the fix."""
    path = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space or choose an {flag} on another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make it writable or choose another {flag}"
    else:
        fix = f"check the path and its disk, or choose another {flag}"
    return f"cannot write {path or 'the output'} ({e.strerror or e}); {fix}; nothing was replaced"


def write_file(path: Path, write: Callable[[IO[str]], None], *, flag: str = "--output",
               newline: str | None = None) -> None:
    """Writes `path` atomically with `rundir.write_atomic` (`write(f)` fills a temporary file beside it, which
    then replaces `path`; a failure leaves the old file, or none, and no temporary file). Missing parent folders
    are created; a failure is an `OutputError` that names `flag`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write, per_process=True, newline=newline)
    except OSError as e:
        raise OutputError(describe(e, flag)) from None


def is_export(folder: Path) -> bool:
    """Whether `folder` holds our marker, i.e. an export wrote it."""
    return (folder / MARKER).is_file()


def check_folder(out: str | os.PathLike, *, flag: str = "--out", overwrite: bool = False,
                 protected: Mapping[Path, str] = {}, sealed: Mapping[Path, str] = {}) -> Path:
    """The absolute path of an export folder that may be written: new, empty, or (with `overwrite`) an
    earlier export of ours; never a folder of `protected` or `sealed` ({path: what it is}) nor one that
    holds one, nor a folder inside one of `sealed`."""
    path = _place(out, flag, "folder")
    real = Path(os.path.realpath(path))
    folders = [(p, w, False) for p, w in protected.items()] + [(p, w, True) for p, w in sealed.items()]
    for other, what, no_inside in folders:
        other = Path(os.path.realpath(other))
        inside = no_inside and other in real.parents
        if real == other or inside or real in other.parents:
            where = "is" if real == other else "is inside" if inside else "holds"
            raise OutputError(f"{flag} {path} {where} {what} ({other}); exporting there would write over it: choose "
                              f"a new {flag} folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; choose a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        if not is_export(path):
            raise OutputError(f"{flag} {path} holds files that no export wrote (no {MARKER}); export writes only into "
                              f"a new or empty folder: choose another {flag}")
        if not overwrite:
            raise OutputError(f"{flag} {path} holds an earlier export; pass --overwrite to replace it whole or choose "
                              f"another {flag}")
        added = sorted(set(_files(path)) - set(_written(path)) - {MARKER})
        if added:
            raise OutputError(f"{flag} {path} holds an earlier export and files it did not write "
                              f"({', '.join(added[:3])}); --overwrite would delete them: move them out or choose "
                              f"another {flag}")
    return real  # a link to a folder: the folder it names is replaced, not the link


def _files(folder: Path) -> list[str]:
    """The files under `folder`, as '/'-joined relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _written(folder: Path, marker: str = MARKER) -> list[str]:
    """The files `marker` (an export folder's by default) says were written there ([] for a damaged marker)."""
    try:
        files = json.loads((folder / marker).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def replace_folder(path: Path, build: Callable[[Path], None], marker: Mapping, *, flag: str = "--out") -> Path:
    """Fills a temporary folder beside `path` with `build(folder)` and the marker, then swaps it in: an old
    folder (empty, or an export of ours, as `check_folder` allowed) is moved aside and deleted only then.
    A failure leaves `path` as it was and no temporary folder."""
    stamp = f"{os.getpid()}-{time.time_ns()}"
    tmp, aside = path.with_name(f".{path.name}.new-{stamp}"), path.with_name(f".{path.name}.old-{stamp}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({**marker, "files": _files(tmp)}, indent=2))
            if path.exists():
                os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except OSError:
                if aside.exists():
                    os.replace(aside, path)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise OutputError(describe(e, flag)) from None
    shutil.rmtree(aside, ignore_errors=True)
    return path


def marker_of(command: str) -> str:
    """The marker file of `command` in a folder it writes named files into (`write_files`)."""
    return f".spafit-{command}.json"


def ours(folder: Path, command: str) -> set[str]:
    """The files the marker of `command` in `folder` says it wrote there (none for a missing or damaged marker)."""
    return set(_written(folder, marker_of(command)))


def check_files_ours(folder: str | os.PathLike, names: Sequence[str], command: str, *, flag: str = "--out") -> Path:
    """The absolute path of `folder`, refused (OutputError) where `command` may not write `names` into it:
    a file, a pseudo-filesystem, or a folder that holds one of `names` which `command` did not write there
    (its marker lists what it wrote). A new folder, or one of other files only, is fine."""
    path = _place(folder, flag, "folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; name a folder (it is created if missing)")
    mine = ours(path, command) if path.is_dir() else set()
    theirs = sorted(n for n in names if (path / n).exists() and n not in mine)
    if theirs:
        raise OutputError(f"{flag} {path} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which "
                          f"{command} did not write (not in {marker_of(command)}); it never replaces them: move them "
                          f"out or choose another {flag}")
    return path


def write_files(folder: str | os.PathLike, build: Callable[[Path], None], command: str, *,
                flag: str = "--out") -> dict[str, Path]:
    """Writes the files `build(tmp)` makes (in a temporary folder beside `folder`) into `folder`, each by
    rename, and lists them in `command`'s marker; files of an earlier write of `command` that this one
    does not make are deleted. Refused first (`check_files_ours`, nothing written) where one would replace
    a file `command` did not write. Returns {file name: path}."""
    path = check_files_ours(folder, (), command, flag=flag)
    stamp = f"{os.getpid()}-{time.time_ns()}"
    tmp = path.with_name(f".{path.name}.new-{stamp}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            build(tmp)
            names = _files(tmp)
            check_files_ours(path, names, command, flag=flag)
            path.mkdir(exist_ok=True)
            old = ours(path, command)
            write_atomic(path / marker_of(command), json.dumps({"files": sorted(old | set(names))}, indent=2))
            for name in names:
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, path / name)
            for name in sorted(old - set(names)):  # pictures an earlier report drew and this one does not
                (path / name).unlink(missing_ok=True)
            write_atomic(path / marker_of(command), json.dumps({"files": names}, indent=2))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise OutputError(describe(e, flag)) from None
    return {name: path / name for name in names}
