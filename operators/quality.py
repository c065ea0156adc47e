"""Results history and the regression gate as Airflow tasks (record first, then judge)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from gfocal_pipeline.gate import RegressionError, format_verdict_table, run_gate
from gfocal_pipeline.history import HistoryStore, RunRecord
from operators.base import project_errors
from operators.settings import load_settings
from operators.wiring import REPORT_KEY, VERDICT_KEY


class RecordResultsOperator(BaseOperator):
    """Write one history row per evaluated backend of this run (idempotent per run id).

    `roles` maps a role to {eval_task, backend, device, precision}; `export_task` / `convert_task`
    provide hashes and tool versions, `summary_task` the AP_delta. `model` overrides the history's
    model name (default: the history name of the run's model adapter). Returns {role: record dict}.
    """

    template_fields: Sequence[str] = ("config", "roles")

    def __init__(
        self,
        *,
        config: dict[str, Any] | str,
        roles: dict[str, dict[str, str]],
        export_task: str,
        summary_task: str,
        convert_task: str | None = None,
        model: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config, self.roles, self.model = config, roles, model
        self.export_task, self.convert_task, self.summary_task = export_task, convert_task, summary_task

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from gfocal_pipeline import steps

        ti = context["ti"]
        export_info = ti.xcom_pull(task_ids=self.export_task) or {}
        convert_info = (ti.xcom_pull(task_ids=self.convert_task) if self.convert_task else None) or {}
        summary = ti.xcom_pull(task_ids=self.summary_task) or {}
        records = {}
        with HistoryStore(load_settings().history_url) as store:
            for role, spec in self.roles.items():
                record = steps.history_record(
                    dag_id=ti.dag_id,
                    run_id=ti.run_id,
                    role=spec,
                    evaluation=ti.xcom_pull(task_ids=spec["eval_task"]),
                    run_config=dict(self.config),
                    export_info=export_info,
                    convert_info=convert_info,
                    ap_delta=summary.get("AP_delta") if role == "device" else None,
                    model=self.model,
                )
                store.record(record)
                records[role] = record.to_dict()
        return records


class RegressionGateOperator(BaseOperator):
    """Judge the device run against floors and the median of recent passing runs, then write the run's
    regression report (`gfocal_pipeline.report`, in `<run_dir>/report/`).

    The verdict is pushed (XCom key `verdict` and the return value), the report's summary under key
    `report`; a failed gate fails the task without retries, and the DAG's failure notifier turns the
    verdict and the report into an alert. A report that cannot be made is logged, never hides the
    verdict. The fps windows are the shard fps of `evaluate_task`.
    """

    template_fields: Sequence[str] = ("thresholds", "run_dir")

    def __init__(
        self,
        *,
        record_task: str,
        evaluate_task: str,
        thresholds: dict[str, Any] | str,
        run_dir: str | None = None,
        role: str = "device",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.record_task, self.evaluate_task, self.thresholds, self.role = (
            record_task,
            evaluate_task,
            thresholds,
            role,
        )
        self.run_dir = run_dir

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        record = RunRecord.from_dict(ti.xcom_pull(task_ids=self.record_task)[self.role])
        shard_fps = (ti.xcom_pull(task_ids=self.evaluate_task) or {}).get("timing", {}).get("shard_fps")
        run_dir = str(self.run_dir) if self.run_dir else None
        with HistoryStore(load_settings().history_url) as store:
            verdict = run_gate(
                store, record, dict(self.thresholds), fps_windows=shard_fps or None, run_dir=run_dir
            )
        ti.xcom_push(key=VERDICT_KEY, value=verdict)
        self.log.info("gate verdict:\n%s", format_verdict_table(verdict))
        if run_dir:
            ti.xcom_push(key=REPORT_KEY, value=self._report(run_dir, verdict))
        if not verdict["passed"]:
            raise AirflowFailException(str(RegressionError(verdict)))
        return verdict

    def _report(self, run_dir: str, verdict: dict[str, Any]) -> dict[str, Any] | None:
        from gfocal_pipeline.report import ReportOptions, write_report

        try:
            options = ReportOptions(score_thr=load_settings().report_score_thr)
            return write_report(run_dir, verdict=verdict, options=options)
        except Exception:  # the verdict stands without its report; say why in the log
            self.log.exception("the regression report of %s could not be written", run_dir)
            return None
