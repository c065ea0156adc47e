"""Bad inputs at the DAG level: a run's conf with a key that is none of the DAG's params (a typo) fails
in the first task, naming the key and the nearest param, before any work (a valid conf runs as before:
the DAG tests); an image whose header claims more pixels than the budget fails preprocess naming it,
before anything is decoded."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ROOT, image_claiming, load_dag_file

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def _states(dag_id: str, run_id: str) -> dict[str, str | None]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run_id).all()
        return {row.task_id: (str(row.state) if row.state else None) for row in rows}


def _log_of_prepare(tmp_dag_run: object) -> str:
    from airflow.configuration import conf

    logs = Path(conf.get("logging", "base_log_folder"))
    found = list(logs.glob(f"dag_id={tmp_dag_run.dag_id}/run_id={tmp_dag_run.run_id}/task_id=prepare/*.log"))
    return "\n".join(path.read_text() for path in found)


@pytest.mark.parametrize("dag_file", ["gfocal_onnxruntime.py", "gfocal_ascend_nightly.py"])
def test_a_misspelt_key_fails_prepare_naming_it(
    dag_file: str,
    airflow_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    # Airflow 3.3's dag.test() cannot run a DAG with a DeadlineAlert (see test_dag_ascend_nightly.py)
    monkeypatch.setenv("AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS", "0")
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    dag = load_dag_file(ROOT / "dags" / dag_file).dag
    conf = {"work_dir": str(tmp_path / "work"), "hieght": 64, "width": 64, "max_images": 2, "shardsize": 1}
    dag_run = dag.test(run_conf=conf)
    assert dag_run.state == "failed"
    states = _states(dag.dag_id, dag_run.run_id)
    assert states.pop("prepare") == "failed"
    ran = {task: state for task, state in states.items() if state not in (None, "upstream_failed", "skipped")}
    assert set(ran) <= {"retention"}, ran  # retention (all_done) only cleans up; nothing else ran
    output = capfd.readouterr()
    text = output.out + output.err + _log_of_prepare(dag_run)
    assert "unknown run parameter(s) ['hieght', 'shardsize']" in text, text[-3000:]
    assert "'hieght' (did you mean 'height'?)" in text and "'shardsize' (did you mean 'shard_size'?)" in text
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("manifest.json"))


def test_an_image_over_the_pixel_budget_fails_preprocess_naming_it(
    airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import json

    from gfocal_pipeline.demo_data import make_demo_coco

    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_RETRIES", "0")  # the same image fails every retry
    coco = make_demo_coco(tmp_path / "coco", num_images=3)
    first = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"][0]
    bomb = coco / "val2017" / first["file_name"]
    bomb.write_bytes(image_claiming(20000, 20000))
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    dag = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py").dag
    conf = {"work_dir": str(tmp_path / "work"), "coco_root": str(coco), "height": 64, "width": 64}
    dag_run = dag.test(run_conf=conf)
    assert dag_run.state == "failed"
    states = _states(dag.dag_id, dag_run.run_id)
    assert (states["prepare"], states["preprocess"]) == ("success", "failed")
    assert states["infer"] in (None, "upstream_failed")
    output = capfd.readouterr()
    text = output.out + output.err
    assert f"{bomb} (its header claims 20000x20000 pixels" in text and "pixel budget" in text, text[-3000:]
