"""`DoctorOperator`: `gfocal doctor` as the optional first task of a night, on the worker it checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_WIDTH
from gfocal_pipeline.errors import ConfigError
from operators.base import project_errors


def _given(value: object) -> object:
    """A rendered argument, None when not given: a template renders None as "None", empty as ""."""
    return None if value is None or str(value).strip() in ("", "None") else value


def _count(operator: DoctorOperator, name: str, default: int) -> int:
    """A rendered integer argument (templates render to text), or a ConfigError naming it."""
    value = _given(getattr(operator, name))
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"DoctorOperator({operator.task_id!r}) {name} {value!r}: expected an integer >= 1")
    return number


class DoctorOperator(BaseOperator):
    """Check the worker that runs it (`gfocal_pipeline.doctor`, docs/doctor.md): the CANN environment
    and tools, the NPU, the shared work directory and its free space, the metadata and history
    databases, the Celery broker, the SMTP server and the library versions. Each result is logged as
    one line; a FAIL fails the task (`DoctorFailed`, naming the FAIL lines and their fixes).

    For: the nightly's first task on the `ascend` queue (the host that converts and infers). The URLs
    come from Airflow itself: `[database] sql_alchemy_conn`, `[celery] broker_url` (checked only with
    a Celery executor), `[gfocal] history_url`, and the `[gfocal] smtp_conn_id` connection (when smtp
    is an alert channel). `work_dir` defaults to `[gfocal] work_dir`, else the default work directory;
    `images` (default 5000), `height`, `width` and `dtype` size the night's disk need; `tool` is the
    night's inference tool; `only` restricts the checks (names or groups, e.g. ["cann", "npu"]).
    XCom: {"ready": true, "checks": [{"check", "status", "detail", "fix"}, ...]}.
    """

    template_fields: Sequence[str] = ("set_env", "tool", "work_dir", "images", "height", "width", "dtype")
    ui_color = "#e0f2e9"

    def __init__(
        self,
        *,
        set_env: str | None = None,
        tool: str = "msame",
        work_dir: str | None = None,
        images: int | str | None = None,
        height: int | str = DEFAULT_HEIGHT,
        width: int | str = DEFAULT_WIDTH,
        dtype: str = "float32",
        only: Sequence[str] | None = None,
        timeout_s: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.set_env, self.tool, self.work_dir, self.images = set_env, tool, work_dir, images
        self.height, self.width, self.dtype = height, width, dtype
        self.only, self.timeout_s = list(only) if only else None, timeout_s

    def _smtp(self, settings: Any) -> dict[str, Any]:
        """{"smtp": target} from the `[gfocal] smtp_conn_id` connection, else why there is none."""
        from gfocal_pipeline.probes import smtp_target

        if "smtp" not in settings.alert_channels:
            return {"notes": {"smtp": f"smtp is not an alert channel ({', '.join(settings.alert_channels)})"}}
        from airflow.sdk import BaseHook

        source = f"the Airflow connection {settings.smtp_conn_id!r}"
        try:
            connection = BaseHook.get_connection(settings.smtp_conn_id)
            return {"smtp": smtp_target(connection.host, connection.port, connection.extra_dejson, source)}
        except ConfigError as exc:
            return {"smtp_error": str(exc)}
        except Exception as exc:  # AirflowNotFoundException: no such connection
            return {
                "notes": {"smtp": f"{source} is not defined ({type(exc).__name__}): alerts are only logged"}
            }

    def _settings(self) -> Any:
        from airflow.configuration import conf

        from gfocal_pipeline.doctor import DEFAULT_IMAGES, DoctorSettings
        from gfocal_pipeline.workspace import default_work_dir
        from operators.settings import load_settings

        gfocal = load_settings()
        executor = conf.get("core", "executor", fallback="") or ""
        celery = "celery" in executor.lower()
        smtp = self._smtp(gfocal)
        notes = {"broker": f"executor {executor or 'unknown'}: no Celery broker", **smtp.pop("notes", {})}
        return DoctorSettings(
            set_env=_given(self.set_env),
            tool=str(_given(self.tool) or "msame"),
            work_dir=str(
                _given(self.work_dir) or dict(gfocal.run_defaults).get("work_dir") or default_work_dir()
            ),
            images=_count(self, "images", DEFAULT_IMAGES),
            height=_count(self, "height", DEFAULT_HEIGHT),
            width=_count(self, "width", DEFAULT_WIDTH),
            dtype=str(_given(self.dtype) or "float32"),
            metadata_url=conf.get("database", "sql_alchemy_conn", fallback=None),
            history_url=gfocal.history_url,
            broker_url=conf.get("celery", "broker_url", fallback=None) if celery else None,
            timeout_s=float(self.timeout_s),
            notes=notes,
            **smtp,
        )

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline.doctor import FAIL, WARN, raise_for_results, run_doctor, verdict_line

        def log_line(result: Any) -> None:
            level = {FAIL: self.log.error, WARN: self.log.warning}.get(result.status, self.log.info)
            level("%s", result.line())

        results = run_doctor(self._settings(), self.only, on_result=log_line)
        self.log.info("%s", verdict_line(results))
        raise_for_results(results)
        return {"ready": True, "checks": [result.to_dict() for result in results]}
