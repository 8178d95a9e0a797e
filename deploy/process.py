"""Background processes of the embedded stack: spawn, pid files, health waits, stop.

Each service runs in its own session (process group) with stdout and stderr in
``<home>/logs/<name>.log`` and ``<pid> <start>`` in ``<home>/run/<name>.pid``, the start in seconds
since boot: it guards against a recycled pid being mistaken for our service, and unlike the wall-clock
create time it does not move when the clock is stepped (a suspended VM resumed, NTP).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

START_MARKER = "\n=== "
"""Begins the line written to a service's log before each start."""


class ServiceError(RuntimeError):
    """A service failed to start or stop; the message names it and quotes its log."""


class ExitedDuringStart(ServiceError):
    """The service's process ended before it became healthy."""


@dataclass(frozen=True)
class Launch:
    """How to start one service."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    """Added to a copy of the caller's environment without its MEDRETRAIN_* variables."""
    user: str | None = None
    """Run as this system user (a server that refuses root); None: as the caller."""


def log_path(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def pid_path(home: Path, name: str) -> Path:
    return home / "run" / f"{name}.pid"


def tail(path: Path, lines: int = 25) -> str:
    """Last lines the latest start wrote to a log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    latest = text[text.rfind(START_MARKER) :] if START_MARKER in text else text
    return "\n".join(latest.splitlines()[-lines:])


def running_pid(home: Path, name: str) -> int | None:
    """The pid of our running service, or None.

    Never deletes the pid file: readers run concurrently with ``up``, and a stale file is simply overwritten.
    """
    try:
        pid_text, started_text = pid_path(home, name).read_text().split()
        proc = psutil.Process(int(pid_text))
        # An epoch time is a file of a stack started before the start was kept as seconds since boot.
        started = float(started_text)
        since = proc.create_time() if started > psutil.boot_time() else _since_boot(proc)
        if abs(since - started) < 1 and _alive(proc):
            return proc.pid
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def _since_boot(proc: psutil.Process) -> float:
    # psutil derives both from the clock of this call, so a clock step cancels out.
    return proc.create_time() - psutil.boot_time()


def _alive(proc: psutil.Process) -> bool:
    # This machine's init reaps orphans lazily: an exited service can linger as a zombie.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _service_env(extra: dict[str, str]) -> dict[str, str]:
    # Services read their config from argv/env built here, never from the caller's MEDRETRAIN_* variables:
    # Ray jobs inherit the raylet's environment, and the head gets the stack's settings explicitly instead.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRETRAIN_")}
    env.update(extra)
    return env


def spawn(home: Path, name: str, launch: Launch) -> int:
    """Start the service detached from our terminal and record its pid."""
    logs = log_path(home, name)
    logs.parent.mkdir(parents=True, exist_ok=True)
    pid_path(home, name).parent.mkdir(parents=True, exist_ok=True)
    launch.cwd.mkdir(parents=True, exist_ok=True)
    with logs.open("ab") as out:
        out.write(f"{START_MARKER}{time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(launch.argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                launch.argv,
                cwd=launch.cwd,
                env=_service_env(launch.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=launch.user,
            )
        except OSError as e:
            raise ServiceError(f"{name}: cannot run {launch.argv[0]}: {e}") from e
    started = _since_boot(psutil.Process(proc.pid))
    # Atomic, so a concurrent `stack status` never reads a half-written file.
    tmp = pid_path(home, name).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{proc.pid} {started}\n")
    tmp.replace(pid_path(home, name))
    return proc.pid


def wait_healthy(home: Path, name: str, pid: int, healthy: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``healthy`` until it holds; fail early, with the log tail, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy():
            return
        if running_pid(home, name) != pid:
            raise ExitedDuringStart(_failure(home, name, "exited during start-up"))
        time.sleep(0.5)
    raise ServiceError(_failure(home, name, f"not healthy after {timeout_s:.0f} s"))


def _failure(home: Path, name: str, what: str) -> str:
    logs = log_path(home, name)
    return f"service {name!r} {what}; log {logs}:\n{tail(logs)}"


def stop(home: Path, name: str, timeout_s: float = 15.0, first_signal: int = signal.SIGTERM) -> bool:
    """``first_signal`` to the service's process tree, SIGKILL what is left after ``timeout_s``; True if it ran."""
    pid = running_pid(home, name)
    if pid is None:
        return False
    root = psutil.Process(pid)
    # Collect descendants first: some (Ray workers) start their own sessions and would escape a group kill.
    tree = [root, *root.children(recursive=True)]
    for sig, wait_s in ((first_signal, timeout_s), (signal.SIGKILL, 5.0)):
        _signal_group(pid, sig)
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        alive = _wait_gone(tree, wait_s)
        if not alive:
            break
        if sig == first_signal:
            log.warning(
                "%s: %s ignored %s for %.0f s, killing", name, _names(alive), signal.Signals(sig).name, timeout_s
            )
    pid_path(home, name).unlink(missing_ok=True)
    return True


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = procs
    while True:
        for proc in alive:
            try:
                proc.wait(timeout=0)  # reaps our own children
            except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
                pass
        alive = [proc for proc in alive if _alive(proc)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _names(procs: list[psutil.Process]) -> str:
    names = []
    for proc in procs:
        try:
            names.append(f"{proc.name()}[{proc.pid}]")
        except psutil.NoSuchProcess:
            pass
    return ", ".join(names)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
