"""`SizedTimeoutMixin`: an operator's `execution_timeout` resized at execute time for the images it
really handles (the budgets are in `operators.timeouts`, the worker's settings in `operators.settings`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from operators.settings import load_settings


class SizedTimeoutMixin:
    """Resizes the task's `execution_timeout` in `pre_execute` (before Airflow arms it) to the images
    the task really handles, from this worker's `[gfocal]` settings; `timeout_kind` names the budget.
    A kind with fixed minutes in `task_timeout_minutes` keeps them."""

    timeout_kind: str = ""
    execution_timeout: timedelta | None
    log: Any

    def timeout_images(self) -> int | None:
        """The images this execution handles, None when not known (the parse-time timeout stays)."""
        return None

    def pre_execute(self, context: Any) -> None:
        images = self.timeout_images()
        if images is None or not self.timeout_kind:
            return
        settings = load_settings()
        if self.timeout_kind in dict(settings.task_timeout_minutes):
            return
        self.execution_timeout = settings.task_timeout(self.timeout_kind, images)
        self.log.info(
            "execution_timeout %s (%s budget for %d images)",
            self.execution_timeout,
            self.timeout_kind,
            images,
        )
