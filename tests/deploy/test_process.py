"""deploy.process with real child processes: failures name the service and quote its log."""

from __future__ import annotations

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
    path.write_text("1 0.0\n")  # pid 1 exists but was created at another time: not ours
    assert process.running_pid(tmp_path, "gone") is None
    assert not process.stop(tmp_path, "gone")


def test_service_env_drops_caller_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDRETRAIN_KAFKA__BOOTSTRAP", "elsewhere:1")
    script = "import os, sys; sys.exit(4 if 'MEDRETRAIN_KAFKA__BOOTSTRAP' in os.environ or os.environ['X'] != '1' else 0)"
    pid = process.spawn(tmp_path, "env", Launch(argv=[sys.executable, "-c", script], cwd=tmp_path, env={"X": "1"}))
    import psutil

    assert psutil.Process(pid).wait(timeout=30) == 0
