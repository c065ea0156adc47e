"""docker-compose.yaml agrees with the code: queue, pool, DAG names, history DB (no Docker engine here)."""

from __future__ import annotations

import yaml
from conftest import ROOT

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_compose_uses_the_queue_and_pool_of_the_code() -> None:
    services = _compose()["services"]
    assert f"--queues {ASCEND_QUEUE}" in services["airflow-worker-ascend"]["command"]
    assert ASCEND_QUEUE not in services["airflow-worker"]["command"]
    init = " ".join(services["airflow-init"]["command"])
    assert f"airflow pools set {ASCEND_POOL} " in init


def test_compose_runs_celery_with_postgres_and_redis() -> None:
    compose = _compose()
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert "postgresql" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__GFOCAL__HISTORY_URL"].startswith("postgresql+psycopg://")
    assert {"postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-worker",
            "airflow-worker-ascend"} <= set(compose["services"])
    ascend_env = compose["services"]["airflow-worker-ascend"]["environment"]
    assert ascend_env["GFOCAL_CANN_SET_ENV"].endswith("set_env.sh")
