"""Where cells run: a local process pool, Slurm through submitit, or Ray.

Every executor runs the same picklable :func:`run_cell` (a subprocess of the attack/defense script,
its output in the cell's own log file) and hands back a ``concurrent.futures.Future`` of a
:class:`CellOutcome`, so the scheduler does not care where a cell ran. Bounding the number of cells in
flight is the scheduler's job (``--jobs``), the same for all executors.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import BurnError

TAIL_LINES = 15


@dataclass(frozen=True)
class CellTask:
    cell_id: str
    argv: tuple[str, ...]
    cwd: str
    log_path: str
    env: tuple[tuple[str, str], ...]  # extra environment (a tuple: hashable and picklable)


@dataclass
class CellOutcome:
    cell_id: str
    exit_code: int
    wall_time_s: float
    tail: str
    host: str
    gpu: str | None = None


CHILD = Path(__file__).with_name("child.py")


def pid_path(log_path: str | Path) -> Path:
    """``<log>.pid``: which process runs a cell right now, for recovery after a killed compare."""
    return Path(str(log_path) + ".pid")


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), or None if it is gone;
    with the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def run_cell(task: CellTask, gpu: str | None = None, on_start=None) -> CellOutcome:
    """Run one cell's script to completion; stdout and stderr go to the cell's log file.

    The script runs through :mod:`child` so that it dies with the process that started it, and a
    ``<log>.pid`` file names it while it runs (``on_start(popen)`` lets a local executor stop it)."""
    env = {**os.environ, **dict(task.env)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log_path = Path(task.log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    argv = [sys.executable, str(CHILD), str(os.getpid()), "--", *task.argv]
    pidfile = pid_path(log_path)
    with open(log_path, "w") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}"
                  f"{'' if gpu is None else f' CUDA_VISIBLE_DEVICES={gpu}'}\n$ cd {shlex.quote(task.cwd)} && "
                  f"{shlex.join(task.argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=task.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            pidfile.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "cell": task.cell_id,
                                           "start": process_start_time(proc.pid)}) + "\n")
            if on_start is not None:
                on_start(proc)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted while waiting: the cell does not outlive us
                stop_process(proc.pid)
                proc.wait()
            pidfile.unlink(missing_ok=True)
    return CellOutcome(task.cell_id, code, time.perf_counter() - started, log_tail(log_path), socket.gethostname(), gpu)


def stop_process(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds if the process is still there."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process_start_time(pid) is None or _is_zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def recover_orphans(log_dir: Path, echo=print) -> list[str]:
    """Stop cells that an earlier, killed compare left running (their ``.pid`` files name a live
    process on this host with the recorded start time); remove stale ``.pid`` files. Returns the
    cell ids that were stopped."""
    stopped = []
    host = socket.gethostname()
    for pidfile in sorted(Path(log_dir).glob("*.log.pid")):
        try:
            facts = json.loads(pidfile.read_text())
            pid, start = int(facts["pid"]), facts.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            pidfile.unlink(missing_ok=True)
            continue
        if facts.get("host") != host:
            continue  # a cell on another machine (Slurm): not ours to judge
        if start is not None and process_start_time(pid) == start and not _is_zombie(pid):
            echo(f"stopping {facts.get('cell', pidfile.stem)} (pid {pid}), left running by an earlier compare "
                 "that was killed; it will be resumed")
            stop_process(pid)
            stopped.append(str(facts.get("cell", pidfile.stem)))
        pidfile.unlink(missing_ok=True)
    return stopped


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    # progress bars rewrite one line with \r: keep only the last state of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def visible_gpus() -> list[str]:
    """CUDA devices for round-robin: CUDA_VISIBLE_DEVICES if set, else those nvidia-smi lists."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


class LocalExecutor:
    """A bounded pool of subprocesses on this machine; slot ``i`` uses GPU ``gpus[i % len(gpus)]``."""

    def __init__(self, jobs: int, gpus: list[str] | None = None):
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell")
        self.slots: queue.Queue[int] = queue.Queue()
        self.running: dict[int, subprocess.Popen] = {}
        for slot in range(jobs):
            self.slots.put(slot)

    def describe(self) -> str:
        return f"local ({'GPUs ' + ','.join(self.gpus) if self.gpus else 'no GPU'})"

    def submit(self, task: CellTask) -> Future:
        return self.pool.submit(self._run, task)

    def _run(self, task: CellTask) -> CellOutcome:
        slot = self.slots.get()
        try:
            return run_cell(task, self.gpus[slot % len(self.gpus)] if self.gpus else None,
                            on_start=lambda proc: self.running.__setitem__(slot, proc))
        finally:
            self.running.pop(slot, None)
            self.slots.put(slot)

    def close(self, interrupted: bool = False) -> None:
        """Wait for the pool; when compare is interrupted, stop the cells still running first."""
        if interrupted:
            for proc in list(self.running.values()):
                stop_process(proc.pid)
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.pool.shutdown(wait=True)


class SubmititExecutor:
    """Slurm through submitit (``cluster: local`` runs the same jobs as local processes, for tests)."""

    def __init__(self, jobs: int, folder: Path, params: dict):
        try:
            import submitit
        except ImportError:
            raise BurnError("the submitit executor needs submitit: pip install submitit "
                            "(or burnkit[cluster])") from None
        params = dict(params)
        cluster = params.pop("cluster", None)
        params.setdefault("timeout_min", 24 * 60)
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        try:
            self.executor.update_parameters(**params)
        except (ValueError, TypeError) as err:
            raise BurnError(f"submitit rejected the experiment's submitit parameters: {err}") from None
        self.cluster = self.executor.cluster
        self.watchers = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="submitit")

    def describe(self) -> str:
        return f"submitit ({self.cluster})"

    def submit(self, task: CellTask) -> Future:
        job = self.executor.submit(run_cell, task)
        return self.watchers.submit(job.result)

    def close(self, interrupted: bool = False) -> None:
        self.watchers.shutdown(wait=True, cancel_futures=interrupted)


class RayExecutor:
    """Ray tasks: a running cluster (``ray: {address: auto}``) or a local instance of ``jobs`` CPUs."""

    def __init__(self, jobs: int, params: dict, env: dict[str, str]):
        try:
            import ray
        except ImportError:
            raise BurnError("the ray executor needs ray: pip install ray (or burnkit[cluster])") from None
        self.ray = ray
        self.started = False
        address = params.get("address")
        if not ray.is_initialized():
            if address:
                try:
                    ray.init(address=address, log_to_driver=False)
                except (ConnectionError, RuntimeError) as err:
                    raise BurnError(f"cannot reach a Ray cluster at {address!r} ({err}); start one with `ray start "
                                    "--head` or drop ray.address for a local instance") from None
            else:  # local instance; workers need to import burnkit like the cells do
                gpus = len(visible_gpus())
                if params.get("num_gpus_per_cell", 0) > gpus:
                    raise BurnError(f"ray: num_gpus_per_cell {params['num_gpus_per_cell']} but this machine has {gpus} "
                                    "GPU(s); set ray.num_gpus_per_cell to 0 or give ray.address of a GPU cluster")
                ray.init(num_cpus=jobs, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": env.get("PYTHONPATH", "")}})
            self.started = True
        self.remote = ray.remote(num_cpus=params.get("num_cpus_per_cell", 1),
                                 num_gpus=params.get("num_gpus_per_cell", 0))(run_cell)

    def describe(self) -> str:
        return f"ray ({self.ray.get_runtime_context().gcs_address})"

    def submit(self, task: CellTask) -> Future:
        return self.remote.remote(task).future()

    def close(self, interrupted: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, jobs: int, exp) -> LocalExecutor | SubmititExecutor | RayExecutor:
    from .experiment import cell_env

    if kind == "local":
        return LocalExecutor(jobs, exp.gpus)
    if kind == "submitit":
        return SubmititExecutor(jobs, exp.output / "submitit", exp.submitit)
    if kind == "ray":
        return RayExecutor(jobs, exp.ray, cell_env(exp))
    raise BurnError(f"unknown executor {kind!r}; use local, submitit or ray")
