"""Both DAGs' crash safety, read from the built DAGs (no run): retries with backoff on the idempotent
tasks, none on record and gate, and an execution_timeout on every task, sized for the form's defaults."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
from support import ROOT, load_dag_file

from gfocal_pipeline.errors import ConfigError
from operators.settings import load_settings
from operators.timeouts import sized_timeout

DAGS = ("gfocal_onnxruntime.py", "gfocal_ascend_nightly.py")
RUN_ONCE = {"record", "gate"}
KIND = {"export_portable": "export", "evaluate_reference": "evaluate"}


def _load(name: str) -> Any:
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    return load_dag_file(ROOT / "dags" / name).dag


@pytest.fixture(autouse=True)
def no_gfocal_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AIRFLOW__GFOCAL__")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("name", DAGS)
def test_idempotent_tasks_retry_with_backoff_record_and_gate_never(name: str) -> None:
    dag = _load(name)
    retry = load_settings().retry_args()
    for task in dag.tasks:
        if task.task_id in RUN_ONCE:
            assert task.retries == 0, task.task_id
            continue
        assert task.retries == retry["retries"] == 2, task.task_id
        assert task.retry_exponential_backoff == 2.0, task.task_id
        assert task.retry_delay == retry["retry_delay"] and task.max_retry_delay == retry["max_retry_delay"]


# an infer task of the default form (shard_size empty, 5,000 images at 800x1216, one device slot):
# ONNX Runtime on a CPU (2 s per image) gets 50 images per task, the NPU (29 ms) the whole set
DEFAULT_SHARD = {"gfocal_onnxruntime.py": 50, "gfocal_ascend_nightly.py": 5000}


@pytest.mark.parametrize("name", DAGS)
def test_every_task_has_a_timeout_sized_for_the_form_defaults(name: str) -> None:
    dag = _load(name)
    assert dag.params["shard_size"] is None and dag.params["max_images"] is None  # the demo form
    shard = DEFAULT_SHARD[name]
    for task in dag.tasks:
        kind = KIND.get(task.task_id, task.task_id)
        images = shard if kind.startswith("infer") else None
        assert task.execution_timeout == sized_timeout(kind, images), task.task_id
        assert task.execution_timeout >= timedelta(minutes=10)


def test_settings_reach_every_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_RETRIES", "5")
    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_TIMEOUT_MINUTES", "convert=7")
    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_TIMEOUT_SCALE", "0.5")
    dag = _load("gfocal_ascend_nightly.py")
    tasks = {task.task_id: task for task in dag.tasks}
    assert {t.retries for i, t in tasks.items() if i not in RUN_ONCE} == {5}
    assert tasks["record"].retries == tasks["gate"].retries == 0
    assert tasks["convert"].execution_timeout == timedelta(minutes=7)
    assert tasks["summary"].execution_timeout == timedelta(minutes=5)


def test_the_nightly_starts_with_the_doctor_when_the_setting_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "doctor" not in _load("gfocal_ascend_nightly.py").task_ids  # default: off
    monkeypatch.setenv("AIRFLOW__GFOCAL__NIGHTLY_DOCTOR", "true")
    tasks = _load("gfocal_ascend_nightly.py").task_dict
    doctor = tasks["doctor"]
    assert (doctor.queue, doctor.retries, doctor.upstream_task_ids) == ("ascend", 0, set())
    assert tasks["prepare"].upstream_task_ids == {"doctor"}
    assert doctor.execution_timeout == timedelta(minutes=10)
    assert "doctor" not in _load("gfocal_onnxruntime.py").task_ids  # no device queue, no doctor
    monkeypatch.setenv("AIRFLOW__GFOCAL__NIGHTLY_DOCTOR", "sometimes")
    with pytest.raises(ConfigError, match=r"\[gfocal\] nightly_doctor = 'sometimes': expected true or false"):
        _load("gfocal_ascend_nightly.py")
