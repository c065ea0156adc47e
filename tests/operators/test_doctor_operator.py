"""DoctorOperator through `execute()`: the URLs come from Airflow's configuration and connections, a FAIL
fails the task naming the line and its fix. Real components: the emulated toolkit, the machine's
Postgres and Redis, an SMTP server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulators.toolkit import Toolkit, make_toolkit
from support import closed_port, smtp_server

from gfocal_pipeline.doctor import DoctorFailed
from gfocal_pipeline.errors import ConfigError
from operators import DoctorOperator

POSTGRES = os.environ.get("GFOCAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("GFOCAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    return make_toolkit(tmp_path / "cann")


@pytest.fixture
def deployment(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A Celery deployment's settings as the worker sees them; yields the SMTP server's port."""
    for name in [k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__GFOCAL__"))]:
        monkeypatch.delenv(name)
    with smtp_server() as (port, _):
        monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", POSTGRES)
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
        monkeypatch.setenv("AIRFLOW__CELERY__BROKER_URL", REDIS)
        monkeypatch.setenv("AIRFLOW__GFOCAL__HISTORY_URL", POSTGRES)
        monkeypatch.setenv(
            "AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{port}?disable_tls=true&disable_ssl=true"
        )
        yield port


def test_a_healthy_worker(kit: Toolkit, tmp_path: Path, deployment: int) -> None:
    op = DoctorOperator(task_id="doctor", set_env=str(kit.set_env), work_dir=str(tmp_path), images="10")
    op.dtype = "None"  # a template of an unset param renders "None": the default (float32)
    xcom = op.execute(context={})
    assert xcom["ready"] is True
    statuses = {check["check"]: check["status"] for check in xcom["checks"]}
    assert len(statuses) == 19 and set(statuses.values()) == {"OK"}, xcom
    details = {check["check"]: check["detail"] for check in xcom["checks"]}
    assert details["broker"].startswith(f"{REDIS} answered PING")
    assert f"127.0.0.1:{deployment} (plain, from the Airflow connection 'smtp_default')" in details["smtp"]
    assert details["disk_space"].endswith(
        "images at 800x1216 float32 needs about 2.1 GiB (inputs 0.1 + outputs 0.0 + models 2.0)"
    )


def test_a_fail_fails_the_task(
    kit: Toolkit, tmp_path: Path, deployment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = closed_port()
    monkeypatch.setenv("AIRFLOW__CELERY__BROKER_URL", f"redis://127.0.0.1:{down}/0")
    op = DoctorOperator(task_id="doctor", set_env=str(kit.set_env), only=["broker", "smtp", "cann"])
    with pytest.raises(DoctorFailed) as failed:
        op.execute(context={})
    message = str(failed.value)
    assert message.startswith(
        "1 check(s) failed (broker): this host cannot run a night until the FAIL lines:"
    )
    assert f"FAIL broker: cannot use redis://127.0.0.1:{down}/0: Connection refused; check that" in message


def test_what_is_not_configured_is_skipped(
    kit: Toolkit, tmp_path: Path, deployment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_DEFAULT")
    op = DoctorOperator(task_id="doctor", only=["broker", "smtp"])
    lines = {check["check"]: check for check in op.execute(context={})["checks"]}
    assert (
        lines["broker"]["status"] == "SKIP"
        and lines["broker"]["detail"] == "executor LocalExecutor: no Celery broker"
    )
    assert lines["smtp"]["status"] == "SKIP"
    assert lines["smtp"]["detail"].startswith("the Airflow connection 'smtp_default' is not defined")
    monkeypatch.setenv("AIRFLOW__GFOCAL__ALERT_CHANNELS", "slack")
    lines = {check["check"]: check for check in op.execute(context={})["checks"]}
    assert lines["smtp"]["detail"] == "smtp is not an alert channel (slack)"


def test_bad_arguments(tmp_path: Path, deployment: int) -> None:
    with pytest.raises(
        ConfigError, match=r"DoctorOperator\('doctor'\) images 'many': expected an integer >= 1"
    ):
        DoctorOperator(task_id="doctor", images="many", only=["python"]).execute(context={})
    with pytest.raises(ConfigError, match=r"doctor tool 'ais-bench': expected one of msame, ais_bench"):
        DoctorOperator(task_id="doctor", tool="ais-bench", only=["python"]).execute(context={})
