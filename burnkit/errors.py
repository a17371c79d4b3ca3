"""User-facing errors.

Every problem a user can cause (a missing record, a bad YAML value, a dataset that is not on disk)
raises :class:`BurnError` with one sentence that names the problem and the fix. Command-line entry
points catch it, print that sentence and exit with status 2; nothing else is caught, so genuine bugs
still show their traceback.
"""
from __future__ import annotations

import errno
import sys
from contextlib import contextmanager


class BurnError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


EXIT_USAGE = 2
# a full or read-only disk, a quota, missing permissions: the user's environment, not a bug
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def cli_errors(prog: str):
    """Turn a :class:`BurnError` raised inside the block into ``prog: error: ...`` and exit 2."""
    try:
        yield
    except BurnError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug: keep its traceback
        where = f" {err.filename}" if err.filename else ""
        print(f"{prog}: error: cannot write{where}: {err.strerror}; free space or fix the permissions, then run "
              "the same command again (finished files are complete; an interrupted run resumes)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
