"""Delivering the library's alert content through Airflow notifiers (SMTP default; Slack, apprise).

Channels, recipients, connections and the links' base URL are `[gfocal]` settings (`operators.settings`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from airflow.sdk import BaseNotifier

from gfocal_pipeline.alerts import (
    AlertContent,
    airflow_run_url,
    alert_message,
    build_alert,
    build_failure_alert,
    build_model_alert,
    report_page_url,
    trend_page_url,
)
from operators.settings import GfocalSettings, load_settings
from operators.wiring import GATE, VERDICT_KEY

log = logging.getLogger(__name__)


def _links(settings: GfocalSettings, dag_id: str, run_id: str) -> tuple[str | None, str | None]:
    if not settings.base_url:
        return None, None
    return airflow_run_url(settings.base_url, dag_id, run_id), trend_page_url(settings.base_url)


def verdict_alert(verdict: dict[str, Any], settings: GfocalSettings) -> AlertContent:
    """The alert of a verdict with its run's regression report (when the gate could write one); a
    models file entry's verdict (one per variant) gives one alert naming every failing variant."""
    from gfocal_pipeline.report import load_report

    dag_id, run_id = verdict.get("dag_id", ""), verdict.get("run_id", "")
    run_url, trend_url = _links(settings, dag_id, run_id)
    if "variants" in verdict:
        failing = [*verdict.get("failing", []), *verdict.get("now_passing", [])]
        found = {name: verdict["variants"][name].get("run_dir") for name in failing}
        reports = {name: load_report(run_dir) for name, run_dir in found.items() if run_dir}
        reports = {name: report for name, report in reports.items() if report}
        return build_model_alert(verdict, run_url=run_url, trend_url=trend_url, reports=reports)
    report = load_report(verdict["run_dir"]) if verdict.get("run_dir") else None
    report_url = report_page_url(settings.base_url, dag_id, run_id) if report and settings.base_url else None
    return build_alert(verdict, run_url=run_url, trend_url=trend_url, report=report, report_url=report_url)


class _SmtpAlert:
    """The alert as one e-mail (text + HTML + inline pictures, `alerts.alert_message`), sent through
    the Airflow SMTP connection `[gfocal] smtp_conn_id` with the provider's SmtpHook, which handles
    the connection's TLS/SSL, login or OAuth2. (The provider's SmtpNotifier sends HTML only, with
    pictures as plain attachments; an alert needs its text part and inline pictures.)"""

    def __init__(self, content: AlertContent, settings: GfocalSettings) -> None:
        self.content, self.settings = content, settings

    def notify(self, context: dict[str, Any]) -> None:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        with SmtpHook(smtp_conn_id=self.settings.smtp_conn_id) as hook:
            sender = self.settings.alert_from or hook.from_email
            if not sender:
                raise ValueError("no sender: set [gfocal] alert_from or from_email in the SMTP connection")
            message = alert_message(self.content, sender, list(self.settings.alert_to))
            client = hook._smtp_client  # the hook's logged-in client; it has no public send of a message
            if client is None:
                raise ConnectionError(f"SMTP connection {self.settings.smtp_conn_id!r} did not open")
            client.send_message(message)
        log.info("alert %r e-mailed to %s", self.content.subject, ", ".join(self.settings.alert_to))


def _smtp(content: AlertContent, settings: GfocalSettings) -> Any:
    if not settings.alert_to:
        log.warning(
            "no [gfocal] alert_to recipients: alert not e-mailed:\n%s\n%s", content.subject, content.text
        )
        return None
    return _SmtpAlert(content, settings)


def _slack(content: AlertContent, settings: GfocalSettings) -> Any:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    return SlackWebhookNotifier(
        slack_webhook_conn_id=settings.slack_conn_id, text=f"{content.subject}\n```{content.text}```"
    )


def _apprise(content: AlertContent, settings: GfocalSettings) -> Any:
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier

    return AppriseNotifier(title=content.subject, body=content.text, apprise_conn_id=settings.apprise_conn_id)


CHANNELS: dict[str, Callable[[AlertContent, GfocalSettings], Any]] = {
    "smtp": _smtp,
    "slack": _slack,
    "apprise": _apprise,
}


def deliver(
    content: AlertContent, context: dict[str, Any] | None = None, settings: GfocalSettings | None = None
) -> list[str]:
    """Send `content` on every configured channel; returns the channels that delivered.

    A channel that fails is logged and skipped: an alert problem must not hide the run's own failure,
    nor make the task retry in a loop.
    """
    settings = settings or load_settings()
    sent = []
    for channel in settings.alert_channels:
        build = CHANNELS.get(channel)
        if build is None:
            log.error("unknown alert channel %r in [gfocal] alert_channels", channel)
            continue
        try:
            notifier = build(content, settings)
            if notifier is not None:
                notifier.notify(context or {})
                sent.append(channel)
        except ImportError:
            log.error(
                "alert channel %r needs its Airflow provider installed (see docs/quality.md#alerts)", channel
            )
        except Exception:  # delivery must never raise out of a failure callback
            log.exception("alert channel %r failed to deliver %r", channel, content.subject)
    return sent


class GfocalAlertNotifier(BaseNotifier):
    """Failure callback for every task of a gfocal DAG.

    The gate task's failure becomes a verdict alert (table of checks); any other failure an alert
    naming the task and its error.
    """

    def notify(self, context: dict[str, Any]) -> None:
        ti = context["ti"]
        dag_id, run_id = ti.dag_id, ti.run_id
        settings = load_settings()
        run_url, trend_url = _links(settings, dag_id, run_id)
        verdict = ti.xcom_pull(task_ids=GATE, key=VERDICT_KEY) if ti.task_id == GATE else None
        error = context.get("exception")
        if verdict:
            content = verdict_alert(verdict, settings)
        else:
            content = build_failure_alert(
                dag_id=dag_id,
                run_id=run_id,
                what=f"task {ti.task_id}",
                error=str(error or "unknown error"),
                run_url=run_url,
                trend_url=trend_url,
            )
        deliver(content, context, settings)


def deadline_missed(context: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Deadline callback: the nightly has not finished in time.

    Airflow passes the run as a dict (`context["dag_run"]`: the API's DAGRunResponse dumped, whose run
    id field is `dag_run_id`); an object with attributes is accepted too.
    """
    dag_run = (context or {}).get("dag_run") or {}
    if not isinstance(dag_run, Mapping):
        dag_run = {"dag_id": getattr(dag_run, "dag_id", None), "run_id": getattr(dag_run, "run_id", None)}
    dag_id = dag_run.get("dag_id") or kwargs.get("dag_id", "?")
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id") or "?"  # the API model names it dag_run_id
    settings = load_settings()
    run_url, trend_url = _links(settings, dag_id, run_id)
    content = build_failure_alert(
        dag_id=dag_id,
        run_id=run_id,
        what="deadline",
        error=f"the run had not finished {kwargs.get('interval', 'in time')} after it was queued",
        run_url=run_url,
        trend_url=trend_url,
    )
    deliver(content, context, settings)
