"""Atomic writes, content hashes and crash-safe state: artifacts appear whole or not at all, a
damaged state file means "not done", one writer per step and run directory; retries are idempotent."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gfocal_pipeline.errors import GfocalError, StepBusyError

if TYPE_CHECKING:  # numpy loads in the steps that read arrays, not when a DAG file is parsed
    import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def crc32_file(path: str | os.PathLike[str]) -> str:
    """CRC-32 of the file at `path` as 8 hex digits: a fast content check against accidental damage
    (about 1.5x sha256's speed on SHA-NI CPUs; `zlib.crc32` releases the GIL, so threads scale)."""
    value = 0
    buffer = bytearray(_CHUNK * 4)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            value = zlib.crc32(view[:count], value)
    return f"{value:08x}"


def ensure_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create `path` if needed and prove it is writable, or raise naming `what`."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        raise GfocalError(
            f"{what} {str(directory)!r} is not writable ({exc.strerror or exc}); "
            "choose a directory you can write to or fix its permissions"
        ) from exc
    return directory


# --- who wrote a temp: `<host>-<pid>` in its name, so a dead writer's leftovers are recognised ------
_OWNER = re.compile(r"[-.](?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)[-.][A-Za-z0-9_]+(?:\.tmp)?$")


def owner_tag() -> str:
    """`<host>-<pid>` of this process, for the names of its temporary files and build folders."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def owner_is_dead(path: str | os.PathLike[str]) -> bool:
    """True when `path` was named by `owner_tag` of a process of this host that no longer runs.

    False when unsure (another host, no tag, the pid runs): then only age may reclaim it."""
    match = _OWNER.search(Path(path).name)
    if match is None or match["host"] != owner_tag().rsplit("-", 1)[0]:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _reclaim_dead_temps(target: Path) -> None:
    """Remove temps of `target` whose writer died (SIGKILL, OOM, a lost host's restart)."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if owner_is_dead(tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                log.info("removed %s, left by a writer that was killed", tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temp's name carries its writer (`owner_tag`): the next writer of the same target removes
    what a killed one left."""
    target = Path(target)
    _reclaim_dead_temps(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{owner_tag()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp creates 0600; artifacts are read by other users (e.g. the NPU tools), so use umask
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_json(target: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically (sorted keys, indented) and return the path."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return target


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `target` atomically and return the path."""
    target = Path(target)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


# --- crash-safe state -------------------------------------------------------------------------
# Markers, timing files and saved arrays are state a retry decides on. A file a killed writer or a
# full disk left damaged means "not done": it is logged and the work is redone, never a crash.

_STATE_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def read_state_json(path: str | os.PathLike[str], what: str) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (logged: the step redoes it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s %s is unreadable (%s); treating it as not done", what, path, exc)
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        log.warning("%s %s is corrupt (%s); treating it as not done", what, path, exc)
        return None


def read_state_npz(path: str | os.PathLike[str], what: str) -> dict[str, np.ndarray] | None:
    """Every array of the .npz at `path`, or None when it is missing or damaged (logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except _STATE_ERRORS as exc:
        log.warning("%s %s is damaged (%s); treating it as not done", what, path, exc)
        return None


def reclaim_temps(directory: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Remove temp files `atomic_path` writers left in `directory` when they were killed.

    `names` limits it to the temps of those targets (other writers share the folder); call it only
    while holding the lock of the step that writes them, so no live writer's temp is removed."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    patterns = [f".{name}.*.tmp" for name in names] if names is not None else [".*.tmp"]
    removed = []
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                size = tmp.stat().st_size
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s (%d bytes) left by an interrupted writer", tmp, size)
    return removed


@contextlib.contextmanager
def step_lock(run_dir: str | os.PathLike[str], step: str) -> Iterator[None]:
    """Hold `<run_dir>/.locks/<step>.lock` for the block, or fail fast naming the holder.

    The lock is an flock: the kernel drops it when its holder dies, so a killed task never blocks
    its retry. The file records who holds it (host, pid, since) for the message of a second writer."""
    locks = Path(run_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{step}.lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StepBusyError(
                f"step {step!r} of run directory {str(run_dir)!r} is already running ({holder}); "
                "wait for it to finish, or give this run its own run directory (another run id)"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(
                f"held by pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
            )
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_step_locks(run_dir: str | os.PathLike[str]) -> list[str]:
    """The steps of `run_dir` whose `step_lock` some live process holds now (sorted).

    Each `.locks/<step>.lock` is probed with a non-blocking shared flock, released at once: it fails
    only while a holder (this process included, through another open file) has the step's lock. A
    killed holder's lock is gone with it, so a stale file never counts."""
    locks = Path(run_dir) / ".locks"
    held = []
    for path in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        try:
            with open(path, "rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(path.stem)
                else:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError:  # removed meanwhile, or unreadable: not evidence of a live holder
            continue
    return held
