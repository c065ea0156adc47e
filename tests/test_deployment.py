"""docker-compose.yaml agrees with the code: queue, pool, DAG names, history DB (no Docker engine here)."""

from __future__ import annotations

import yaml
from support import ROOT

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
    assert {
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-worker",
        "airflow-worker-ascend",
    } <= set(compose["services"])
    ascend_env = compose["services"]["airflow-worker-ascend"]["environment"]
    assert ascend_env["GFOCAL_CANN_SET_ENV"].endswith("set_env.sh")


def test_every_service_mounts_the_one_shared_work_dir() -> None:
    compose = _compose()
    work_dir = compose["x-gfocal-common"]["environment"]["GFOCAL_WORK_DIR"]
    airflow = {name: s for name, s in compose["services"].items() if name.startswith("airflow-")}
    assert "airflow-worker-ascend" in airflow and len(airflow) >= 7
    for name, service in airflow.items():
        mounts = [v.split(":")[:2] for v in service["volumes"]]
        assert ["gfocal-data", work_dir] in mounts, name
        assert service["environment"]["GFOCAL_WORK_DIR"] == work_dir, name
    assert "gfocal-data" in compose["volumes"]


def test_compose_sets_the_async_db_url_and_distinct_worker_names() -> None:
    services = _compose()["services"]
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    names = [
        services[w]["command"].split("--celery-hostname ")[1].split()[0]
        for w in ("airflow-worker", "airflow-worker-ascend")
    ]
    assert len(set(names)) == 2


def test_the_image_installs_exactly_the_celery_extra() -> None:
    import re
    import tomllib

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.findall(r'"/opt/gfocal(\[[^\]]*\])?"', dockerfile) == ["[celery]"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    celery = extras["celery"]
    assert any(r.startswith("apache-airflow-providers-celery") for r in celery)
    assert any(r.startswith("celery[redis]") and "<5.7" in r for r in celery)  # 5.7.0 breaks the provider
    assert any(r.startswith("asyncpg") for r in celery)
