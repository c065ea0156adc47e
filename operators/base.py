"""What the gfocal operators share: stopping a running external tool when Airflow kills the task, and
the check that a task sees the shared run directory and the artifacts earlier tasks named in XCom."""

from __future__ import annotations

import os
import socket
from typing import Any

from gfocal_pipeline.backends.process import ProcessHandle
from gfocal_pipeline.errors import GfocalError

# the (rendered) arguments that name files or folders made by earlier tasks, possibly on another host
SHARED_PATH_ARGUMENTS = ("run_dir", "onnx_path", "model")


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


def attributes(operator: object, names: tuple[str, ...]) -> dict[str, Any]:
    """{name: operator.name}: an operator's (rendered) arguments passed on to its step by name."""
    return {name: getattr(operator, name) for name in names}


class KillableMixin:
    """Holds the running tool's handle so `on_kill` can stop it (created per execution)."""

    _handle: ProcessHandle | None = None

    def _new_handle(self) -> ProcessHandle:
        self._handle = ProcessHandle()
        return self._handle

    def on_kill(self) -> None:
        if self._handle is not None:
            self._handle.kill()
