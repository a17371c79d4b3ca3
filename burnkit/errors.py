"""User-facing errors.

Every problem a user can cause (a missing record, a bad YAML value, a dataset that is not on disk)
raises :class:`BurnError` with one sentence that names the problem and the fix. Command-line entry
points catch it, print that sentence and exit with status 2; nothing else is caught, so genuine bugs
still show their traceback.
"""
from __future__ import annotations

import errno
import reprlib
import sys
from contextlib import contextmanager


class BurnError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


EXIT_USAGE = 2
MAX_MESSAGE = 2000  # characters of one error line; a longer message is cut (it can only be an echoed value)

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 2


def brief(value) -> str:
    """``repr(value)`` cut to about 60 characters, built without ever rendering the whole value: a
    message may quote what the user gave, but a value from a file can be arbitrarily large (or a
    shared structure that is tiny in memory and huge when printed)."""
    try:
        return _SHORT.repr(value)
    except (ValueError, RecursionError):  # e.g. an int too long to convert to text
        return f"<a {type(value).__name__} too large to show>"


def one_line(message: str) -> str:
    """``message`` on one line and at most :data:`MAX_MESSAGE` characters."""
    text = " ".join(str(message)[:4 * MAX_MESSAGE].split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


RERUN = "then run the same command again (finished files are complete; an interrupted run resumes)"
# the user's environment, not a bug: a full or read-only disk, a quota, missing permissions, a name
# longer than the file system allows, a file where a folder must be - each with its fix
ENVIRONMENT_FIXES = {
    errno.ENOSPC: f"free space, {RERUN}", errno.EDQUOT: f"free space or raise the quota, {RERUN}",
    errno.EROFS: f"write to a writable disk, {RERUN}", errno.EACCES: f"fix the permissions, {RERUN}",
    errno.EPERM: f"fix the permissions, {RERUN}", errno.ENAMETOOLONG: "choose a shorter name",
    errno.ENOTDIR: "move the file in the way aside or choose another path",
    errno.EEXIST: "move the file in the way aside or choose another path",
    errno.EISDIR: "move the folder in the way aside or choose another path",
}


def environment_error(err: OSError) -> str | None:
    """The one-line message for an :class:`OSError` the user's environment caused, else None."""
    fix = ENVIRONMENT_FIXES.get(err.errno)
    if fix is None:
        return None
    where = f" {_shown(str(err.filename))}" if err.filename else ""
    verb = "cannot write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "cannot use"
    return f"{verb}{where}: {err.strerror or err}; {fix}"


def _shown(path: str, limit: int = 40) -> str:
    """``path`` with every name longer than ``limit`` characters cut (a name too long for the file
    system is what the message is about, not something to print in full)."""
    return "/".join(part if len(part) <= limit else f"{part[:limit]}...({len(part.encode())} bytes)"
                    for part in path.split("/"))


@contextmanager
def cli_errors(prog: str):
    """Turn a :class:`BurnError` raised inside the block into ``prog: error: ...`` and exit 2."""
    try:
        yield
    except BurnError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)  # one line, whatever the message held
        raise SystemExit(EXIT_USAGE) from None
    except OSError as err:
        message = environment_error(err)
        if message is None:
            raise  # anything else is a bug: keep its traceback
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
