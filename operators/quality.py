"""Results history and the regression gate as Airflow tasks (record first, then judge)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from gfocal_pipeline.gate import (
    ModelGateError,
    RegressionError,
    format_model_verdict,
    format_verdict_table,
    model_verdict,
    run_gate,
)
from gfocal_pipeline.history import HistoryStore, RunRecord, model_key
from operators.base import project_errors
from operators.settings import load_settings
from operators.wiring import REPORT_KEY, VERDICT_KEY


class RecordResultsOperator(BaseOperator):
    """Write one history row per evaluated backend of this run (idempotent per run id).

    `roles` maps a role to {eval_task, backend, device, precision} (+ `export_task` where the role
    ran a graph of its own); `export_task` / `convert_task` provide hashes and tool versions,
    `summary_task` the AP_delta. `model` overrides the history's model name (default: the history
    name of the run's model adapter). Returns {role: record dict}.
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
        exports = {task: ti.xcom_pull(task_ids=task) or {} for task in self._export_tasks()}
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
                    export_info=exports[spec.get("export_task") or self.export_task],
                    **self._role_facts(ti, role, spec, summary, convert_info),
                )
                store.record(record)
                records[role] = record.to_dict()
        return records

    def _export_tasks(self) -> list[str]:
        """The export tasks whose graphs the roles ran: the run's, and a variant's own (`export_task`
        of a variant that owns its inputs)."""
        own = [spec["export_task"] for spec in self.roles.values() if spec.get("export_task")]
        return list(dict.fromkeys([self.export_task, *own]))

    def _role_facts(
        self, ti: Any, role: str, spec: dict[str, Any], summary: dict[str, Any], convert_info: dict[str, Any]
    ) -> dict[str, Any]:
        """The options, conversion, ΔAP and history model of one role. A models file entry's roles
        are its variants (`spec["variant"]`: their own options and convert task, model
        `<entry>/<variant>`) and the reference (`<entry>/reference`)."""
        config = dict(self.config)
        if not config.get("variants"):
            ap_delta = summary.get("AP_delta") if role == "device" else None
            return {
                "run_config": config,
                "convert_info": convert_info,
                "ap_delta": ap_delta,
                "model": self.model,
            }
        variant = spec.get("variant")
        row = next((r for r in summary.get("matrix", []) if r["variant"] == variant), {})
        convert = ti.xcom_pull(task_ids=spec["convert_task"]) if spec.get("convert_task") else None
        return {
            "run_config": dict(config["variants"][variant]) if variant else config,
            "convert_info": convert or {},
            "ap_delta": row.get("dAP_reference"),
            "model": model_key(self.model or config["history_model"], variant or "reference"),
        }


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
        return _write_report(self.log, run_dir, verdict)


def _write_report(log: Any, run_dir: str, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """The regression report of a judged run (or variant) in `run_dir`; None (logged) if it fails."""
    from gfocal_pipeline.report import ReportOptions, write_report

    try:
        options = ReportOptions(score_thr=load_settings().report_score_thr)
        return write_report(run_dir, verdict=verdict, options=options)
    except Exception:  # the verdict stands without its report; say why in the log
        log.exception("the regression report of %s could not be written", run_dir)
        return None


class ModelGateOperator(BaseOperator):
    """Judge every variant of a models file entry's night, then raise one failure naming them all.

    `variants` maps a variant to {evaluate_task, thresholds, run_dir, expected_failure}: each is
    judged like `RegressionGateOperator` judges a run (its own thresholds, baseline and report, in
    its folder); the model's verdict (`gate.model_verdict`) is pushed under key `verdict` and fails
    the task when a variant regressed that is not an expected failure, or an expected failure passes.
    """

    template_fields: Sequence[str] = ("variants",)

    def __init__(
        self, *, record_task: str, model: str, variants: dict[str, dict[str, Any]], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.record_task, self.model, self.variants = record_task, model, variants

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        records = ti.xcom_pull(task_ids=self.record_task)
        verdicts = {}
        with HistoryStore(load_settings().history_url) as store:
            for name, spec in self.variants.items():
                record = RunRecord.from_dict(records[name])
                timing = (ti.xcom_pull(task_ids=spec["evaluate_task"]) or {}).get("timing", {})
                verdicts[name] = run_gate(
                    store,
                    record,
                    dict(spec["thresholds"]),
                    fps_windows=timing.get("shard_fps") or None,
                    run_dir=str(spec["run_dir"]),
                )
                _write_report(self.log, str(spec["run_dir"]), verdicts[name])
        expected = {name: spec.get("expected_failure") for name, spec in self.variants.items()}
        verdict = model_verdict(self.model, verdicts, expected, dag_id=ti.dag_id, run_id=ti.run_id)
        ti.xcom_push(key=VERDICT_KEY, value=verdict)
        self.log.info("gate verdict:\n%s", format_model_verdict(verdict))
        if not verdict["passed"]:
            raise AirflowFailException(str(ModelGateError(verdict)))
        return verdict
