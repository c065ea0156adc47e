"""Regression alerts: channel-agnostic content from a gate verdict, and a plain smtplib sender.

`build_alert` returns (subject, text, html, pictures) for any channel (e-mail, Slack, ...): the
verdict table, and from the run's regression report (`gfocal_pipeline.report`) the classes that
changed most and, for a failed verdict, the report's pictures (capped in number and bytes).
`alert_message` makes the e-mail: text and HTML alternatives, the pictures as content-id parts
related to the HTML. `send_alert` delivers it over SMTP without Airflow. A server that cannot be
reached raises SmtpConnectionError, which operators should treat as non-retryable (retrying an alert
minutes later does not fix a wrong host and delays the task's failure).
"""

from __future__ import annotations

import html
import logging
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from gfocal_pipeline.errors import GfocalError
from gfocal_pipeline.gate import format_verdict_table, verdict_rows

log = logging.getLogger(__name__)

TREND_URL_PREFIX = "/gfocal"


class AlertDeliveryError(GfocalError):
    """The alert could not be delivered. `retryable` says whether trying again later may help."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class SmtpConnectionError(AlertDeliveryError):
    """The SMTP server refused or did not answer the connection (wrong host/port, server down)."""


class AlertContent(NamedTuple):
    subject: str
    text: str
    html: str
    # (content id, PNG path): pictures the HTML shows inline as `cid:<content id>`
    pictures: tuple[tuple[str, str], ...] = ()


ALERT_CLASS_ROWS = 10  # worst per-class rows of the report in an alert
ALERT_PICTURES = 6
ALERT_PICTURE_BYTES = (
    1_500_000  # all pictures of one alert together; a huge dataset never makes a huge e-mail
)


def airflow_run_url(base_url: str, dag_id: str, run_id: str) -> str:
    """Link to a DAG run in the Airflow 3 UI; `base_url` is `[api] base_url` (may carry a path prefix)."""
    return f"{base_url.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def trend_page_url(base_url: str) -> str:
    """Link to the gfocal trend page that plugins/gfocal_plugin.py mounts."""
    return f"{base_url.rstrip('/')}{TREND_URL_PREFIX}/"


def report_page_url(base_url: str, dag_id: str, run_id: str) -> str:
    """Link to a run's regression report page (served by the plugin beside the trend page)."""
    return f"{trend_page_url(base_url)}runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/report/"


def _metric_summary(metric: str, checks: Sequence[Mapping[str, Any]]) -> str:
    failed = [c for c in checks if c["metric"] == metric and not c["passed"]]
    vs_base = next((c for c in failed if c["baseline"] is not None), None)
    if vs_base is not None and vs_base["value"] is not None:
        value, base = vs_base["value"], vs_base["baseline"]
        if metric == "fps":
            change = (value - base) / base * 100 if base else float("-inf")
            return f"fps {change:+.1f}% ({value:.2f} vs {base:.2f})"
        return f"{metric} {value - base:+.4f} ({value:.4f} vs {base:.4f})"
    check = failed[0]
    if check["value"] is None:
        return f"{metric} not measured"
    value_text = f"{check['value']:.4f}" if metric == "AP" else f"{check['value']:.2f}"
    limit_text = f"{check['limit']:.4f}" if metric == "AP" else f"{check['limit']:.2f}"
    return f"{metric} {value_text} below floor {limit_text}"


def _fmt_delta(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def report_rows(report: Mapping[str, Any], limit: int = ALERT_CLASS_ROWS) -> list[list[str]]:
    """The report's worst per-class rows as table cells (header first)."""
    rows = [["class", "AP", "Δ reference", "Δ baseline", "boxes", "boxes reference"]]
    for row in report.get("per_class", [])[:limit]:
        ref_boxes = row.get("boxes_reference")
        rows.append(
            [
                str(row["name"]),
                "-" if row["AP"] is None else f"{row['AP']:.4f}",
                _fmt_delta(row.get("delta_reference")),
                _fmt_delta(row.get("delta_baseline")),
                str(row.get("boxes", "")),
                "-" if ref_boxes is None else str(ref_boxes),
            ]
        )
    return rows


def alert_pictures(report: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(content id, path) of the report's pictures, at most ALERT_PICTURES within ALERT_PICTURE_BYTES."""
    folder = Path(str(report.get("run_dir", ""))) / "report"
    chosen, total = [], 0
    for item in report.get("images", []):
        if not item.get("picture") or len(chosen) >= ALERT_PICTURES:
            continue
        path = folder / item["picture"]
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if total + size > ALERT_PICTURE_BYTES:
            break
        total += size
        chosen.append((f"{path.stem}@gfocal.report", str(path)))
    return tuple(chosen)


def build_alert(
    verdict: Mapping[str, Any],
    *,
    run_url: str | None = None,
    trend_url: str | None = None,
    report: Mapping[str, Any] | None = None,
    report_url: str | None = None,
) -> AlertContent:
    """Subject naming the regressed metric(s), plain-text and HTML bodies with the verdict table and,
    from the run's `report`, the classes that changed most; a failed verdict's HTML also shows the
    report's pictures inline (AlertContent.pictures)."""
    label = verdict.get("label", "")
    run_id = verdict.get("run_id", "")
    regressed = list(verdict.get("regressed", []))
    checks = verdict.get("checks", [])
    if regressed:
        what = "; ".join(_metric_summary(metric, checks) for metric in regressed)
        subject = f"[gfocal] REGRESSION {what} | {label} | run {run_id}"
    elif not verdict.get("passed"):
        subject = f"[gfocal] GATE FAILED (no baseline comparison possible) | {label} | run {run_id}"
    else:
        subject = f"[gfocal] OK | {label} | run {run_id}"
    subject = " ".join(subject.split())  # no CR/LF in a header

    named = (("Airflow run", run_url), ("Report", report_url), ("Trend page", trend_url))
    links = [(name, url) for name, url in named if url]
    text_parts = [format_verdict_table(verdict)]
    if verdict.get("baseline_runs"):
        text_parts.append("baseline runs: " + ", ".join(verdict["baseline_runs"]))
    if report:
        text_parts.append(f"Classes that changed most ({report.get('backend')} vs {report.get('against')}):")
        text_parts.append(_text_table(report_rows(report)))
    if links:
        text_parts.append("\n".join(f"{name}: {url}" for name, url in links))
    text = "\n\n".join(text_parts) + "\n"
    pictures = alert_pictures(report) if report and not verdict.get("passed") else ()
    return AlertContent(subject, text, _html_body(verdict, links, report, pictures), pictures)


def build_model_alert(
    verdict: Mapping[str, Any],
    *,
    run_url: str | None = None,
    trend_url: str | None = None,
    reports: Mapping[str, Mapping[str, Any]] | None = None,
) -> AlertContent:
    """The one alert of a models file entry's night (`gate.model_verdict`): the subject names the
    model and every failing variant with its metrics (and an expected failure that now passes); the
    body has each variant's checks and, per failing variant, its report's classes that changed most."""
    from gfocal_pipeline.gate import format_model_verdict, model_verdict_headline

    status = "OK" if verdict.get("passed") else "REGRESSION"
    if not verdict.get("failing") and verdict.get("now_passing"):
        status = "EXPECTED FAILURE PASSES"
    subject = f"[gfocal] {status} {model_verdict_headline(verdict)} | run {verdict.get('run_id', '')}"
    subject = " ".join(subject.split())
    links = [(name, url) for name, url in (("Airflow run", run_url), ("Trend page", trend_url)) if url]
    parts = [format_model_verdict(verdict)]
    for name, report in (reports or {}).items():
        parts.append(
            f"variant {name}: classes that changed most ({report.get('backend')} vs {report.get('against')}):"
        )
        parts.append(_text_table(report_rows(report)))
    if links:
        parts.append("\n".join(f"{name}: {url}" for name, url in links))
    text = "\n\n".join(parts) + "\n"
    esc = html.escape
    color = "#1a7f37" if verdict.get("passed") else "#cf222e"
    body = [f'<h2 style="color:{color}">{esc(subject)}</h2>']
    for name, variant in verdict.get("variants", {}).items():
        body += [f"<h3>variant {esc(name)}</h3>", _html_table(verdict_rows(variant), fail_column=5)]
        if name in (reports or {}):
            body += _report_html(reports[name], ())
    body += [f'<p><a href="{esc(url, quote=True)}">{esc(name)}</a></p>' for name, url in links]
    return AlertContent(subject, text, "<html><body>" + "".join(body) + "</body></html>", ())


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _html_table(rows: list[list[str]], fail_column: int | None = None) -> str:
    esc = html.escape
    cell = "border:1px solid #d0d7de;padding:4px 8px;text-align:left"
    head = "".join(f'<th style="{cell}">{esc(c)}</th>' for c in rows[0])
    body = []
    for row in rows[1:]:
        bad = fail_column is not None and row[fail_column] == "FAIL"
        style = cell + (";color:#cf222e;font-weight:bold" if bad else "")
        body.append("<tr>" + "".join(f'<td style="{style}">{esc(c)}</td>' for c in row) + "</tr>")
    return (
        f'<table style="border-collapse:collapse;font-family:monospace"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _report_html(report: Mapping[str, Any], pictures: tuple[tuple[str, str], ...]) -> list[str]:
    esc = html.escape
    parts = [
        f"<h3>Classes that changed most ({esc(str(report.get('backend')))} vs "
        f"{esc(str(report.get('against')))})</h3>",
        _html_table(report_rows(report)),
    ]
    if pictures:
        parts.append(
            "<h3>Images that disagree most</h3><p>ground truth green, reference blue dashed, device red</p>"
        )
        parts += [
            f'<img src="cid:{esc(cid, quote=True)}" alt="{esc(Path(path).stem)}" style="margin:4px">'
            for cid, path in pictures
        ]
    return parts


def _html_body(
    verdict: Mapping[str, Any],
    links: list[tuple[str, str]],
    report: Mapping[str, Any] | None = None,
    pictures: tuple[tuple[str, str], ...] = (),
) -> str:
    esc = html.escape
    rows = verdict_rows(verdict)
    status = "PASS" if verdict.get("passed") else "FAIL"
    color = "#1a7f37" if verdict.get("passed") else "#cf222e"
    table = _html_table(rows, fail_column=-1) if len(rows) > 1 else "<p>No checks were run.</p>"
    notes = [
        *verdict.get("notes", []),
        *(f"{c['name']}: {c['note']}" for c in verdict.get("checks", []) if c.get("note")),
    ]
    parts = [
        f'<h2 style="color:{color}">{status}: {esc(str(verdict.get("label", "")))}</h2>',
        f"<p>DAG <code>{esc(str(verdict.get('dag_id', '')))}</code>, "
        f"run <code>{esc(str(verdict.get('run_id', '')))}</code></p>",
        table,
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if verdict.get("baseline_runs"):
        parts.append(
            "<p>Baseline runs: "
            + ", ".join(f"<code>{esc(r)}</code>" for r in verdict["baseline_runs"])
            + "</p>"
        )
    if report:
        parts += _report_html(report, pictures)
    if links:
        parts.append(
            "<p>"
            + " | ".join(f'<a href="{esc(url, quote=True)}">{esc(name)}</a>' for name, url in links)
            + "</p>"
        )
    return "<!DOCTYPE html><html><body>" + "\n".join(parts) + "</body></html>\n"


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send: `use_ssl` for implicit TLS (port 465), `starttls` to upgrade plain SMTP."""

    host: str
    sender: str
    recipients: tuple[str, ...]
    port: int = 25
    starttls: bool = False
    use_ssl: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise AlertDeliveryError(f"SMTP host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise AlertDeliveryError(f"SMTP port must be an integer in 1..65535, got {self.port!r}")
        if not isinstance(self.sender, str) or "@" not in self.sender:
            raise AlertDeliveryError(f"SMTP sender must be an e-mail address, got {self.sender!r}")
        if isinstance(self.recipients, str) or not self.recipients:
            raise AlertDeliveryError(
                f"SMTP recipients must be a non-empty list of addresses, got {self.recipients!r}"
            )
        bad = [r for r in self.recipients if not isinstance(r, str) or "@" not in r]
        if bad:
            raise AlertDeliveryError(f"SMTP recipients {bad!r} are not e-mail addresses")
        if self.starttls and self.use_ssl:
            raise AlertDeliveryError("choose either starttls (port 587/25) or use_ssl (port 465), not both")
        if (self.user is None) != (self.password is None):
            raise AlertDeliveryError("SMTP user and password must be given together (or neither)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SmtpSettings:
        """Accepts `from`/`to` aliases; `to` may be a comma-separated string."""
        values = dict(data)
        if "from" in values:
            values["sender"] = values.pop("from")
        if "to" in values:
            values["recipients"] = values.pop("to")
        recipients = values.get("recipients")
        if isinstance(recipients, str):
            values["recipients"] = tuple(r.strip() for r in recipients.split(",") if r.strip())
        elif recipients is not None:
            values["recipients"] = tuple(recipients)
        try:
            return cls(**values)
        except TypeError as exc:
            raise AlertDeliveryError(f"bad SMTP settings {sorted(values)}: {exc}") from exc


def alert_message(content: AlertContent, sender: str, recipients: Sequence[str]) -> EmailMessage:
    """multipart/alternative: the text, and the HTML with its pictures as content-id parts (related)."""
    message = EmailMessage()
    message["Subject"] = content.subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
    message.set_content(content.text)
    message.add_alternative(content.html, subtype="html")
    html_part = message.get_payload()[-1]
    for cid, path in content.pictures:
        html_part.add_related(
            Path(path).read_bytes(), maintype="image", subtype="png", cid=f"<{cid}>", filename=Path(path).name
        )
    return message


def send_alert(content: AlertContent, settings: SmtpSettings) -> None:
    """Deliver one multipart (text + HTML) message, or raise AlertDeliveryError / SmtpConnectionError."""
    message = alert_message(content, settings.sender, settings.recipients)
    where = f"{settings.host}:{settings.port}"
    client_class = smtplib.SMTP_SSL if settings.use_ssl else smtplib.SMTP
    try:
        client = client_class(settings.host, settings.port, timeout=settings.timeout)
    except (OSError, smtplib.SMTPException) as exc:
        log.error("SMTP server %s refused or did not answer the connection: %s", where, exc)
        raise SmtpConnectionError(
            f"cannot connect to SMTP server {where} ({exc}); check the alert host/port settings and "
            "that the mail server is running (not retried: the alert content is in the task log)"
        ) from exc
    try:
        with client:
            if settings.starttls:
                client.starttls(context=ssl.create_default_context())
            if settings.user is not None:
                client.login(settings.user, settings.password or "")
            refused = client.send_message(message)
    except smtplib.SMTPAuthenticationError as exc:
        raise AlertDeliveryError(f"SMTP server {where} rejected user {settings.user!r}: {exc}") from exc
    except smtplib.SMTPResponseException as exc:
        temporary = 400 <= exc.smtp_code < 500
        raise AlertDeliveryError(
            f"SMTP server {where} answered {exc.smtp_code} {exc.smtp_error!r}", retryable=temporary
        ) from exc
    except smtplib.SMTPRecipientsRefused as exc:
        raise AlertDeliveryError(f"SMTP server {where} refused every recipient: {exc.recipients}") from exc
    except (OSError, smtplib.SMTPException) as exc:
        raise AlertDeliveryError(f"sending the alert through {where} failed: {exc}", retryable=True) from exc
    if refused:
        log.warning("SMTP server %s refused some recipients: %s", where, refused)
    log.info("alert %r sent through %s to %s", content.subject, where, ", ".join(settings.recipients))


def alert_on_failure(
    verdict: Mapping[str, Any],
    settings: SmtpSettings,
    *,
    run_url: str | None = None,
    trend_url: str | None = None,
    report: Mapping[str, Any] | None = None,
) -> bool:
    """Send the alert only when the verdict failed; returns whether a message was sent."""
    if verdict.get("passed"):
        log.info("gate passed for run %s: no alert", verdict.get("run_id"))
        return False
    send_alert(build_alert(verdict, run_url=run_url, trend_url=trend_url, report=report), settings)
    return True


def build_failure_alert(
    *,
    dag_id: str,
    run_id: str,
    what: str,
    error: str,
    run_url: str | None = None,
    trend_url: str | None = None,
) -> AlertContent:
    """Alert for a run that broke before (or instead of) a verdict: a failed task or a missed deadline."""
    subject = " ".join(f"[gfocal] FAILED {what} | {dag_id} | run {run_id}".split())
    links = [(name, url) for name, url in (("Airflow run", run_url), ("Trend page", trend_url)) if url]
    text = f"{what} failed in {dag_id}, run {run_id}:\n\n{error}\n"
    if links:
        text += "\n" + "\n".join(f"{name}: {url}" for name, url in links) + "\n"
    link_html = "".join(f'<p><a href="{html.escape(url)}">{html.escape(name)}</a></p>' for name, url in links)
    body = (
        f"<p><b>{html.escape(what)}</b> failed in {html.escape(dag_id)}, run {html.escape(run_id)}:</p>"
        f"<pre>{html.escape(error)}</pre>{link_html}"
    )
    return AlertContent(subject, text, body)
