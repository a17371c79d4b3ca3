"""Writing files so that nothing half-written is ever read as complete, with the user's permissions.

Every file is written under a temporary name in its final folder and renamed into place
(``os.replace`` is atomic on one filesystem), so a killed run leaves either the old file or the new
one. ``tempfile.mkstemp`` creates files with mode 0600; :func:`publish` gives them the mode a plain
``open()`` would (0666 minus the umask), so colleagues on a shared machine can read the records.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def temp_path(final: str | Path) -> str:
    """A fresh temporary file next to ``final`` (same filesystem, so the rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through a temporary file."""
    import torch

    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
