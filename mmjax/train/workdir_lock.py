"""One run per workdir: an exclusive lock on `WORKDIR/.lock`, held for the whole of `loop.run`.

Two runs started on the same workdir used to both train from scratch into it, writing the same checkpoint steps
and every `metrics.jsonl` record twice. The second now stops at once (`WorkdirBusy`, a `RunRefused`: one line on
the command line) naming the holder: host, process id and start time, which the holder writes into the lock file.

The lock is a POSIX record lock (`fcntl.lockf`) on the open file: the kernel drops it when the holding process
exits in any way (SIGKILL included), so a lock file left by a killed run never blocks the next one, and it is not
inherited by forked children (Grain worker processes), which could otherwise outlive a killed run and keep it.
It works on local disks and on NFS (through the NFS lock manager). A second run inside the same process (library
use, threads) is refused by the in-process table of held workdirs, since POSIX locks do not conflict within one
process. Light on purpose (standard library only).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading

from mmjax.train.preflight import RunRefused

LOCK_FILENAME = ".lock"
_held: dict[str, dict] = {}  # Workdirs locked by this process -> holder details.
_held_lock = threading.Lock()


class WorkdirBusy(RunRefused):
    """Another run holds the workdir's lock; the message names it (host, pid, start time)."""


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another run (it has not written its details yet)"
    return (f"the run of process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def _read_holder(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for one run; `WorkdirBusy` when another run holds it."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILENAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        busy = f"workdir {self.workdir} is in use by {{}}; wait for it to finish (or stop it), or use another --workdir"
        with _held_lock:
            if self.workdir in _held:
                raise WorkdirBusy(busy.format(_describe(_held[self.workdir]) + " (in this process)"))
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunRefused(f"workdir {self.workdir} is not writable: cannot open {self.path} "
                                 f"({error.strerror}); give a writable --workdir") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise WorkdirBusy(busy.format(_describe(_read_holder(self.path)))) from None
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            self._fd = fd
            _held[self.workdir] = holder

    def release(self) -> None:
        """Releases the lock (idempotent). The details are cleared first, so a stale file names nobody."""
        with _held_lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            _held.pop(self.workdir, None)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass  # A file system that turned read-only: the lock itself is still released below.
            finally:
                os.close(fd)  # Closing the file drops the POSIX lock.

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
