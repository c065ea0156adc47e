"""Alerts through the product's real path: gate/task failure -> GfocalAlertNotifier -> the Airflow SMTP
connection (the provider's SmtpHook) -> a real SMTP server (aiosmtpd) on loopback. The DAG runs under
`dag.test()`."""

from __future__ import annotations

import email
import email.policy
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from support import ROOT, SmtpInbox, free_port, load_dag_file, xcoms

from gfocal_pipeline.alerts import build_failure_alert
from gfocal_pipeline.history import ConfigKey, HistoryStore, RunRecord

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
DAG_ID = "gfocal_onnxruntime"
DAG_ID_ASCEND = "gfocal_ascend_nightly"
BASE_URL = "http://airflow.example.test/prefix"


@pytest.fixture
def inbox(airflow_db: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SmtpInbox]:
    box = SmtpInbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{controller.port}?disable_tls=true&disable_ssl=true"
    )
    monkeypatch.setenv("AIRFLOW__GFOCAL__ALERT_TO", "oncall@example.test")
    monkeypatch.setenv("AIRFLOW__GFOCAL__ALERT_FROM", "gfocal@example.test")
    monkeypatch.setenv("AIRFLOW__GFOCAL__BASE_URL", BASE_URL)
    monkeypatch.setenv("GFOCAL_HISTORY_URL", f"sqlite:///{tmp_path / 'history.sqlite'}")
    try:
        yield box
    finally:
        controller.stop()


def _run(tmp_path: Path, **conf) -> tuple:
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    module = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py")
    base = {"work_dir": str(tmp_path / "work"), "height": 128, "width": 160, "max_images": 3, "shard_size": 3}
    dag_run = module.dag.test(run_conf={**base, **conf})
    return dag_run, xcoms(DAG_ID, dag_run.run_id)


def _seed(url: str, like: dict, n: int, ap_shift: float, fps_factor: float) -> None:
    """`n` passing runs of the same configuration as `like`, just before it."""
    with HistoryStore(url) as store:
        for i in range(n):
            store.record(
                RunRecord(
                    dag_id=DAG_ID,
                    run_id=f"seeded__{i}",
                    config=ConfigKey.from_mapping(like["config"]),
                    stats={**like["stats"], "AP": like["stats"]["AP"] + ap_shift},
                    fps=like["fps"] * fps_factor,
                    finished_at=datetime.now(UTC) - timedelta(minutes=10 + i),
                    verdict="pass",
                )
            )


def _bodies(message: email.message.EmailMessage) -> str:
    return message.get_body(("html",)).get_content() + message.get_body(("plain", "html")).get_content()


def test_floor_regression_alerts_once(inbox: SmtpInbox, tmp_path: Path) -> None:
    dag_run, values = _run(tmp_path, min_ap=0.4)  # random weights cannot reach AP 0.4
    assert dag_run.state == "failed"
    assert "record" in values  # recorded before the gate failed
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert "REGRESSION" in message["Subject"] and "AP" in message["Subject"]
    assert message["To"] == "oncall@example.test"
    assert f"{BASE_URL}/dags/{DAG_ID}/runs/" in _bodies(message)
    with HistoryStore(os.environ["GFOCAL_HISTORY_URL"]) as store:
        assert store.count() == 1  # the row survives the failed gate


def test_baseline_regression_alerts_once_naming_ap_and_fps(inbox: SmtpInbox, tmp_path: Path) -> None:
    first, values = _run(tmp_path)
    assert first.state == "success" and values["gate"]["first_run"] is True and inbox.messages == []
    # four earlier passing nights that were 0.010 AP better and twice as fast: the baseline (median of
    # the last 5 passing runs) is AP+0.010 and 2x fps, so this unchanged model has regressed on both
    _seed(os.environ["GFOCAL_HISTORY_URL"], values["record"]["device"], 4, ap_shift=0.010, fps_factor=2.0)
    # fps by the tolerance alone: the first night (1x) is in the baseline window too, so its spread
    # would call a 2x drop noise (the noise rule is tested in tests/pipeline/test_gate.py)
    second, values = _run(tmp_path, fps_noise=0)
    assert second.state == "failed"
    verdict = xcoms_verdict(second.run_id)
    assert set(verdict["regressed"]) >= {"AP", "fps"}
    assert len(inbox.messages) == 1
    subject = inbox.messages[0]["Subject"]
    assert "REGRESSION" in subject and "AP" in subject and "fps" in subject
    body = _bodies(inbox.messages[0])
    assert "FAIL" in body and "baseline" in body.lower()


def test_run_within_tolerance_passes_silently(inbox: SmtpInbox, tmp_path: Path) -> None:
    first, values = _run(tmp_path)
    assert first.state == "success"
    # baseline AP 0.002 better (tolerance 0.003) and fps lower: within tolerance
    _seed(os.environ["GFOCAL_HISTORY_URL"], values["record"]["device"], 4, ap_shift=0.002, fps_factor=0.5)
    second, values = _run(tmp_path)
    assert second.state == "success" and values["gate"]["passed"] is True
    assert values["gate"]["first_run"] is False
    assert inbox.messages == []


def test_history_db_down_fails_loudly_and_alerts(
    inbox: SmtpInbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_HISTORY_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    dag_run, values = _run(tmp_path)
    assert dag_run.state == "failed" and "record" not in values and "gate" not in values
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert "FAILED task record" in message["Subject"]
    assert "127.0.0.1:1" in _bodies(message)  # the error names the unreachable database


def test_deadline_alert_names_the_run(inbox: SmtpInbox) -> None:
    from operators.alerting import deadline_missed

    run_id = "scheduled__2026-11-26T02:00:00+00:00"
    # Airflow hands the deadline callback the run as a dict
    from airflow.api_fastapi.core_api.datamodels.dag_run import DAGRunResponse

    # Airflow's Deadline.handle_miss passes DAGRunResponse(...).model_dump(mode="json") as dag_run
    dumped = set(DAGRunResponse.model_json_schema(mode="serialization")["properties"])
    assert {"dag_id", "dag_run_id"} <= dumped and "run_id" not in dumped
    deadline_missed(
        {"dag_run": {"dag_id": "gfocal_ascend_nightly", "dag_run_id": run_id}},
        dag_id="gfocal_ascend_nightly",
        interval="6:00:00",
    )
    assert len(inbox.messages) == 1
    assert inbox.messages[0]["Subject"] == f"[gfocal] FAILED deadline | gfocal_ascend_nightly | run {run_id}"
    assert "6:00:00" in _bodies(inbox.messages[0])


def test_refused_smtp_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from operators.alerting import deliver

    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_DEFAULT",
        f"smtp://127.0.0.1:{free_port()}?disable_tls=true&disable_ssl=true&timeout=5&retry_limit=1",
    )
    monkeypatch.setenv("AIRFLOW__GFOCAL__ALERT_TO", "oncall@example.test")
    content = build_failure_alert(dag_id=DAG_ID, run_id="r1", what="task export", error="boom")
    with caplog.at_level(logging.ERROR, logger="operators.alerting"):
        assert deliver(content, {}) == []  # nothing delivered, nothing raised
    assert any("smtp" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


def xcoms_verdict(run_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=DAG_ID, run_id=run_id, task_id="gate", key="verdict")
            .one()
        )
        return row.value


CHAIR = 56  # a class the demo checkpoint is confident about (DEMO_CONFIDENT_CLASSES), index into the 80


def test_a_device_that_loses_a_class_gets_a_report_and_an_alert_with_pictures(
    inbox: SmtpInbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ascend nightly on the emulated toolkit, whose NPU never finds chairs (it zeroes that class's
    scores before its NMS): the report's first class is chair, and the failed gate's e-mail has text and
    HTML parts and the report's pictures as content-id parts that the HTML cites."""
    from airflow.models.pool import Pool
    from emulators.toolkit import make_toolkit

    from gfocal_pipeline.constants import ASCEND_POOL
    from gfocal_pipeline.models.gfocalv2.checkpoint import DEMO_CONFIDENT_CLASSES
    from gfocal_pipeline.report import load_report

    assert CHAIR in DEMO_CONFIDENT_CLASSES
    monkeypatch.setenv("AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS", "0")  # dag.test() cannot run deadlines
    monkeypatch.setenv("GFOCAL_EMULATOR_DROP_CLASS", str(CHAIR))
    # random weights score about 0.3 at best: count the report's boxes from 0.05 (its setting)
    monkeypatch.setenv("AIRFLOW__GFOCAL__REPORT_SCORE_THR", "0.05")
    Pool.create_or_update_pool(ASCEND_POOL, slots=1, description="Ascend NPUs", include_deferred=False)
    toolkit = make_toolkit(tmp_path / "cann")
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    dag = load_dag_file(ROOT / "dags" / "gfocal_ascend_nightly.py").dag
    conf = {
        "work_dir": str(tmp_path / "work"),
        **{"height": 128, "width": 160, "max_images": 6, "shard_size": 6},
        "cann_set_env": str(toolkit.set_env),
        "min_ap": 0.4,  # random weights: the gate fails, so the alert goes out
    }
    dag_run = dag.test(run_conf=conf)
    assert dag_run.state == "failed"
    values = xcoms(dag.dag_id, dag_run.run_id)
    report = load_report(values["prepare"]["run_dir"])
    assert report is not None and report["against"] == "reference"
    first = report["per_class"][0]
    assert first["name"] == "chair" and first["boxes"] == 0 and first["boxes_reference"] > 0
    assert report["images"][0]["missed"] > 0 and report["images"][0].get("picture")

    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert "REGRESSION" in message["Subject"]
    assert message.get_body(("plain",)) is not None and "chair" in message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    cited = set(re.findall(r'src="cid:([^"]+)"', html))
    pictures = [part for part in message.walk() if part.get_content_type() == "image/png"]
    assert cited and len(pictures) == len(cited)
    assert {part["Content-ID"].strip("<>") for part in pictures} == cited
    assert f"{BASE_URL}/gfocal/runs/{DAG_ID_ASCEND}/" in html  # the report page link
