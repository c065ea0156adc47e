"""Running an external tool (atc, msame, ais_bench, npu-smi) safely and observably.

- argument lists only, never a shell; every path/value taken from parameters is checked for shell
  metacharacters first (defence in depth: a value that would be dangerous in a shell is almost
  certainly a mistake, and some tools split their own arguments on `,` or `;`);
- the tool runs in its own session (process group) so a timeout, or Airflow killing the task
  (`ProcessHandle.kill`, called from the operator's `on_kill`), ends the tool *and its children*;
- the tool dies with the Python process that started it, even when that one is SIGKILLed (a lost
  Celery worker, the OOM killer): a watchdog process (`_Watchdog`) holds the read end of a pipe
  whose write end only the parent has; when the kernel closes it (the parent is gone) the
  watchdog stops the tool's process group (SIGTERM, then SIGKILL). A watchdog, not
  `prctl(PR_SET_PDEATHSIG)` in `preexec_fn`: preexec_fn is unsafe in a process with threads (ours
  and Airflow's), the death signal fires when the *thread* that forked exits and reaches only the
  tool, never the children it spawns, and it is Linux-only;
- stdout and stderr lines are logged as they arrive and kept, so errors can quote the tail and
  callers can parse success lines and timings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfocal_pipeline.errors import BackendError

log = logging.getLogger(__name__)

# characters that mean something to a shell; none of them belongs in a path or tool value we pass
SHELL_METACHARACTERS = frozenset(";|&$`<>()!*?{}[]~'\"\\\n\r\t\0")
MAX_KEPT_LINES = 200_000
KILL_GRACE_S = 5.0
ORPHAN_GRACE_S = 5.0


def check_safe_value(value: object, what: str, extra_forbidden: str = "") -> str:
    """Return `str(value)`, or raise a BackendError naming `what` if it holds shell metacharacters."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    bad = sorted({ch for ch in text if ch in SHELL_METACHARACTERS or ch in extra_forbidden})
    if bad:
        shown = " ".join(repr(ch) for ch in bad)
        raise BackendError(
            f"{what} {text!r} contains characters that are not allowed ({shown}); tools are run without a "
            "shell, so quoting, globs, variables and redirections have no meaning here. Use a plain path "
            "or value without them"
        )
    if not text:
        raise BackendError(f"{what} is empty; pass a value")
    return text


def check_safe_path(path: object, what: str, extra_forbidden: str = "") -> Path:
    """Like `check_safe_value` for a path; returns it as a Path."""
    return Path(check_safe_value(path, what, extra_forbidden))


@dataclass
class ProcessResult:
    """What a finished tool run left: exit code, all output lines (both streams, in arrival order)."""

    argv: list[str]
    returncode: int
    lines: list[str]
    duration_s: float
    stdout_lines: int = 0
    stderr_lines: int = 0

    def tail(self, count: int = 30) -> str:
        """The last `count` output lines for an error message; a Python traceback the tool printed
        is cut to its exception line (the whole of it is in the log, line by line)."""
        return "\n".join(_without_tracebacks(self.lines)[-count:])


_TRACEBACK_START = "Traceback (most recent call last):"


def _without_tracebacks(lines: list[str]) -> list[str]:
    """`lines` with each Python traceback replaced by one line naming its exception."""
    kept: list[str] = []
    in_traceback = False
    for line in lines:
        if line.strip() == _TRACEBACK_START:
            in_traceback = True
        elif in_traceback and not line[:1].isspace():
            kept.append(f"(Python traceback of the tool, see the log) {line}")
            in_traceback = False
        elif not in_traceback:
            kept.append(line)
    return kept


@dataclass
class ProcessHandle:
    """A handle on the running tool, so another thread (Airflow's `on_kill`) can stop it."""

    process: subprocess.Popen[bytes] | None = None
    killed: bool = False
    # re-entrant: Airflow calls on_kill from a SIGTERM handler, which may interrupt `attach` itself
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def attach(self, process: subprocess.Popen[bytes] | None) -> None:
        with self._lock:
            self.process = process

    def kill(self, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM the tool's whole process group, SIGKILL it after `grace_s` if still alive."""
        with self._lock:
            process = self.process
            self.killed = True
        if process is None or process.poll() is not None:
            return
        kill_group(process, grace_s)


def kill_group(process: subprocess.Popen[bytes], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM, then SIGKILL, the process group led by `process` (its pgid is its pid: own session)."""
    pgid = process.pid
    log.warning("stopping process group %d (%s)", pgid, process.args[0] if process.args else "?")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(pgid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.05)


# Run by the watchdog interpreter: argv = pgid, grace seconds; stdin = the pipe from the parent.
# "done" before EOF: the parent finished normally; a bare EOF: the parent died, stop the group.
_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
try:
    said = sys.stdin.buffer.read()
except OSError:
    said = b""
if said.startswith(b"done"):
    sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        sys.exit(0)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.05)
"""


class _Watchdog:
    """Stops the tool's process group if this process dies before the tool (see the module doc).

    Started right after the tool (it needs the tool's pgid), in a session of its own, so a kill of
    the task's process group spares it. `release` tells it the parent finished and reaps it."""

    def __init__(self, pgid: int, grace_s: float = KILL_GRACE_S) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pgid), str(grace_s)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:  # the tool still runs, bounded by its timeout and on_kill
            log.warning("could not start the watchdog of process group %d: %s", pgid, exc)

    def release(self) -> None:
        """The tool is finished (or killed): tell the watchdog to exit, and reap it."""
        watchdog, self.process = self.process, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"done\n")
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


def _pump(stream, tag: str, sink: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        sink.put((tag, raw.decode("utf-8", "replace").rstrip("\r\n")))
    sink.put((tag, None))


def _start(argv: list[str], env: Mapping[str, str], cwd: Any, name: str) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, both streams piped (a BackendError when it cannot start)."""
    try:
        return subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise BackendError(f"could not start {name} ({argv[0]!r}): {exc.strerror or exc}") from exc


@dataclass
class _Output:
    """The lines a running tool printed (both streams, arrival order) and whether it timed out."""

    lines: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    timed_out: bool = False

    def add(self, tag: str, line: str) -> None:
        self.counts[tag] += 1
        self.lines.append(line)
        if len(self.lines) > MAX_KEPT_LINES:
            del self.lines[: len(self.lines) - MAX_KEPT_LINES]


def _collect(
    process: subprocess.Popen[bytes], name: str, timeout_s: float, start: float, out: logging.Logger
) -> _Output:
    """Read both streams until they close, the timeout passes or orphaned children hold them open."""
    sink: queue.Queue = queue.Queue()
    readers = [
        threading.Thread(target=_pump, args=(process.stdout, "stdout", sink), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, "stderr", sink), daemon=True),
    ]
    for reader in readers:
        reader.start()
    output, open_streams, exited_at = _Output(), 2, None
    try:
        while open_streams:
            now = time.monotonic()
            if now - start >= timeout_s:
                output.timed_out = True
                break
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > ORPHAN_GRACE_S:
                # the tool exited but a child it left behind still holds the pipes open
                out.warning("%s exited but its children keep running; stopping them", name)
                kill_group(process)
                break
            try:
                tag, line = sink.get(timeout=min(timeout_s - (now - start), 0.5))
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            output.add(tag, line)
            out.info("[%s] %s", name, line)
        if not output.timed_out:
            try:
                process.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                output.timed_out = True
    finally:
        if process.poll() is None:  # timeout, caller interrupted, or an exception above
            kill_group(process)
    for reader in readers:
        reader.join(timeout=2.0)
    return output


def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    name: str,
    timeout_s: float,
    cwd: str | os.PathLike[str] | None = None,
    handle: ProcessHandle | None = None,
    logger: logging.Logger | None = None,
) -> ProcessResult:
    """Run `argv` (no shell) to completion, streaming its lines to `logger`.

    Raises BackendError when the tool cannot be started, runs past `timeout_s` (its process group is
    killed) or was killed through `handle`. A non-zero exit is *not* an error here: each tool has its
    own success rules, so callers decide from `ProcessResult`.
    """
    out = logger or log
    argv = [str(a) for a in argv]
    if handle is not None and handle.killed:
        raise BackendError(f"{name} was not started: the task is being killed")
    out.info("running %s: %s", name, " ".join(argv))
    start = time.monotonic()
    process = _start(argv, env, cwd, name)
    watchdog = _Watchdog(process.pid)
    try:
        if handle is not None:
            handle.attach(process)
            if handle.killed:  # killed between the check above and the attach
                kill_group(process)
        output = _collect(process, name, timeout_s, start, out)
    finally:
        if handle is not None:
            handle.attach(None)
        watchdog.release()
    duration = time.monotonic() - start
    result = ProcessResult(
        argv, process.returncode, output.lines, duration, output.counts["stdout"], output.counts["stderr"]
    )
    if output.timed_out:
        raise BackendError(
            f"{name} did not finish within {timeout_s:.0f} s and was stopped (its whole process group); "
            f"raise the timeout if the step is legitimately slow. Last output:\n{result.tail()}"
        )
    if handle is not None and handle.killed:
        raise BackendError(f"{name} was killed on request (task killed). Last output:\n{result.tail()}")
    out.info("%s finished with exit code %d after %.1f s", name, process.returncode, duration)
    return result
