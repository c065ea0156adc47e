"""NPU tools die with the Python process that runs them, and `on_kill` stops them (emulated tools).

The parent is a real Python process running the real code path (`MsameBackend.infer_shard`,
`convert_onnx`) on the emulated toolkit with a hanging tool; the test SIGKILLs that parent (as a
lost Celery worker or the OOM killer would) and the tool must be gone within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from emulators.models import tiny_dets_model
from emulators.runs import SHARD, H, W, write_run
from emulators.toolkit import Toolkit

from gfocal_pipeline.backends.process import ProcessHandle, run_tool
from gfocal_pipeline.errors import BackendError
from operators.infer import MsameInferOperator

GONE_WITHIN_S = 10.0  # SIGTERM, then SIGKILL after KILL_GRACE_S (5 s) at worst

INFER = """
import sys
from gfocal_pipeline.backends.msame import MsameBackend
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.manifest import load_manifest

layout = RunLayout.at(sys.argv[1])
manifest = load_manifest(layout.manifest)
MsameBackend(sys.argv[2], set_env=sys.argv[3]).infer_shard(layout, manifest, sys.argv[4])
"""

CONVERT = """
import sys
from gfocal_pipeline.backends.atc import convert_onnx

convert_onnx(sys.argv[1], sys.argv[2], set_env=sys.argv[3], soc_version="Ascend310P3")
"""


def _alive(pid: int) -> bool:
    """Running (a zombie no longer runs; a container's init may be slow to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _tool_pid(kit: Toolkit, tool: str, parent: subprocess.Popen[bytes]) -> int:
    """The pid of the emulated tool once it is running (from the emulators' call log)."""
    assert _wait_for(lambda: kit.calls(tool) or parent.poll() is not None, 60), f"{tool} never started"
    calls = kit.calls(tool)
    assert calls, f"the parent exited ({parent.returncode}) before {tool} ran: {parent.stderr.read()!r}"
    return calls[-1]["pid"]


def _sigkill_parent_and_check_tool_gone(kit: Toolkit, tool: str, code: str, *args: str) -> None:
    env = {**os.environ, "GFOCAL_EMULATOR_FAULT": f"{tool}_hang"}
    parent = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE)
    try:
        pid = _tool_pid(kit, tool, parent)
        time.sleep(0.3)  # the watchdog is started right after the tool
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        start = time.monotonic()
        assert _wait_for(lambda: not _alive(pid), GONE_WITHIN_S), f"{tool} outlived its SIGKILLed parent"
        assert time.monotonic() - start < GONE_WITHIN_S
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for call in kit.calls(tool):  # never leave a 10-minute sleeper behind a failed assertion
            if _alive(call["pid"]):
                os.kill(call["pid"], signal.SIGKILL)


def test_msame_dies_with_its_sigkilled_parent(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    _sigkill_parent_and_check_tool_gone(
        kit, "msame", INFER, str(tmp_path / "run"), str(om), str(kit.set_env), SHARD
    )


def test_atc_dies_with_its_sigkilled_parent(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    _sigkill_parent_and_check_tool_gone(
        kit, "atc", CONVERT, str(onnx_file), str(tmp_path / "cache"), str(kit.set_env)
    )


def test_the_tools_children_die_with_the_parent_too(tmp_path: Path) -> None:
    """The watchdog stops the tool's whole process group, not only the tool."""
    pid_file = tmp_path / "grandchild.pid"
    tool = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    code = (
        "import os, sys\n"
        "from gfocal_pipeline.backends.process import run_tool\n"
        "run_tool([sys.executable, '-c', sys.argv[1]], env=dict(os.environ), name='demo', timeout_s=600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, tool])
    try:
        assert _wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 30)
        grandchild = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_for(lambda: not _alive(grandchild), GONE_WITHIN_S), (
            "the tool's child outlived the parent"
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_finished_tool_leaves_no_watchdog_behind() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_tool([sys.executable, "-c", "print('ok')"], env=dict(os.environ), name="demo", timeout_s=30)
    assert result.returncode == 0 and result.lines == ["ok"]
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and _alive(p.pid)]
    assert left == []


def test_kill_terminates_then_kills_a_tool_that_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(300)\n"
    )
    handle = ProcessHandle()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_tool(
                [sys.executable, "-c", code],
                env=dict(os.environ),
                name="stubborn",
                timeout_s=300,
                handle=handle,
            )
        except BackendError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert _wait_for(lambda: handle.process is not None, 30)
    pid = handle.process.pid
    time.sleep(0.5)  # let it install its handler
    start = time.monotonic()
    handle.kill(grace_s=1.0)
    worker.join(timeout=30)
    assert not worker.is_alive() and not _alive(pid)
    assert 1.0 <= time.monotonic() - start < 10  # SIGTERM was ignored: SIGKILL after the grace
    assert len(errors) == 1 and "stubborn was killed on request" in str(errors[0])


def test_infer_operator_on_kill_stops_msame(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_hang")
    op = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        model=str(om),
        options={"set_env": str(kit.set_env)},
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute(context={})
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert _wait_for(lambda: bool(kit.calls("msame")), 60)
    pid = kit.calls("msame")[-1]["pid"]
    time.sleep(0.3)
    start = time.monotonic()
    op.on_kill()
    worker.join(timeout=30)
    assert not worker.is_alive() and time.monotonic() - start < GONE_WITHIN_S
    assert not _alive(pid)
    assert len(errors) == 1 and "msame was killed on request" in str(errors[0])


def test_on_kill_before_any_tool_ran_is_harmless(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    op = MsameInferOperator(task_id="infer", run_dir=str(tmp_path), shard=SHARD, model=str(om))
    op.on_kill()  # nothing running: nothing to stop, no error
