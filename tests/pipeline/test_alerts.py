"""Alerts delivered to a real SMTP server (aiosmtpd) on loopback, parsed and checked.

The acceptance scenario runs the whole record -> gate -> alert path on SQLite and on Postgres.
"""

from __future__ import annotations

import email
import email.policy
import logging
import socket
from datetime import UTC, datetime, timedelta

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from test_history import store  # noqa: F401  (SQLite + Postgres fixture)

from gfocal_pipeline.alerts import (
    AlertDeliveryError,
    SmtpConnectionError,
    SmtpSettings,
    airflow_run_url,
    alert_on_failure,
    build_alert,
    build_failure_alert,
    send_alert,
    trend_page_url,
)
from gfocal_pipeline.gate import GateThresholds, evaluate, run_gate
from gfocal_pipeline.history import ConfigKey, HistoryError, HistoryStore, RunRecord

CONFIG = ConfigKey(
    "gfocal_r50_fpn_1x", "onnxruntime", "cpu", "fp32", 1, "mmdet", "ann:0123456789abcdef+img:fedcba9876543210"
)
T0 = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
THRESHOLDS = GateThresholds(
    min_ap=0.30, min_fps=10.0, ap_tolerance=0.003, fps_tolerance=0.05, baseline_runs=5
)
BASE_URL = "http://airflow.example:8080/prefix"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Inbox:
    """aiosmtpd handler keeping every accepted message."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = auth_data.login == b"alerts" and auth_data.password == b"pw"
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself


@pytest.fixture
def smtp_server():
    inbox = Inbox()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=free_port(), authenticator=_authenticator, auth_require_tls=False
    )
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


def settings_for(controller, **kw) -> SmtpSettings:
    return SmtpSettings(
        host=controller.hostname,
        port=controller.port,
        sender="gfocal@ci.example",
        recipients=("team@ci.example", "lead@ci.example"),
        timeout=10.0,
        **kw,
    )


def rec(run_id: str, ap: float, fps: float, day: int) -> RunRecord:
    return RunRecord(
        dag_id="gfocal_onnxruntime",
        run_id=run_id,
        config=CONFIG,
        stats={"AP": ap, "AP50": 0.58},
        fps=fps,
        finished_at=T0 + timedelta(days=day),
        latency_ms={"p50": 1000 / fps},
    )


def bodies(message) -> tuple[str, str]:
    return (
        message.get_body(preferencelist=("plain",)).get_content(),
        message.get_body(preferencelist=("html",)).get_content(),
    )


def test_regressed_run_fails_and_sends_one_alert_naming_both_metrics(store, smtp_server):  # noqa: F811
    controller, inbox = smtp_server
    settings = settings_for(controller)
    for day, (ap, fps) in enumerate(
        [(0.401, 101.0), (0.399, 99.0), (0.400, 100.0), (0.402, 98.0), (0.400, 102.0)]
    ):
        run = rec(f"scheduled__good{day}", ap, fps, day)
        store.record(run)
        verdict = run_gate(store, run, THRESHOLDS)
        assert verdict["passed"]
        assert not alert_on_failure(verdict, settings)
    assert inbox.messages == []

    # baseline medians: AP 0.400, fps 100.0 -> this run is AP -0.010, fps -20 %
    regressed = rec("scheduled__bad+1", 0.390, 80.0, 10)
    store.record(regressed)
    verdict = run_gate(store, regressed, THRESHOLDS, fps_windows=[80.5, 79.5, 80.0])
    assert not verdict["passed"] and verdict["regressed"] == ["AP", "fps"]
    run_url = airflow_run_url(BASE_URL, regressed.dag_id, regressed.run_id)
    assert alert_on_failure(verdict, settings, run_url=run_url, trend_url=trend_page_url(BASE_URL))

    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert sorted(inbox.envelopes[0].rcpt_tos) == ["lead@ci.example", "team@ci.example"]
    subject = message["Subject"]
    assert "AP -0.0100" in subject and "fps -20.0%" in subject and "scheduled__bad+1" in subject
    text, html = bodies(message)
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["AP vs baseline"].split()[-1] == "FAIL" and "0.4000" in rows["AP vs baseline"]
    assert rows["fps vs baseline"].split()[-1] == "FAIL" and "100.00" in rows["fps vs baseline"]
    assert rows["AP floor"].split()[-1] == "ok"
    assert "http://airflow.example:8080/prefix/dags/gfocal_onnxruntime/runs/scheduled__bad%2B1" in text
    assert "http://airflow.example:8080/prefix/gfocal/" in text
    assert html.count("<tr>") == 5 and html.count(">FAIL<") == 2
    assert 'href="http://airflow.example:8080/prefix/dags/gfocal_onnxruntime/runs/scheduled__bad%2B1"' in html

    # a later run within tolerance (AP -0.002, fps -3 %) passes and sends nothing
    fine = rec("scheduled__fine", 0.398, 97.0, 11)
    store.record(fine)
    verdict = run_gate(store, fine, THRESHOLDS)
    assert verdict["passed"], verdict
    assert not alert_on_failure(verdict, settings)
    assert len(inbox.messages) == 1
    assert store.count() == 7


def test_login_is_used_when_user_and_password_are_given(smtp_server):
    controller, inbox = smtp_server
    verdict = evaluate(rec("r", 0.2, 50.0, 0), [], THRESHOLDS)
    send_alert(build_alert(verdict), settings_for(controller, user="alerts", password="pw"))
    assert len(inbox.messages) == 1 and "AP 0.2000 below floor 0.3000" in inbox.messages[0]["Subject"]
    with pytest.raises(AlertDeliveryError, match="rejected user 'alerts'") as info:
        send_alert(build_alert(verdict), settings_for(controller, user="alerts", password="wrong"))
    assert not isinstance(info.value, SmtpConnectionError)


def test_refused_connection_is_a_logged_non_retryable_error(caplog):
    port = free_port()  # nothing listens there any more
    settings = SmtpSettings(host="127.0.0.1", port=port, sender="a@b.c", recipients=("d@e.f",), timeout=5.0)
    content = build_alert(evaluate(rec("r", 0.2, 50.0, 0), [], THRESHOLDS))
    with (
        caplog.at_level(logging.ERROR, logger="gfocal_pipeline.alerts"),
        pytest.raises(SmtpConnectionError) as info,
    ):
        send_alert(content, settings)
    assert info.value.retryable is False
    assert f"127.0.0.1:{port}" in str(info.value)
    assert any(f"127.0.0.1:{port}" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


def test_unreachable_history_is_loud_but_alert_content_is_still_built():
    down = HistoryStore("postgresql+psycopg://postgres@127.0.0.1:1/test")
    run = rec("r-db-down", 0.41, 100.0, 0)
    with pytest.raises(HistoryError) as info:
        down.record(run)
    # the gate task fails with that error; its failure alert names the task and the database
    content = build_failure_alert(
        dag_id=run.dag_id, run_id=run.run_id, what="task gate", error=str(info.value)
    )
    subject, text, html = content.subject, content.text, content.html
    assert "r-db-down" in subject and "gate" in subject
    assert "127.0.0.1:1" in text and "127.0.0.1:1" in html


def test_passing_verdict_builds_an_ok_subject_and_html_is_escaped():
    run = RunRecord("gfocal_onnxruntime", "<script>x</script>", CONFIG, {"AP": 0.41}, fps=100.0)
    content = build_alert(evaluate(run, [], THRESHOLDS), run_url='http://x/"><b>')
    subject, html = content.subject, content.html
    assert subject.startswith("[gfocal] OK")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="http://x/&quot;&gt;&lt;b&gt;"' in html


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"host": "h", "from": "me", "to": "a@b"}, "sender must be an e-mail address"),
        ({"host": "h", "from": "me@x", "to": ""}, "recipients must be a non-empty list"),
        ({"host": "h", "from": "me@x", "to": "a@b", "port": 70000}, "port must be an integer"),
        ({"host": "h", "from": "me@x", "to": "a@b", "user": "u"}, "user and password must be given together"),
        ({"host": "h", "from": "me@x", "to": "a@b", "starttls": True, "use_ssl": True}, "either starttls"),
        ({"host": "h", "from": "me@x", "to": "a@b", "tls": True}, "bad SMTP settings"),
    ],
)
def test_malformed_smtp_settings_are_rejected(values, expected):
    with pytest.raises(AlertDeliveryError, match=expected):
        SmtpSettings.from_mapping(values)


def test_smtp_settings_accept_comma_separated_recipients():
    settings = SmtpSettings.from_mapping({"host": "h", "from": "me@x", "to": "a@b, c@d", "port": 587})
    assert settings.recipients == ("a@b", "c@d") and settings.sender == "me@x"
    assert "password" not in repr(SmtpSettings("h", "me@x", ("a@b",), user="u", password="secret"))
