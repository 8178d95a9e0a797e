"""deploy.process with real child processes: failures name the service and quote its log."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from deploy import process
from deploy.process import Launch, ServiceError


def test_failed_start_names_service_and_log(tmp_path: Path) -> None:
    launch = Launch(argv=[sys.executable, "-c", "print('cannot bind port 1'); raise SystemExit(3)"], cwd=tmp_path / "w")
    pid = process.spawn(tmp_path, "broken", launch)
    with pytest.raises(ServiceError) as info:
        process.wait_healthy(tmp_path, "broken", pid, lambda: False, timeout_s=30)
    message = str(info.value)
    assert "'broken' exited during start-up" in message
    assert str(process.log_path(tmp_path, "broken")) in message
    assert "cannot bind port 1" in message
    assert process.running_pid(tmp_path, "broken") is None


def test_unhealthy_service_times_out_and_stop_ends_it(tmp_path: Path) -> None:
    launch = Launch(argv=[sys.executable, "-c", "import time; time.sleep(600)"], cwd=tmp_path)
    pid = process.spawn(tmp_path, "sleepy", launch)
    with pytest.raises(ServiceError, match="'sleepy' not healthy after 1 s"):
        process.wait_healthy(tmp_path, "sleepy", pid, lambda: False, timeout_s=1)
    assert process.running_pid(tmp_path, "sleepy") == pid
    assert process.stop(tmp_path, "sleepy")
    assert process.running_pid(tmp_path, "sleepy") is None
    assert not process.stop(tmp_path, "sleepy")


def test_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    path = process.pid_path(tmp_path, "gone")
    path.parent.mkdir(parents=True)
    path.write_text("1 86400.0\n")  # pid 1 exists but started at another time (a day after boot): not ours
    assert process.running_pid(tmp_path, "gone") is None
    assert not process.stop(tmp_path, "gone")


def test_a_stepped_clock_still_finds_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock jumps (a resumed VM): psutil's create time and boot time move together, the service stays ours."""
    import psutil

    pid = process.spawn(tmp_path, "sleepy", Launch(argv=[sys.executable, "-c", "import time; time.sleep(600)"],
                                                   cwd=tmp_path))
    real_boot, real_create = psutil.boot_time, psutil.Process.create_time
    monkeypatch.setattr(psutil, "boot_time", lambda: real_boot() + 33.0)  # what a 33 s step shows on Linux
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real_create(self) + 33.0)
    try:
        assert process.running_pid(tmp_path, "sleepy") == pid
    finally:
        monkeypatch.undo()
        assert process.stop(tmp_path, "sleepy")


def test_a_pid_file_with_the_epoch_create_time_is_still_read(tmp_path: Path) -> None:
    """Stacks started before the start was kept as seconds since boot can still be stopped."""
    import psutil

    pid = process.spawn(tmp_path, "sleepy", Launch(argv=[sys.executable, "-c", "import time; time.sleep(600)"],
                                                   cwd=tmp_path))
    process.pid_path(tmp_path, "sleepy").write_text(f"{pid} {psutil.Process(pid).create_time()}\n")
    assert process.running_pid(tmp_path, "sleepy") == pid
    assert process.stop(tmp_path, "sleepy")


def test_service_env_drops_caller_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDRETRAIN_KAFKA__BOOTSTRAP", "elsewhere:1")
    script = (
        "import os, sys; sys.exit(4 if 'MEDRETRAIN_KAFKA__BOOTSTRAP' in os.environ or os.environ['X'] != '1' else 0)"
    )
    pid = process.spawn(tmp_path, "env", Launch(argv=[sys.executable, "-c", script], cwd=tmp_path, env={"X": "1"}))
    import psutil

    assert psutil.Process(pid).wait(timeout=30) == 0


def test_service_that_dies_during_start_up_is_launched_again(tmp_path: Path) -> None:
    """A start-up race (Ray's raylet, ray#65983) gets ``start_attempts`` launches; with one, the first exit fails it."""
    from deploy import stack
    from deploy.embedded import Service
    from schemas.settings import load_settings, with_overrides

    settings = with_overrides(load_settings(), {"stack": {"home": str(tmp_path), "start_timeout_s": 30}})
    tries, ready = tmp_path / "tries", tmp_path / "ready"
    # First launch dies at once; the second one becomes healthy and stays up.
    script = (
        f"import pathlib, sys, time; t = pathlib.Path({str(tries)!r}); n = len(t.read_text()) if t.exists() else 0; "
        f"t.write_text('x' * (n + 1)); n or sys.exit(1); pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    )
    flaky = Service(
        name="flaky",
        url=lambda s: "flaky://",
        healthy=lambda s: ready.exists(),
        start_attempts=2,
        launch=lambda s: Launch(argv=[sys.executable, "-c", script], cwd=tmp_path),
    )
    try:
        assert stack._start(settings, flaky)
        assert tries.read_text() == "xx" and process.running_pid(tmp_path, "flaky") is not None
    finally:
        process.stop(tmp_path, "flaky")

    tries.unlink()
    ready.unlink()
    with pytest.raises(process.ExitedDuringStart, match="'flaky' exited during start-up"):
        stack._start(settings, dataclasses.replace(flaky, start_attempts=1))
    assert tries.read_text() == "x"
