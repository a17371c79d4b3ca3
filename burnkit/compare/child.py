"""``python child.py PARENT_PID -- ARGV...``: become ARGV, but die when PARENT_PID does.

compare starts every cell through this wrapper. On Linux it asks the kernel for SIGTERM when its
parent (the compare process, or a Slurm/Ray worker) exits - even by ``kill -9`` - and then
``exec``s the cell's command, which keeps that setting and this process id. Without it a killed
compare leaves its cells running as orphans that collide with the next run. Run as a file, not an
import, so it needs nothing but the standard library.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = int(sys.argv[1])
    argv = sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(143)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
