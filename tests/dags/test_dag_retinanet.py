"""`model: retinanet` through both DAGs under `dag.test()`: the ONNX Runtime DAG on the demo data
(RANDOM RetinaNet weights in mmdet's layout, exported, parity-checked) and the nightly on the CANN tool
emulators (no NPU here), with AP_delta against the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import both_dags, xcoms

from gfocal_pipeline.adapters import model_spec
from gfocal_pipeline.history import HistoryStore

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

RETINANET = model_spec("retinanet")


@pytest.fixture(scope="module")
def runs(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("work")
    small = {"model": "retinanet", "work_dir": str(work), "height": 128, "width": 160, "max_images": 5}
    with both_dags(tmp_path_factory.mktemp("cann")) as (embedded, nightly, toolkit):
        first = embedded.test(run_conf={**small, "shard_size": 3})
        second = nightly.test(
            run_conf={**small, "cann_set_env": str(toolkit.set_env), "outfmt": "TXT", "fps_tolerance": 0.9}
        )
    assert (first.state, second.state) == ("success", "success")
    return {
        "embedded": xcoms(embedded.dag_id, first.run_id),
        "nightly": xcoms(nightly.dag_id, second.run_id),
    }


def test_the_embedded_dag_exports_and_runs_retinanet(runs: dict) -> None:
    values = runs["embedded"]
    prepared = values["prepare"]
    assert prepared["model"] == "retinanet" and prepared["weights_random"] is True
    assert Path(prepared["checkpoint"]).name == RETINANET.demo_checkpoint
    export = values["export"]
    assert export["model"] == "retinanet" and export["parity_unexplained"] == 0
    recorded = json.loads(Path(export["onnx_path"]).with_suffix(".export.json").read_text())
    assert recorded["model"] == RETINANET.to_dict()
    levels = ((16, 20), (8, 10), (4, 5), (2, 3), (1, 2))  # P3..P7 of 128x160
    assert recorded["candidates_per_image"] == sum(min(1000, h * w * 9) for h, w in levels)
    run_json = json.loads((Path(prepared["run_dir"]) / "run.json").read_text())
    assert run_json["model"]["name"] == "retinanet"
    assert values["evaluate"]["images"] == 5 and set(values["evaluate"]["stats"]) >= {"AP", "AR100"}


def test_the_nightly_converts_retinanet_and_reports_ap_delta(runs: dict) -> None:
    values = runs["nightly"]
    convert = values["convert"]
    assert Path(convert["om_path"]).name == f"{RETINANET.om_name}.om"
    assert values["export"]["model"] == "retinanet" and values["export"]["variant"] == "ascend"
    summary = values["summary"]
    assert summary["backends"]["reference"]["backend"] == "torch"
    assert summary["AP_delta"] == pytest.approx(summary["AP_npu"] - summary["AP_pytorch"])
    # the emulated OM runs the exported graph (in fp16 NMS): it keeps PyTorch's detections
    assert summary["backends"]["device"]["detections"] > 0
    assert abs(summary["AP_delta"]) < 0.05


def test_history_rows_are_keyed_on_the_retinanet_model(runs: dict) -> None:
    from operators.settings import load_settings

    record = runs["nightly"]["record"]
    assert {role: row["config"]["model"] for role, row in record.items()} == {
        "device": RETINANET.history_name,
        "reference": RETINANET.history_name,
    }
    with HistoryStore(load_settings().history_url) as store:
        rows = [
            row
            for row in store.recent(dag_id="gfocal_ascend_nightly")
            if row.run_id == record["device"]["run_id"]
        ]
    assert {(row.config.model, row.config.backend) for row in rows} == {
        (RETINANET.history_name, "msame"),
        (RETINANET.history_name, "torch"),
    }
