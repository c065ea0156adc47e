"""`gfocal_ascend_nightly` end to end under `dag.test()` with the CANN tool emulators (no NPU here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from emulators.toolkit import make_toolkit
from support import ROOT, load_dag_file, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def nightly(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from airflow.models.pool import Pool

    # Airflow 3.3's dag.test() cannot run a DAG with a DeadlineAlert (it looks the alerts up by
    # id before they are stored); the deadline itself is checked in test_deadline_is_configured
    os.environ["AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS"] = "0"

    from gfocal_pipeline.constants import ASCEND_POOL

    Pool.create_or_update_pool(ASCEND_POOL, slots=1, description="Ascend NPUs", include_deferred=False)
    toolkit = make_toolkit(tmp_path_factory.mktemp("cann"))
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    module = load_dag_file(ROOT / "dags" / "gfocal_ascend_nightly.py")
    dag = module.dag
    work = tmp_path_factory.mktemp("work")
    conf = {
        "work_dir": str(work),
        "height": 128,
        "width": 160,
        "max_images": 5,
        "shard_size": 3,
        "cann_set_env": str(toolkit.set_env),
        "outfmt": "TXT",
        # the emulators' fps is this loaded CI machine's wall clock, not an NPU's: the second night's
        # gate must not fail on timing noise (fps regressions are tested in tests/pipeline/test_gate.py)
        "fps_tolerance": 0.9,
    }
    first = dag.test(run_conf=conf)
    assert first.state == "success"
    os.environ.pop("AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS")
    calls_after_first = toolkit.call_log.read_text().count('"tool": "atc"')
    second = dag.test(run_conf=conf)
    assert second.state == "success"
    return {
        "conf": conf,
        "dag": dag,
        "first": xcoms(dag.dag_id, first.run_id),
        "second": xcoms(dag.dag_id, second.run_id),
        "manifests": [xcoms(dag.dag_id, run.run_id, "manifest")["preprocess"] for run in (first, second)],
        "atc_calls": (calls_after_first, toolkit.call_log.read_text().count('"tool": "atc"')),
    }


def test_shape_of_the_nightly(nightly: dict) -> None:
    dag = nightly["dag"]
    assert dag.schedule == "0 2 * * *" or str(dag.timetable.summary) == "0 2 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    for task_id in ("convert", "infer"):
        task = dag.get_task(task_id)
        assert task.queue == "ascend" and task.pool == "ascend_npu"
    assert dag.get_task("infer_reference").queue != "ascend"
    assert {"tool", "device", "soc_version", "precision_mode", "cann_set_env"} <= set(dag.params)


def test_nightly_reports_pytorch_and_npu_ap(nightly: dict) -> None:
    values = nightly["first"]
    expected = {
        "prepare",
        "export",
        "export_portable",
        "convert",
        "preprocess",
        "evaluate",
        "infer_reference[0]",
        "infer_reference[1]",
        "infer[0]",
        "infer[1]",
        "evaluate_reference",
        "summary",
        "record",
        "gate",
        "retention",
    }
    assert set(values) == expected
    convert = values["convert"]
    assert convert["cached"] is False and convert["soc_version"] == "Ascend310P3"
    assert convert["om_path"].endswith(".om") and len(convert["om_sha256"]) == 64
    for key in ("infer[0]", "infer[1]"):
        infer = values[key]
        assert infer["backend"] == "msame" and infer["fps"] > 0 and "mean" in infer["latency_ms"]
    summary = values["summary"]
    assert summary["AP_delta"] == pytest.approx(summary["AP_npu"] - summary["AP_pytorch"])
    assert summary["backends"]["device"]["backend"] == "msame"
    assert summary["backends"]["reference"]["backend"] == "torch"
    assert summary["backends"]["device"]["fps"] > 0 and summary["backends"]["device"]["latency_ms"]
    # the converted model sees what PyTorch sees: the demo's confident classes yield detections
    assert summary["backends"]["device"]["detections"] > 0
    assert abs(summary["AP_delta"]) < 0.05
    record = values["record"]
    assert record["device"]["ap_delta"] == pytest.approx(summary["AP_delta"])
    assert record["device"]["om_sha256"] == convert["om_sha256"]
    assert json.dumps(values)  # every XCom is plain JSON


def test_second_night_reuses_the_cached_om(nightly: dict) -> None:
    assert nightly["second"]["convert"]["cached"] is True
    first_calls, second_calls = nightly["atc_calls"]
    assert first_calls == 1 and second_calls == 1  # atc was not called again
    assert nightly["second"]["gate"]["first_run"] is False  # the first night is now the baseline
    assert os.path.isfile(nightly["second"]["convert"]["om_path"])


def test_second_night_reuses_inputs_onnx_and_reference(nightly: dict) -> None:
    first, second = nightly["first"], nightly["second"]
    built, reused = nightly["manifests"]
    assert built["cached"] is False and reused["cached"] is True
    assert built["cache_key"] == reused["cache_key"] and built["dataset_id"] == reused["dataset_id"]
    for task in ("export", "export_portable", "infer_reference[0]", "infer_reference[1]"):
        assert first[task]["cached"] is False, task
        assert second[task]["cached"] is True, task
        assert first[task]["cache_key"] == second[task]["cache_key"], task
    assert second["export"]["onnx_sha256"] == first["export"]["onnx_sha256"]
    # the reference's detections are the first night's, so AP_pytorch is the same number
    assert second["summary"]["AP_pytorch"] == first["summary"]["AP_pytorch"]
    assert second["summary"]["cache"]["reference"] == {"reused": 2, "built": 0}
    assert second["summary"]["cache"]["inputs"] == {"reused": 1, "built": 0}


def test_run_directory_holds_only_small_results(nightly: dict) -> None:
    run_dir = Path(nightly["second"]["prepare"]["run_dir"])
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert not (run_dir / "inputs").exists()
    assert not [path for path in files if path.suffix in (".onnx", ".bin") or path.name == "candidates.npz"]
    detections = [path for path in files if path.name == "outputs.npz"]
    assert detections and all(path.stat().st_size < 20_000 * 3 for path in detections)  # <= 3 images each


def test_deadline_is_configured(airflow_db: Path, dags_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS", "5")
    copy = dags_dir / "gfocal_nightly_deadline.py"
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    try:
        module = load_dag_file(ROOT / "dags" / "gfocal_ascend_nightly.py", name=copy.name)
    finally:
        copy.unlink()  # one file per dag_id in the test bundle
    (alert,) = module.dag.deadline if isinstance(module.dag.deadline, list) else [module.dag.deadline]
    assert alert.interval.total_seconds() == 5 * 3600
    assert "operators.alerting.deadline_missed" in str(alert.callback.path)


def test_nightly_form_rejects_bad_values(nightly: dict) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    dag = nightly["dag"]
    for bad in (
        {"tool": "benchmark"},
        {"device": 256},
        {"soc_version": "310P3"},
        {"cann_set_env": "/usr/local/Ascend/set_env.sh; rm -rf /"},
        {"outfmt": "NPY"},
    ):
        with pytest.raises(ParamValidationError):
            dag.test(run_conf=bad)


def test_ais_bench_runs_batches_on_a_dynamic_batch_om(nightly: dict) -> None:
    dag = nightly["dag"]
    run = dag.test(run_conf={**nightly["conf"], "tool": "ais_bench", "batch_size": 2, "min_ap": None})
    assert run.state == "success"
    values = xcoms(dag.dag_id, run.run_id)
    assert "--dynamic_batch_size=1,2" in values["convert"]["atc_args"]
    assert {values["infer[0]"]["batch_size"], values["infer[1]"]["batch_size"]} == {2}
    assert values["summary"]["backends"]["device"]["backend"] == "ais_bench"
    assert values["summary"]["backends"]["device"]["images"] == 5


def test_msame_with_batch_above_one_is_refused_at_prepare(nightly: dict) -> None:
    dag = nightly["dag"]
    run = dag.test(run_conf={**nightly["conf"], "tool": "msame", "batch_size": 2})
    assert run.state == "failed"
    assert "prepare" not in xcoms(dag.dag_id, run.run_id)
