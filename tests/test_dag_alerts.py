"""A failing gate inside the real DAG sends exactly one alert to a real SMTP server on loopback."""

from __future__ import annotations

import email
import email.policy
import os
import socket
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from conftest import ROOT, load_dag_file, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_floor_regression_alerts_once(
    airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=_free_port())
    controller.start()
    monkeypatch.setitem(
        os.environ,
        "AIRFLOW_CONN_SMTP_DEFAULT",
        f"smtp://127.0.0.1:{controller.port}?disable_tls=true&disable_ssl=true",
    )
    monkeypatch.setitem(os.environ, "AIRFLOW__GFOCAL__ALERT_TO", "oncall@example.test")
    monkeypatch.setitem(os.environ, "AIRFLOW__GFOCAL__ALERT_FROM", "gfocal@example.test")
    monkeypatch.setitem(os.environ, "AIRFLOW__GFOCAL__BASE_URL", "http://airflow.example.test/prefix")
    monkeypatch.setitem(os.environ, "GFOCAL_HISTORY_URL", f"sqlite:///{tmp_path / 'history.sqlite'}")
    try:
        load_dag_file(ROOT / "dags" / "gfocal_factory.py")
        module = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py")
        conf = {
            "work_dir": str(tmp_path / "work"),
            "height": 128,
            "width": 160,
            "max_images": 3,
            "shard_size": 3,
            "min_ap": 0.4,
        }  # random weights cannot reach AP 0.4
        dag_run = module.dag.test(run_conf=conf)
    finally:
        controller.stop()
    assert dag_run.state == "failed"
    values = xcoms("gfocal_onnxruntime", dag_run.run_id)
    assert "record" in values  # recorded before the gate failed
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert "REGRESSION" in message["Subject"] and "AP" in message["Subject"]
    assert message["To"] == "oncall@example.test"
    html = message.get_body(("html",)).get_content()
    assert "min_ap" in html or "AP" in html
    assert "http://airflow.example.test/prefix/dags/gfocal_onnxruntime/runs/" in html

    from gfocal_pipeline.history import HistoryStore

    with HistoryStore(os.environ["GFOCAL_HISTORY_URL"]) as store:
        assert store.count() == 1  # the row survives the failed gate
