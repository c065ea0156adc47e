"""Bring your own ONNX graph (`model: onnx`): graphs built without the project's exporter, one per output
convention, through `gfocal_onnxruntime` and the nightly on the CANN tool emulators; the AP checked
against the test's own evaluation of the same outputs (own letterbox rescaling, own NMS, pycocotools).
Mismatched declarations are refused before any inference, naming the fix."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from byo_graphs import (
    BOXES,
    HEIGHT,
    LABELS,
    SCORES,
    SIZES,
    WIDTH,
    ToyCandidates,
    ToyDets,
    declaration,
    write_dataset,
    write_graph,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from support import both_dags, xcoms

from gfocal_pipeline.coco_classes import COCO_CATEGORIES
from gfocal_pipeline.errors import ConfigError, ExportError
from gfocal_pipeline.export import export_onnx

OUTPUTS = {"dets": ("dets", "labels"), "candidates": ("boxes", "scores")}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _own_nms(iou_thr: float) -> list[int]:
    """Greedy class-aware NMS over the toy's rows, highest score first (written here, not imported)."""
    kept: list[int] = []
    for row in np.argsort(-SCORES, kind="stable"):
        if all(LABELS[k] != LABELS[row] or _iou(BOXES[k], BOXES[row]) <= iou_thr for k in kept):
            kept.append(int(row))
    return kept


def own_ap(annotation_file: Path, convention: str) -> float:
    """COCO AP of the toy's detections on every image, evaluated by pycocotools in this test: dets rows
    as they are (the graph's NMS), candidates through `_own_nms`; boxes rescaled by letterbox math."""
    rows = range(len(BOXES)) if convention == "dets" else _own_nms(0.5)
    ids = [cat_id for cat_id, _, _ in COCO_CATEGORIES]
    results = []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        scale = min(HEIGHT / height, WIDTH / width)
        for row in rows:
            x1, y1, x2, y2 = (BOXES[row] / scale).tolist()
            box = [x1, y1, x2 - x1, y2 - y1]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": ids[LABELS[row]],
                    "bbox": box,
                    "score": float(SCORES[row]),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotation_file))
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("byo")
    graphs = {
        "dets": write_graph(ToyDets(), root / "toy_dets.onnx", OUTPUTS["dets"], declaration("dets")),
        "candidates": write_graph(
            ToyCandidates(), root / "toy_candidates.onnx", OUTPUTS["candidates"], declaration("candidates")
        ),
    }
    return {"root": root, "graphs": graphs, "coco": write_dataset(root / "coco")}


def test_the_own_evaluation_tells_the_conventions_apart(byo: dict) -> None:
    """The reference numbers are not trivial: hits, a class error, a miss, and a shifted copy of a hit
    scored above it, which the candidates convention's host NMS keeps in place of the hit."""
    annotations = byo["coco"] / "annotations" / "instances_val2017.json"
    dets, candidates = own_ap(annotations, "dets"), own_ap(annotations, "candidates")
    assert min(dets, candidates) > 0.1 and max(dets, candidates) < 0.9 and abs(dets - candidates) > 0.01
    assert _own_nms(0.5) == [4, 1, 2, 3]  # box 0 (IoU 0.62 with the higher-scored box 4) is suppressed


# --- refused before any inference ------------------------------------------------------------------


def _refusal(
    tmp_path: Path, module: object, outputs: tuple[str, str], decl: dict | None, **graph: object
) -> str:
    path = write_graph(module, tmp_path / "g.onnx", outputs, decl, **graph)
    with pytest.raises((ExportError, ConfigError)) as info:
        export_onnx(path, tmp_path / "out.onnx", "portable", HEIGHT, WIDTH, model="onnx")
    assert not (tmp_path / "out.onnx").exists()
    return str(info.value)


def test_a_wrong_output_name_is_refused_naming_the_fix(tmp_path: Path) -> None:
    message = _refusal(tmp_path, ToyDets(), ("dets", "classes"), declaration("dets"))
    assert "refused before any inference" in message
    assert "the graph's outputs are ['classes', 'dets']" in message and "declares outputs: dets" in message
    assert "rename the graph's outputs to ['dets', 'labels']" in message


def test_a_declared_convention_that_is_not_the_graphs_names_the_right_one(tmp_path: Path) -> None:
    message = _refusal(tmp_path, ToyDets(), OUTPUTS["dets"], declaration("candidates"))
    assert "declares outputs: candidates (boxes + scores)" in message and "set outputs: dets" in message


def test_a_wrong_class_count_is_refused_naming_the_fix(tmp_path: Path) -> None:
    message = _refusal(tmp_path, ToyCandidates(classes=81), OUTPUTS["candidates"], declaration("candidates"))
    assert "output 'scores' has shape ['batch', 5, 81]" in message
    assert "num_classes 80" in message and "fix num_classes in the declaration or the graph" in message


def test_nchw_declared_for_an_nhwc_graph_is_refused_naming_the_fix(tmp_path: Path) -> None:
    message = _refusal(
        tmp_path, ToyCandidates(), OUTPUTS["candidates"], declaration("candidates"), nhwc_uint8=True
    )
    assert "input 'images' has shape ['batch', 128, 160, 3]" in message
    assert "declares layout NCHW" in message and "set input.layout: NHWC" in message


def test_a_graph_without_a_declaration_is_refused_naming_the_file(tmp_path: Path) -> None:
    message = _refusal(tmp_path, ToyDets(), OUTPUTS["dets"], None)
    assert "has no declaration beside it" in message and "g.spec.yaml" in message


def test_a_bad_declaration_names_the_field(tmp_path: Path) -> None:
    message = _refusal(tmp_path, ToyDets(), OUTPUTS["dets"], declaration("dets", num_classes=0, colour="red"))
    assert "g.spec.yaml' is invalid" in message and "num_classes:" in message and "colour:" in message


def test_a_matching_graph_is_imported_with_its_spec(byo: dict, tmp_path: Path) -> None:
    result = export_onnx(byo["graphs"]["dets"], tmp_path / "in.onnx", "portable", HEIGHT, WIDTH, model="onnx")
    assert result.input_name == "images" and result.output_names == ["dets", "labels"]
    assert result.model["history_name"] == "toy_dets" and result.model["reference_backend"] == "onnxruntime"
    recorded = json.loads((tmp_path / "in.export.json").read_text())
    assert recorded["model"]["outputs"] == "dets" and recorded["onnx_sha256"] == result.onnx_sha256


# --- through both DAGs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(byo: dict, airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("work")
    values = {}
    with both_dags(tmp_path_factory.mktemp("cann")) as (embedded, nightly, toolkit):
        for convention, graph in byo["graphs"].items():
            conf = {
                "model": "onnx",
                "checkpoint": str(graph),
                "coco_root": str(byo["coco"]),
                "work_dir": str(work),
                "height": HEIGHT,
                "width": WIDTH,
            }
            first = embedded.test(run_conf=conf)
            second = nightly.test(run_conf={**conf, "cann_set_env": str(toolkit.set_env), "outfmt": "TXT"})
            assert (first.state, second.state) == ("success", "success"), convention
            values[convention] = {
                "embedded": xcoms(embedded.dag_id, first.run_id),
                "nightly": xcoms(nightly.dag_id, second.run_id),
            }
        refused = embedded.test(run_conf={**conf, "checkpoint": str(_wrong_graph(byo["root"]))})
        values["refused"] = (refused.state, xcoms(embedded.dag_id, refused.run_id))
    return values


def _wrong_graph(root: Path) -> Path:
    """A candidates graph declared as dets: refused by the export task."""
    return write_graph(ToyCandidates(), root / "wrong.onnx", OUTPUTS["candidates"], declaration("dets"))


@pytest.mark.airflow
@pytest.mark.slow
@pytest.mark.parametrize("convention", ["dets", "candidates"])
def test_the_onnxruntime_dag_scores_the_graph_like_the_own_evaluation(
    byo: dict, runs: dict, convention: str
) -> None:
    values = runs[convention]["embedded"]
    annotations = byo["coco"] / "annotations" / "instances_val2017.json"
    assert values["export"]["model"] == "onnx" and values["prepare"]["history_model"] == f"toy_{convention}"
    assert values["evaluate"]["images"] == len(SIZES)
    assert values["evaluate"]["stats"]["AP"] == pytest.approx(own_ap(annotations, convention), abs=1e-9)


@pytest.mark.airflow
@pytest.mark.slow
@pytest.mark.parametrize("convention", ["dets", "candidates"])
def test_the_nightly_converts_the_graph_and_compares_it_with_onnxruntime(
    byo: dict, runs: dict, convention: str
) -> None:
    values = runs[convention]["nightly"]
    annotations = byo["coco"] / "annotations" / "instances_val2017.json"
    expected = own_ap(annotations, convention)
    summary = values["summary"]
    assert summary["backends"]["reference"]["backend"] == "onnxruntime"
    assert summary["backends"]["device"]["backend"] == "msame"
    assert summary["AP_reference"] == pytest.approx(expected, abs=1e-9)
    # the emulated NPU runs the same graph (fp16 scores keep the ranking): the same AP
    assert summary["AP_npu"] == pytest.approx(expected, abs=1e-3) and abs(summary["AP_delta"]) < 1e-3
    assert "AP_pytorch" not in summary
    assert Path(values["convert"]["om_path"]).name == f"toy_{convention}.om"
    assert {row["config"]["model"] for row in values["record"].values()} == {f"toy_{convention}"}
    assert values["record"]["reference"]["config"]["backend"] == "onnxruntime"


@pytest.mark.airflow
@pytest.mark.slow
def test_a_mismatched_graph_fails_the_export_task_before_inference(runs: dict) -> None:
    state, values = runs["refused"]
    assert state == "failed"
    assert "prepare" in values and "export" not in values
    assert not [task for task in values if task.startswith("infer")]


def test_a_declaration_with_its_own_classes_and_pixels_is_imported(tmp_path: Path) -> None:
    """20 named classes and BGR inputs: the run's spec carries them; a class list that disagrees with
    num_classes is refused naming both."""
    from gfocal_pipeline.adapters import run_model_spec

    names = [f"class_{k}" for k in range(20)]
    pixels = {"channel_order": "bgr", "policy": "centered", "height": HEIGHT, "width": WIDTH}
    decl = declaration("dets", classes=names, preprocessing=pixels)
    graph = write_graph(ToyDets(), tmp_path / "voc.onnx", OUTPUTS["dets"], decl)
    spec = run_model_spec("onnx", graph)
    assert spec.num_classes == 20 and spec.classes == tuple(names)
    assert (spec.preprocessing.channel_order, spec.preprocessing.policy) == ("bgr", "centered")
    result = export_onnx(graph, tmp_path / "in.onnx", "portable", HEIGHT, WIDTH, model="onnx")
    assert result.model["classes"] == names
    message = _refusal(tmp_path, ToyDets(), OUTPUTS["dets"], {**decl, "num_classes": 19})
    assert "classes lists 20 names but num_classes is 19" in message
