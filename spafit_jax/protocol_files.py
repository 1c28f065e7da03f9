"""What the protocol reads and writes: JSON read with a one-line error, and an output folder written only where
the protocol wrote before.

`read_json` turns a missing, unreadable or damaged file into a `ProtocolError` naming the file and the fix.
`write_outputs` checks the output folder before anything is computed into it: it must be a folder (or not exist
yet), and each file about to be written must be absent or one the protocol wrote there unchanged (its marker,
`.spafit-protocol.json`, lists each file it wrote with its sha256). Everything is written into a temporary
folder inside it first and moved into place once complete; on failure the temporary folder (and a folder made
for the output) is removed, so nothing is left half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from spafit_jax.errors import SpafitError

MARKER = ".spafit-protocol.json"  # in every folder the protocol wrote: {"files": {name: sha256}}


class ProtocolError(SpafitError):
    """Nothing to report, or an input or output the protocol cannot use (one line: the file and the fix)."""


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in `path`; a ProtocolError naming the file and `fix` when it is missing, unreadable, not
    JSON or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProtocolError(f"{path} not found; {fix}") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except OSError as e:
        raise ProtocolError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path} is not a JSON object; {fix}")
    return obj


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _ours(out: Path) -> dict[str, str]:
    """{name: sha256} from the marker of a folder the protocol wrote ({} when absent or damaged)."""
    try:
        files = json.loads((out / MARKER).read_text(encoding="utf-8")).get("files")
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def check_out(out: Path, names: Sequence[str], flag: str) -> None:
    """Refuses (ProtocolError) an `out` that is not a folder, sits under a file, or holds any of `names` that the
    protocol did not write there or that changed since."""
    if out.exists() and not out.is_dir():
        raise ProtocolError(f"{flag} {out} is a file, not a folder; name a new folder (or one protocol wrote)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ProtocolError(f"{flag} {out}: {parent} is a file, not a folder; name a folder under a folder")
    if not out.exists():
        return
    ours = _ours(out)
    for name in [*names, MARKER]:
        path = out / name
        if name == MARKER or not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or ours.get(name) != sha256(path):
            raise ProtocolError(f"{flag} {out} already holds {name}, which protocol did not write there (or which "
                                "changed since); move it aside or name another folder")


def write_outputs(out: Path, texts: Mapping[str, str | bytes], draw: Callable[[Path], list[str]] | None,
                  names: Sequence[str], *, flag: str = "--out") -> list[str]:
    """Writes `texts` ({relative name: text or bytes}) and the files `draw(folder)` makes into `out`, after
    `check_out(out, names)`; returns the names written. All or nothing (see the module's docstring)."""
    out = Path(out)
    check_out(out, names, flag)
    made = not out.exists()
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".protocol-", dir=out))
        for name, text in texts.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        drawn = draw(tmp) if draw is not None else []
        written = [*texts, *drawn]
        unexpected = sorted(set(written) - set(names))
        if unexpected:
            raise ProtocolError(f"internal: {', '.join(unexpected)} not checked before writing")
        ours = {**_ours(out), **{name: sha256(tmp / name) for name in written}}
        for name in written:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
        (out / MARKER).write_text(json.dumps({"files": ours}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return written
    except OSError as e:
        raise ProtocolError(f"{flag} {out} cannot be written ({e.strerror or e}); name a writable folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if made and out.is_dir() and not (out / MARKER).exists():
            shutil.rmtree(out, ignore_errors=True)
