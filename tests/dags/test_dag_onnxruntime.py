"""`gfocal_onnxruntime` end to end under `dag.test()` on a migrated SQLite metadata DB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ROOT, load_dag_file, xcoms

from gfocal_pipeline.report import ReportOptions

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def manifest_xcom(run_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id="gfocal_onnxruntime", run_id=run_id, task_id="preprocess", key="manifest")
            .one()
        )
        return row.value


STATS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}


@pytest.fixture(scope="module")
def run(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    module = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py")
    work = tmp_path_factory.mktemp("work")
    conf = {
        "work_dir": str(work),
        "height": 256,
        "width": 320,
        "max_images": 6,
        "shard_size": 4,
        "batch_size": 2,
    }
    dag_run = module.dag.test(run_conf=conf)
    assert dag_run.state == "success"
    return dag_run.run_id, xcoms("gfocal_onnxruntime", dag_run.run_id)


def test_every_task_pushed_its_xcom(run: tuple[str, dict]) -> None:
    _, values = run
    assert set(values) == {
        "prepare",
        "export",
        "preprocess",
        "infer[0]",
        "infer[1]",
        "evaluate",
        "summary",
        "record",
        "gate",
        "retention",
    }
    prepared = values["prepare"]
    assert prepared["weights_random"] is True and Path(prepared["run_dir"]).is_dir()
    export = values["export"]
    assert set(export) == {
        "onnx_path",
        "onnx_sha256",
        "checkpoint_sha256",
        "variant",
        "input_name",
        "input_shape",
        "output_names",
        "opset",
        "parity_max_abs_err",
        "unexplained_allowed",
        "parity_ties",
        "parity_unexplained",
        "export_seconds",
        "torch_version",
        "cached",
        "cache_key",
        "model",
    }
    assert export["model"] == "gfocalv2"  # the adapter that exported it (its spec: .export.json)
    assert export["input_name"] == "input.1" and export["output_names"] == ["boxes", "scores"]
    assert export["opset"] == 17 and export["torch_version"].startswith("2.13")
    assert Path(export["onnx_path"]).is_file() and export["export_seconds"] > 0
    assert export["variant"] == "portable" and export["input_shape"] == ["batch", 3, 256, 320]
    assert export["parity_max_abs_err"] <= 1e-3 and len(export["onnx_sha256"]) == 64
    assert export["unexplained_allowed"] is False and export["parity_unexplained"] == 0
    assert values["preprocess"] == ["00000", "00001"]
    pre = manifest_xcom(run[0])
    assert pre["images"] == 6 and pre["dtype"] == "float32" and Path(pre["manifest_path"]).is_file()
    assert [values["infer[0]"]["images"], values["infer[1]"]["images"]] == [4, 2]
    for key in ("infer[0]", "infer[1]"):
        timing = values[key]["timing"]
        assert timing["fps"] > 0 and set(timing["latency_ms"]) == {"mean", "p50", "p90", "p99", "min", "max"}
    evaluation = values["evaluate"]
    assert set(evaluation["stats"]) == STATS and evaluation["images"] == 6
    assert Path(evaluation["detections_path"]).is_file()
    assert evaluation["timing"]["fps"] > 0
    summary = values["summary"]
    assert summary["backends"]["device"]["stats"] == evaluation["stats"]
    assert (
        json.loads(Path(summary["run_dir"], "summary.json").read_text())["backends"]["device"]["images"] == 6
    )
    record = values["record"]["device"]
    assert record["run_id"] == run[0] and record["stats"]["AP"] == evaluation["stats"]["AP"]
    assert record["config"]["backend"] == "onnxruntime" and record["onnx_sha256"] == export["onnx_sha256"]
    verdict = values["gate"]
    assert verdict["passed"] is True and verdict["first_run"] is True  # no history yet: floors only
    # bulk data stays on disk: every XCom value is small
    assert all(len(json.dumps(v)) < 8000 for v in values.values())


def test_the_run_directory_holds_no_inputs_graphs_or_candidates(run: tuple[str, dict]) -> None:
    _, values = run
    run_dir = Path(values["prepare"]["run_dir"])
    names = [path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*") if path.is_file()]
    assert not (run_dir / "inputs").exists() and not (run_dir / "model").exists()
    assert not [n for n in names if n.endswith((".onnx", ".bin")) or n.endswith("candidates.npz")]
    assert {"manifest.json", "run.json", "summary.json"} <= set(names)
    images = values["evaluate"]["images"]
    per_run = [n for n in names if not n.startswith("report/")]
    outside_caches = sum((run_dir / n).stat().st_size for n in per_run)
    assert outside_caches / images < 20_000  # the budget per image (detections.json included)
    # the regression report is bounded per run, not per image: its pictures plus report.json/index.html
    report_bytes = sum((run_dir / n).stat().st_size for n in names if n.startswith("report/"))
    pictures = [n for n in names if n.startswith("report/") and n.endswith(".png")]
    options = ReportOptions()
    assert len(pictures) <= options.top_images
    assert report_bytes < options.top_images * options.picture_bytes + 500_000


def test_invalid_form_values_are_rejected_before_a_run_exists(airflow_db: Path) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    dag = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py").dag
    params = dag.params
    # empty (None): the model adapter's policy and size
    assert params.get_param("policy").schema["enum"] == ["letterbox", "mmdet", "centered", None]
    assert params.get_param("height").schema["multipleOf"] == 32
    assert params.get_param("height").value is None and params.get_param("policy").value is None
    assert all(params.get_param(name).schema.get("title") for name in params)
    for bad in ({"policy": "bogus"}, {"height": 801}, {"batch_size": 0}, {"fps_tolerance": 5}):
        with pytest.raises(ParamValidationError):
            dag.test(run_conf=bad)  # the same validation a UI/API trigger goes through
    assert _runs_with_conf("gfocal_onnxruntime", ("bogus", 801)) == 0  # no run was created


def _runs_with_conf(dag_id: str, values: tuple) -> int:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == dag_id).all()
        return sum(1 for r in runs if any(v in (r.conf or {}).values() for v in values))
