"""Advisory folder locks: one run writes a folder at a time, and a record is not replaced while a run
reads it.

A folder ``<parent>/<name>`` is guarded by ``fcntl.flock`` on the lock file ``<parent>/.<name>.lock``:

* a run that **writes** the folder holds its lock exclusively from before its first check to its last
  file - an attack its record folder, a defense or detector its output folder, compare its
  experiment output - and writes ``pid N on HOST`` into the lock file, so a second run is refused in
  one line that names the folder and that process;
* a defense or detector holds the lock of the record it **reads** shared, for its whole run: any
  number of readers run side by side, an attack on that record (``--overwrite`` moves the record
  aside and trains a new one in its place) is refused while one of them runs, and a reader is refused
  while an attack writes the record.

Why this design (Linux, standard library only):

* The kernel drops a ``flock`` when the process that took it ends, however it ends (SIGKILL, a crash,
  a closed session): a lock left by a killed run is free, the next run simply takes it over, and the
  dead pid in the file is overwritten. No pid-liveness or age heuristics that can be wrong.
* The lock file sits beside the folder, not inside it: ``--overwrite`` renames a finished folder to
  ``<name>.replaced-<time>``, and a lock inside would travel with it and leave the new folder unguarded.
* A released lock file is deleted, so no run leaves anything behind (a refused run changes no file).
  Only a process holding the lock exclusively deletes it, and every process that acquires a lock
  checks afterwards that the path still names the file it locked (else it opens the new one), so a
  deletion never lets two holders in. The folders a writer had to create for its lock file are
  removed again if they are still empty.
* Contention is answered at once (after a few short retries that cover a releasing run deleting its
  file): a run that would wait for hours behind another is better refused with the holder's pid.
* A reader that cannot create the lock file (a record folder it may read but not write) locks the
  existing one read-only, or none when there is none: no attack of this user can be writing there.
* ``flock`` is advisory: it binds burnkit's runs, not other programs. On NFS, Linux emulates it with
  POSIX locks that the server arbitrates between hosts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import BurnError
from .fileio import name_max, shorten

TRIES = 20
RETRY_S = 0.05  # ~1 s in all: far longer than a releasing run needs to delete its file
NO_LOCK_FILE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


def lock_path(folder: str | Path) -> Path:
    """``<parent>/.<name>.lock``, the lock file of ``folder`` (a name too long for the file system is
    shortened and told apart by a hash of the full name)."""
    folder = Path(os.path.abspath(folder))
    name, limit = f".{folder.name}.lock", name_max(folder.parent)
    if len(name.encode()) > limit:
        tag = hashlib.sha1(folder.name.encode()).hexdigest()[:12]
        name = f".{shorten(folder.name, limit - len(tag) - 7)}-{tag}.lock"
    return folder.with_name(name)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block: exclusive (this run writes the folder) or shared
    (this run reads it). Refuses with a one-line :class:`BurnError` naming ``what``, the folder and,
    for a writer, its pid, when the lock is held the other way."""
    path = lock_path(folder)
    created = [] if shared else _make_folders(path.parent)
    fd = None
    try:
        fd = _acquire(path, shared, f"{what} {folder}")
        yield
    finally:
        if fd is not None:
            _release(fd, path)
        for made in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(made)  # only if still empty


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones this call created, outermost first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
            created.append(path)
        except FileExistsError:
            pass  # another run made it meanwhile: not ours to remove
    return created


def _open(path: Path, shared: bool) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if not shared or err.errno not in NO_LOCK_FILE:
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in NO_LOCK_FILE:
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    """What the exclusive holder wrote (``pid N on HOST``), or "" when readers hold the lock."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _acquire(path: Path, shared: bool, named: str) -> int | None:
    holder = ""
    for attempt in range(TRIES):
        fd = _open(path, shared)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            time.sleep(RETRY_S)
            continue
        except BaseException:
            os.close(fd)
            raise
        if not _same_file(fd, path):  # deleted by its last holder after we opened it: open the new one
            os.close(fd)
            continue
        try:
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            elif os.fstat(fd).st_size:
                with contextlib.suppress(OSError):  # a read-only lock file keeps it
                    os.ftruncate(fd, 0)  # the pid a killed writer left behind; no writer holds it now
        except BaseException:
            os.close(fd)
            raise
        return fd
    if holder:
        raise BurnError(f"{named} is in use by another run ({holder}); wait for it to finish or stop it, "
                        "then run the same command again")
    raise BurnError(f"{named} is being read by a running defense or detector; wait for it to finish or stop it, "
                    "then run the same command again")


def _release(fd: int, path: Path) -> None:
    """Delete the lock file if no one else holds it, then drop the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a reader: only the last one deletes the file
        if _same_file(fd, path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    except BlockingIOError:
        pass  # other readers still hold it
    finally:
        os.close(fd)
