"""Where the commands after training write (predict's --output, export's --out, report's and protocol's
--out): checked before any work, written atomically, and never over what we did not write.

`check_file` / `write_file` serve a single output file (a temporary file beside it, then a rename);
`check_folder` / `replace_folder` serve an export folder, which is written whole into a temporary
folder and swapped in, the old one (an export of ours, `MARKER`) deleted only once the new one is
complete. `run_places` names what a run folder's trainer owns (its files and folders, its base model),
which `check_file` and `check_folder` never let another command write.

`check_files_ours` / `write_files` are the one rule for a command that writes named files into a folder
the user may share (report's and protocol's --out): the command's marker there, `.spafit-<command>.json`
(`marker_of`), records {name: sha256} of each file it wrote. A name that exists and is not in the marker,
or whose bytes changed since, is refused before anything changes (a marker of an older version, a plain
list of names, counts its names as ours with nothing to compare). So is a folder that is a file or lies
under one. The files are made in a temporary folder inside it and renamed into place; an earlier write's
files that this one does not make are deleted; a failure puts every file back and removes the folders
the call created.
Every refusal is an `OutputError`: one line naming the path, the option and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
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


def _written(folder: Path) -> list[str]:
    """The files an export folder's marker says were written there ([] for a damaged marker)."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
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


def ours(folder: Path, command: str) -> dict[str, str | None]:
    """{name: sha256} of the files the marker of `command` in `folder` says it wrote there ({} for a missing or
    damaged marker); a name's hash is None where the marker is an old list of names (nothing to compare)."""
    try:
        files = json.loads((folder / marker_of(command)).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    if isinstance(files, list):  # written before the hashes were recorded
        files = dict.fromkeys(f for f in files if isinstance(f, str))
    if not isinstance(files, dict):
        return {}
    inside = (k for k in files if isinstance(k, str) and k and not Path(k).is_absolute() and ".." not in Path(k).parts)
    return {k: files[k] if isinstance(files[k], str) else None for k in inside}  # never a path outside `folder`


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_theirs(path: Path, names: Sequence[str], command: str, flag: str) -> None:
    """Refuses (OutputError) where a file of `names`, or one `command`'s marker in `path` lists, exists in
    `path` and is not `command`'s unchanged: one it did not write, or one whose bytes differ from the marker's."""
    mine = ours(path, command)
    theirs, changed = [], []
    for name in dict.fromkeys([*names, *mine]):
        file = path / name
        if not (file.exists() or file.is_symlink()):
            continue
        if name not in mine:
            theirs.append(name)
            continue
        try:
            same = file.is_file() and not file.is_symlink() and mine[name] in (None, _sha256(file))
        except OSError as e:
            raise OutputError(f"{flag} {path}: {name} cannot be read ({e.strerror or e}); make it readable or choose "
                              f"another {flag}") from None
        if not same:
            changed.append(name)
    if theirs or changed:
        listed = theirs or changed
        what = (f"which {command} did not write there (not in {marker_of(command)})" if theirs else
                f"which {command} wrote there but which changed since (sha256 differs from {marker_of(command)})")
        raise OutputError(f"{flag} {path} already holds {', '.join(listed[:3])}{' ...' if len(listed) > 3 else ''}, "
                          f"{what}; {command} never replaces or deletes such a file: move it aside or choose another "
                          f"{flag}")


def check_files_ours(folder: str | os.PathLike, names: Sequence[str], command: str, *, flag: str = "--out") -> Path:
    """The absolute path of `folder`, refused (OutputError, nothing written) where `command` may not write
    `names` into it: a file, a folder under a file, a pseudo-filesystem, or a folder that holds one of `names`
    (or of the files its marker lists) that `command` did not write there or that changed since. A new
    folder, or one of other files only, is fine."""
    path = _place(folder, flag, "folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; name a new folder (or one {command} wrote)")
    real = Path(os.path.realpath(path))
    for above in (real, *real.parents):  # a run's own folder (checkpoints/, tokenizer/, ...) is the trainer's alone
        if above.name in rundir.OWN_FOLDERS and (above.parent / rundir.CONFIG).is_file():
            raise OutputError(f"{flag} {path} is inside the run's {above.name}/ ({above.parent}); writing there would "
                              f"change what the run saved: choose a folder outside it, e.g. {above.parent / command}")
    if path.is_dir():
        _refuse_theirs(path, names, command, flag)
    return path


def write_files(folder: str | os.PathLike, build: Callable[[Path], None], command: str, *, flag: str = "--out",
                names: Sequence[str] = ()) -> dict[str, Path]:
    """Writes the files `build(tmp)` makes (in a temporary folder inside `folder`) into `folder`, each by rename,
    and records them with their sha256 in `command`'s marker; files of an earlier write of `command` that this
    one does not make are deleted. Refused (`check_files_ours`) before `build` for `names` and again after it for
    the files made, in both cases before anything in `folder` changes. All or nothing: a failure puts back the
    files it moved and removes the folders this call created. Returns {file name: path}."""
    path = check_files_ours(folder, names, command, flag=flag)
    marker = path / marker_of(command)
    made = next((p for p in [*reversed(path.parents), path] if not p.exists()), None)  # the first folder we create
    before = marker.read_bytes() if marker.is_file() else None
    moved: list[tuple[Path, Path | None]] = []  # (a file put in place, where the one it replaced waits, if any)
    folders: list[Path] = []  # the subfolders of `path` this call created
    work, marked = None, False
    try:
        path.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{command}-", dir=path))
        (work / "new").mkdir()
        build(work / "new")
        new = _files(work / "new")
        _refuse_theirs(path, new, command, flag)
        old = ours(path, command)
        hashes = {name: _sha256(work / "new" / name) for name in new}
        # until the files are in place the marker claims them all, unhashed: a kill in between leaves them ours
        marked = True
        write_atomic(marker, json.dumps({"files": {**old, **dict.fromkeys(new)}}, indent=1, sort_keys=True) + "\n")
        for name in [*new, *(n for n in old if n not in hashes)]:  # then what an earlier write made and this does not
            dest, aside = path / name, work / "old" / name
            if dest.exists() or dest.is_symlink():
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dest, aside)
                moved.append((dest, aside))
            if name in hashes:
                folders += [p for p in reversed(dest.parents) if path in p.parents and not p.exists()]
                dest.parent.mkdir(parents=True, exist_ok=True)
                moved.append((dest, None))
                os.replace(work / "new" / name, dest)
        write_atomic(marker, json.dumps({"files": hashes}, indent=1, sort_keys=True) + "\n")
    except BaseException as e:
        for dest, aside in reversed(moved):  # put back what was there, in the reverse order
            with contextlib.suppress(OSError):
                if aside is None:
                    dest.unlink(missing_ok=True)
                else:
                    os.replace(aside, dest)
        for sub in reversed(folders):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            if marked and before is None:
                marker.unlink(missing_ok=True)
            elif marked:
                write_atomic(marker, before)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(describe(e, flag)) from None
        raise
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return {name: path / name for name in new}
