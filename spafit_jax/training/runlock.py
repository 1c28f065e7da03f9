"""The run folder's lock: one process runs in a folder at a time, and a stale lock is taken over.

`Lock(workdir, enabled=...)` holds `<workdir>/.lock` ({"host", "boot", "pid", "since"} of its holder)
from before anything is written until the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from spafit_jax.training.rundir import LOCK, WorkdirError, describe_os_error, naming

log = logging.getLogger("spafit_jax")


class Lock:
    """`with Lock(workdir, enabled=...)`: `<workdir>/.lock` holds {"host", "boot", "pid"} of the one
    process (process 0) that runs in the folder, from before anything is written to the end
    (exceptions included). A lock of this host whose process is gone, or that was taken before
    the host last booted, is stale and taken over with a warning; any other lock is a WorkdirError
    naming its holder. The host is `$SPAFIT_LOCK_HOST` when set (tpu_scripts/launch.sh sets the
    TPU node and worker, which outlive a preempted and re-created VM), else the host name. A
    folder that the lock created and that is still empty at the end is removed again.
    """

    def __init__(self, workdir: Path, *, enabled: bool):
        self.workdir, self.enabled, self.path = Path(workdir), enabled, Path(workdir) / LOCK
        self.me = {"host": os.environ.get("SPAFIT_LOCK_HOST") or socket.gethostname(), "boot": _boot_id(),
                   "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.created = False

    def __enter__(self) -> Lock:
        if not self.enabled:
            return self
        self.created = not self.workdir.exists()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._take_over(self._holder())
                    continue
                try:
                    with naming(self.path), os.fdopen(fd, "w") as f:
                        json.dump(self.me, f)
                except OSError:
                    self.path.unlink(missing_ok=True)  # a full disk: leave no empty lock behind
                    raise
                return self
        except OSError as e:
            raise WorkdirError(f"cannot use {self.workdir} as the run folder: {describe_os_error(e)}") from None
        raise WorkdirError(f"{self.workdir}: another run keeps taking {self.path}; run one at a time")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _take_over(self, holder: dict | None) -> None:
        """Removes a stale lock; raises WorkdirError for a live (or unknown) holder."""
        if holder is None:  # being written just now, or damaged: stale only once it is old
            try:
                if time.time() - self.path.stat().st_mtime < 10:
                    raise WorkdirError(f"{self.workdir} is being taken by another run ({self.path}); run one at a time")
            except FileNotFoundError:
                return
            log.warning("%s: removing an unreadable lock file", self.path)
        elif holder.get("host") != self.me["host"] or (_alive(holder["pid"]) and not _rebooted(holder, self.me)):
            raise WorkdirError(
                f"{self.workdir} is in use by pid {holder['pid']} on {holder.get('host')} (since {holder.get('since')}); "
                f"wait for that run to end, use another --workdir, or delete {self.path} if that run is gone")
        else:
            log.warning("%s: taking over the stale lock of pid %d on %s (%s)", self.path, holder["pid"],
                        holder.get("host"), "taken before this machine booted" if _rebooted(holder, self.me)
                        else "that process is gone")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc_info) -> None:
        if not self.enabled or self._holder() != self.me:
            return
        self.path.unlink(missing_ok=True)
        if self.created and not any(self.workdir.iterdir()):
            self.workdir.rmdir()  # nothing was written: leave no trace


def _boot_id() -> str | None:
    """This boot of this machine (Linux), so a lock from before a reboot or a re-created VM is stale."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _rebooted(holder: dict, me: dict) -> bool:
    """Whether the holder's lock was taken before this machine's current boot (both boots known)."""
    return None not in (holder.get("boot"), me["boot"]) and holder.get("boot") != me["boot"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
