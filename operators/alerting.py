"""Delivering the library's alert content through Airflow notifiers (SMTP default; Slack, apprise).

Configuration (airflow.cfg section `[gfocal]` or `AIRFLOW__GFOCAL__*` env vars):
    alert_channels   comma list of smtp, slack, apprise (default: smtp)
    alert_to         comma list of e-mail recipients (smtp); no recipients -> the alert is only logged
    alert_from       sender address (default: [email] from_email or gfocal@localhost)
    smtp_conn_id     Airflow SMTP connection (default: smtp_default)
    slack_conn_id    Slack incoming-webhook connection (default: slack_default)
    apprise_conn_id  apprise connection (default: apprise_default)
    base_url         public Airflow URL for links (default: [api] base_url)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseNotifier

from gfocal_pipeline.alerts import (
    AlertContent,
    airflow_run_url,
    build_alert,
    build_failure_alert,
    trend_page_url,
)

log = logging.getLogger(__name__)
GATE_TASK = "gate"
VERDICT_KEY = "verdict"


def _conf(key: str, fallback: str = "") -> str:
    from airflow.configuration import conf

    return conf.get("gfocal", key, fallback=fallback) or fallback


def _links(dag_id: str, run_id: str) -> tuple[str | None, str | None]:
    from airflow.configuration import conf

    base = _conf("base_url") or conf.get("api", "base_url", fallback="") or ""
    if not base:
        return None, None
    return airflow_run_url(base, dag_id, run_id), trend_page_url(base)


def deliver(content: AlertContent, context: dict[str, Any] | None = None) -> list[str]:
    """Send `content` on every configured channel; returns the channels that delivered.

    A channel that fails is logged and skipped: an alert problem must not hide the run's own failure,
    nor make the task retry in a loop.
    """
    channels = [c.strip() for c in _conf("alert_channels", "smtp").split(",") if c.strip()]
    sent = []
    for channel in channels:
        try:
            if channel == "smtp":
                recipients = [r.strip() for r in _conf("alert_to").split(",") if r.strip()]
                if not recipients:
                    log.warning(
                        "no [gfocal] alert_to recipients: alert not e-mailed:\n%s\n%s",
                        content.subject,
                        content.text,
                    )
                    continue
                from airflow.providers.smtp.notifications.smtp import SmtpNotifier

                notifier = SmtpNotifier(
                    to=recipients,
                    from_email=_conf("alert_from", "gfocal@localhost"),
                    subject=content.subject,
                    html_content=content.html,
                    smtp_conn_id=_conf("smtp_conn_id", "smtp_default"),
                )
            elif channel == "slack":
                from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

                notifier = SlackWebhookNotifier(
                    slack_webhook_conn_id=_conf("slack_conn_id", "slack_default"),
                    text=f"{content.subject}\n```{content.text}```",
                )
            elif channel == "apprise":
                from airflow.providers.apprise.notifications.apprise import AppriseNotifier

                notifier = AppriseNotifier(
                    title=content.subject,
                    body=content.text,
                    apprise_conn_id=_conf("apprise_conn_id", "apprise_default"),
                )
            else:
                log.error("unknown alert channel %r in [gfocal] alert_channels", channel)
                continue
            notifier.notify(context or {})
            sent.append(channel)
        except ImportError:
            log.error("alert channel %r needs its Airflow provider installed (see README)", channel)
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
        run_url, trend_url = _links(dag_id, run_id)
        verdict = ti.xcom_pull(task_ids=GATE_TASK, key=VERDICT_KEY) if ti.task_id == GATE_TASK else None
        error = context.get("exception")
        if verdict:
            content = build_alert(verdict, run_url=run_url, trend_url=trend_url)
        else:
            content = build_failure_alert(
                dag_id=dag_id,
                run_id=run_id,
                what=f"task {ti.task_id}",
                error=str(error or "unknown error"),
                run_url=run_url,
                trend_url=trend_url,
            )
        deliver(content, context)


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
    run_url, trend_url = _links(dag_id, run_id)
    content = build_failure_alert(
        dag_id=dag_id,
        run_id=run_id,
        what="deadline",
        error=f"the run had not finished {kwargs.get('interval', 'in time')} after it was queued",
        run_url=run_url,
        trend_url=trend_url,
    )
    deliver(content, context)
