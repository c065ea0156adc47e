"""What the gfocal operators share: stopping a running external tool when Airflow kills the task, and
the check that a task sees the shared run directory and the artifacts earlier tasks named in XCom."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from gfocal_pipeline.backends.process import ProcessHandle
from gfocal_pipeline.errors import ConfigError, GfocalError, OmInputMismatchError, describe_os_error

# the (rendered) arguments that name files or folders made by earlier tasks, possibly on another host
SHARED_PATH_ARGUMENTS = ("run_dir", "onnx_path", "model")
# errors no retry can heal (bad options, an OM converted for another input): fail at once
PERMANENT_ERRORS: tuple[type[GfocalError], ...] = (ConfigError, OmInputMismatchError)


@contextlib.contextmanager
def fail_without_retry() -> Iterator[None]:
    """Turn a `PERMANENT_ERRORS` error into AirflowFailException (the task fails, skipping its
    retries; the failure alert still names the error)."""
    try:
        yield
    except PERMANENT_ERRORS as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def project_errors(execute: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an operator's `execute`: an `OSError` (disk full, read-only work dir, a directory where a
    file was expected, ...) becomes the project's error naming the path and the fix, the same wording
    as the `gfocal` CLI (`errors.describe_os_error`)."""

    @functools.wraps(execute)
    def wrapper(self: Any, context: Any) -> Any:
        try:
            return execute(self, context)
        except OSError as exc:
            raise describe_os_error(exc, f"task {self.task_id}") from exc

    return wrapper


def require_shared_paths(context: Any) -> None:
    """`pre_execute` of every gfocal task: fail at once, naming the path and the mount to fix, when the
    run directory (made by `prepare`, maybe on another worker) or an artifact named in XCom is not
    visible on this worker. `prepare` itself creates the run directory and is not checked."""
    task = context["task"]
    if task.task_id == "prepare":
        return
    for name in SHARED_PATH_ARGUMENTS:
        path = getattr(task, name, None)
        if isinstance(path, str) and os.path.isabs(path) and not os.path.exists(path):
            raise GfocalError(
                f"{name} {path!r} (from an earlier task of this run) does not exist on this worker "
                f"({socket.gethostname()}): every worker must mount the shared work directory (and the "
                "datasets) at the same path, e.g. the docker-compose volume gfocal-data at /data/gfocal "
                "(GFOCAL_WORK_DIR) on every host, the NPU host's airflow-worker-ascend included"
            )


def manifest_images(run_dir: object, shard: object = None) -> int | None:
    """Images of the run's manifest (of one `shard`), None when it cannot be read (the step itself
    then fails with the precise error)."""
    from gfocal_pipeline.layout import RunLayout
    from gfocal_pipeline.manifest import load_manifest

    if not isinstance(run_dir, str):
        return None
    try:
        manifest = load_manifest(RunLayout.at(run_dir).manifest)
    except (GfocalError, OSError, ValueError):
        return None
    if shard is None:
        return len(manifest.images)
    ids = manifest.shards.get(str(shard))
    return len(ids) if ids else None


def attributes(operator: object, names: tuple[str, ...]) -> dict[str, Any]:
    """{name: operator.name}: an operator's (rendered) arguments passed on to its step by name."""
    return {name: getattr(operator, name) for name in names}


class KillableMixin:
    """Holds the running tool's handle so `on_kill` can stop it (created per execution).

    Airflow calls `on_kill` when the task is killed (SIGTERM from the supervisor) and when it ran
    past its `execution_timeout`: the tool's whole process group gets SIGTERM, then SIGKILL after
    `KILL_GRACE_S`, and the running step fails with "killed on request"."""

    _handle: ProcessHandle | None = None

    def _new_handle(self) -> ProcessHandle:
        self._handle = ProcessHandle()
        return self._handle

    def on_kill(self) -> None:
        if self._handle is not None:
            self._handle.kill()
