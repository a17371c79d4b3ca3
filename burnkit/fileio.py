"""Writing files so that nothing half-written is ever read as complete, with the user's permissions.

Every file is written under a temporary name in its final folder and renamed into place
(``os.replace`` is atomic on one filesystem), so a killed run leaves either the old file or the new
one. ``tempfile.mkstemp`` creates files with mode 0600; :func:`publish` gives them the mode a plain
``open()`` would (0666 minus the umask), so colleagues on a shared machine can read the records.

A writer killed with SIGKILL cannot remove its temporary file, so the name carries the writer's
host and process id (``.<name>.<host>-<pid>.<random>.tmp``): every later write into the same folder
removes the temporary files of writers on this host that no longer exist, and leaves those of live
writers (another run writing beside this one) alone.

Data reaches the file through a Python file object, never a bare path: a full disk or a lost quota
then surfaces as an :class:`OSError` with its errno (one line at the command line) instead of the
``RuntimeError: unexpected pos`` that torch's zip writer raises when it writes a path itself.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import RERUN, BurnError

NAME_MAX = 255  # bytes per name on Linux/macOS file systems, when the folder cannot be asked
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..*\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def current_umask() -> int:
    """The process umask, read from /proc where possible (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, final: str | Path) -> None:
    """Give ``tmp`` the permissions of a normally created file and rename it to ``final``."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, final)


def name_max(folder: str | Path) -> int:
    """The longest file name (in bytes) ``folder``'s file system accepts (255 where it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def shorten(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes of UTF-8, on a character boundary."""
    return name.encode()[:max(0, max_bytes)].decode("utf-8", "ignore")


def temp_path(final: str | Path) -> str:
    """A fresh temporary file next to ``final`` (same filesystem, so the rename is atomic), named
    after this writer (see the module docstring); temporary files of dead writers there are removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(final.parent)
    tag = f".{_HOST}-{os.getpid()}."
    room = name_max(final.parent) - len(tag) - len(".tmp") - 8 - 1  # mkstemp adds 8 random characters
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{shorten(final.name, room)}{tag}", suffix=".tmp")
    os.close(fd)
    return tmp


def remove_dead_temporaries(folder: str | Path) -> None:
    """Delete the temporary files in ``folder`` whose writer - a process of this host - is gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or match["host"] != _HOST or _process_exists(int(match["pid"])):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # already gone (another run swept it), or not ours to delete
            pass


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (another user's) or not a pid we can judge: keep its file
    return True


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file next to ``path`` and rename it to ``path`` once complete.
    On any failure the temporary file is removed and ``path`` is as it was; an :class:`OSError`
    names ``path`` (not the temporary name)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        publish(tmp, path)
    except OSError as err:
        if err.filename in (None, tmp):
            err.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through a temporary file."""
    import torch

    def write(f: BinaryIO) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            failure = _save_failure(err, path)
            if failure is err:
                raise
            raise failure from None

    atomic_write(path, write)


def _save_failure(err: RuntimeError, path: str | Path) -> Exception:
    """What a failed ``torch.save`` means: the :class:`OSError` its writer hit (a full disk), or, for
    the zip writer's own ``RuntimeError`` (``unexpected pos``, ``PytorchStreamWriter failed``), one
    line saying so; any other RuntimeError is a bug and keeps its traceback."""
    cause = err.__context__
    if isinstance(cause, OSError):
        return cause
    text = str(err)
    if any(sign in text for sign in ("inline_container", "PytorchStreamWriter", "unexpected pos", "iostream error")):
        first = " ".join(text.split())[:160]
        return BurnError(f"cannot write {path}: torch's file writer stopped ({first}), which happens when the disk "
                         f"is full or the file system fails; free space, {RERUN}")
    return err

