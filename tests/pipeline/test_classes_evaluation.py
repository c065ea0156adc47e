"""Evaluation of a model with its own classes: a 3-class annotation file scored under the run's recorded
spec (`num_classes`, `classes` in another order than the ids, class-agnostic host NMS)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from support import shard_marker

from gfocal_pipeline.errors import EvaluationError
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import RunLayout, write_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest
from gfocal_pipeline.model_spec import ModelSpec, Postprocess

# the file lists its categories out of id order, with names in another case and padded
CATEGORIES = [{"id": 9, "name": "dog"}, {"id": 2, "name": "Bird "}, {"id": 5, "name": "cat"}]
CLASSES = ("CAT", "dog", " bird")  # label 0 = cat (id 5), 1 = dog (id 9), 2 = bird (id 2)
BY_NAME = {5: 0, 9: 1, 2: 2}  # category id -> label under CLASSES, worked out by hand
BY_SORTED_ID = {2: 0, 5: 1, 9: 2}  # category id -> label without classes: the k-th sorted id
# image id -> its ground truth [(x1, y1, x2, y2), category id]; input pixels = original pixels here
GT = {
    7: [((10, 20, 40, 40), 5), ((50, 10, 90, 60), 9)],
    8: [((5, 5, 50, 60), 2)],
    9: [((0, 0, 90, 70), 9)],
}
SHARD = "00000"


def write_annotations(path: Path, extra: list[tuple[dict, dict]] | None = None) -> Path:
    images = [{"id": i, "file_name": f"img_{i}.jpg", "width": 100, "height": 80} for i in GT]
    annotations = [
        {
            "id": len(images) * 10 + n,
            "image_id": i,
            "category_id": cat,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "iscrowd": 0,
        }
        for n, (i, ((x1, y1, x2, y2), cat)) in enumerate((i, b) for i, boxes in GT.items() for b in boxes)
    ]
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    for category, annotation in extra or []:
        data["categories"] = [*data["categories"], category]
        data["annotations"] = [*data["annotations"], annotation]
    path.write_text(json.dumps(data))
    return path


def make_run(
    root: Path, spec: ModelSpec | None, extra: list[tuple[dict, dict]] | None = None
) -> tuple[RunLayout, Manifest]:
    """A run over images 7, 8, 9 (one shard) whose run.json records `spec` (nothing when None)."""
    layout = RunLayout.at(root)
    root.mkdir(parents=True, exist_ok=True)
    annotation_file = write_annotations(root / "instances.json", extra)
    entries = [
        ImageEntry(i, f"img_{i}.jpg", SHARD, Geometry(100, 80, 1.0, 1.0, 100, 80, (0, 0, 0, 0))) for i in GT
    ]
    shards = {SHARD: list(GT)}
    paths = (str(root), str(annotation_file), str(root / "val"))
    manifest = Manifest("letterbox", "float32", 128, 128, 2, *paths, entries, shards)
    manifest.write(layout.manifest)
    if spec is not None:
        layout.run_json.write_text(json.dumps({"model": spec.to_dict()}))
    return layout, manifest


def spec(
    num_classes: int = 3, classes: tuple[str, ...] | None = CLASSES, class_aware: bool = True
) -> ModelSpec:
    return ModelSpec(
        name="tri",
        display_name="Three classes",
        history_name="tri",
        om_name="tri",
        num_classes=num_classes,
        classes=classes,
        postprocess=Postprocess(class_aware=class_aware),
    )


def marker(manifest: Manifest, backend: str) -> dict[str, object]:
    return shard_marker(manifest, backend, SHARD)


def write_perfect_dets(
    layout: RunLayout, manifest: Manifest, label_of: dict[int, int], extra_rows: int = 0
) -> None:
    """Every ground-truth box as a detection (score 0.9) labelled `label_of[category]`; `extra_rows`
    more rows per image with label 3 (beyond a 3-class model) and score 0.95."""
    dets = np.zeros((len(GT), 10, 5), np.float32)
    labels = np.full((len(GT), 10), -1, np.int64)
    for n, boxes in enumerate(GT.values()):
        for r, (box, cat) in enumerate(boxes):
            dets[n, r] = [*box, 0.9]
            labels[n, r] = label_of[cat]
        for r in range(len(boxes), len(boxes) + extra_rows):
            dets[n, r] = [0, 0, 30, 30, 0.95]
            labels[n, r] = 3
    arrays = {"dets": dets, "labels": labels}
    write_shard_outputs(
        layout.output_shard("npu", SHARD), np.array(list(GT)), arrays, "dets", marker(manifest, "npu")
    )


@pytest.mark.parametrize("engine", ["faster-coco-eval", "pycocotools"])
def test_label_k_scores_as_the_category_named_classes_k(tmp_path: Path, engine: str) -> None:
    layout, manifest = make_run(tmp_path, spec())
    write_perfect_dets(layout, manifest, BY_NAME)
    result = evaluate_outputs(layout, "npu", engine=engine)
    assert result["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)
    records = json.loads(Path(result["detections_path"]).read_text())
    expected = sorted((i, cat) for i, boxes in GT.items() for _, cat in boxes)
    assert sorted((r["image_id"], r["category_id"]) for r in records) == expected
    with open(result["per_class_path"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    # one row per model class, in label order, each with its own AP
    assert [(int(r["category_id"]), r["name"]) for r in rows] == [(5, "cat"), (9, "dog"), (2, "Bird ")]
    assert [float(r["AP"]) for r in rows] == pytest.approx([1.0, 1.0, 1.0])


def test_the_same_detections_score_low_under_the_sorted_id_mapping(tmp_path: Path) -> None:
    """Detections labelled by `classes` but scored as if label k were the k-th id: every box lands on
    another category, so the AP is far from 1 (the mapping matters)."""
    layout, manifest = make_run(tmp_path, spec(classes=None))
    write_perfect_dets(layout, manifest, BY_NAME)
    assert evaluate_outputs(layout, "npu")["stats"]["AP"] < 0.5


def test_without_classes_label_k_is_the_kth_sorted_id(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, spec(classes=None))
    write_perfect_dets(layout, manifest, BY_SORTED_ID)
    result = evaluate_outputs(layout, "npu")
    assert result["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)
    records = json.loads(Path(result["detections_path"]).read_text())
    assert sorted(r["category_id"] for r in records) == [2, 5, 9, 9]


def test_labels_beyond_the_model_s_classes_are_dropped(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, spec())
    write_perfect_dets(layout, manifest, BY_NAME, extra_rows=2)
    result = evaluate_outputs(layout, "npu")
    assert result["detections"] == 4
    assert result["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)


def test_categories_the_classes_do_not_name_are_not_scored(tmp_path: Path) -> None:
    """A fourth category with ground truth that the model does not predict: not scored (as mmdet's
    CocoMetric with `classes`), so perfect detections of the three classes still score 1."""
    horse = {"id": 7, "name": "horse"}
    box = {"id": 99, "image_id": 8, "category_id": 7, "bbox": [60, 5, 30, 30], "area": 900, "iscrowd": 0}
    layout, manifest = make_run(tmp_path, spec(), extra=[(horse, box)])
    write_perfect_dets(layout, manifest, BY_NAME)
    result = evaluate_outputs(layout, "npu")
    assert result["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)
    saved = json.loads(Path(result["stats_path"]).read_text())
    assert [row["category_id"] for row in saved["per_class"]] == [5, 9, 2]


def test_a_category_count_unlike_num_classes_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, spec(num_classes=4, classes=None))
    write_perfect_dets(layout, manifest, BY_SORTED_ID)
    with pytest.raises(EvaluationError) as err:
        evaluate_outputs(layout, "npu")
    message = str(err.value)
    assert str(tmp_path / "instances.json") in message
    assert "has 3 categories, but the model predicts 4 classes" in message
    assert "exactly those 4 categories" in message and "`classes`" in message


def test_without_a_recorded_spec_the_model_is_coco_s_80(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, None)
    write_perfect_dets(layout, manifest, BY_SORTED_ID)
    with pytest.raises(EvaluationError, match=r"has 3 categories, but the model predicts 80 COCO classes"):
        evaluate_outputs(layout, "npu")


def test_a_class_name_without_a_category_is_named(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, spec(classes=("cat", "dog", "horse")))
    write_perfect_dets(layout, manifest, BY_NAME)
    with pytest.raises(EvaluationError) as err:
        evaluate_outputs(layout, "npu")
    message = str(err.value)
    assert str(tmp_path / "instances.json") in message
    assert "no category named 'horse'" in message and "'cat'" not in message


def test_two_categories_of_one_name_are_refused(tmp_path: Path) -> None:
    other_dog = {"id": 11, "name": "DOG"}
    box = {"id": 99, "image_id": 8, "category_id": 11, "bbox": [60, 5, 30, 30], "area": 900, "iscrowd": 0}
    layout, manifest = make_run(tmp_path, spec(), extra=[(other_dog, box)])
    write_perfect_dets(layout, manifest, BY_NAME)
    with pytest.raises(EvaluationError, match=r"'dog' \(ids \[9, 11\]\)"):
        evaluate_outputs(layout, "npu")


@pytest.mark.parametrize(("class_aware", "kept"), [(False, 1), (True, 2)])
def test_host_nms_of_candidates_follows_the_spec_s_class_awareness(
    tmp_path: Path, class_aware: bool, kept: int
) -> None:
    """Candidates (3 score columns) of image 9: its dog box (dog 0.9) and a near copy scored as cat
    (0.8). Class-agnostic NMS keeps the dog box only; class-aware keeps both."""
    layout, manifest = make_run(tmp_path, spec(class_aware=class_aware))
    boxes = np.zeros((len(GT), 2, 4), np.float32)
    scores = np.zeros((len(GT), 2, 3), np.float32)
    boxes[2] = [[0, 0, 90, 70], [1, 1, 90, 70]]
    scores[2, 0, BY_NAME[9]] = 0.9
    scores[2, 1, BY_NAME[5]] = 0.8
    arrays = {"boxes": boxes, "scores": scores}
    out = layout.output_shard("cand", SHARD)
    write_shard_outputs(out, np.array(list(GT)), arrays, "candidates", marker(manifest, "cand"))
    result = evaluate_outputs(layout, "cand")
    records = json.loads(Path(result["detections_path"]).read_text())
    assert [(r["image_id"], r["category_id"]) for r in records] == [(9, 9), (9, 5)][:kept]
    saved = json.loads(Path(result["stats_path"]).read_text())
    (how,) = saved["postprocess"]
    assert how.get("class_aware", True) is class_aware and how["nms"] == "host"


def test_the_report_expects_only_the_scored_categories(tmp_path: Path) -> None:
    """Compared with ground truth, a box of a category the model does not predict (horse) is not a
    miss of the device: perfect detections of the model's classes disagree nowhere."""
    from gfocal_pipeline.report import build_report

    horse = {"id": 7, "name": "horse"}
    box = {"id": 99, "image_id": 8, "category_id": 7, "bbox": [60, 5, 30, 30], "area": 900, "iscrowd": 0}
    layout, manifest = make_run(tmp_path / "run", spec(), extra=[(horse, box)])
    write_perfect_dets(layout, manifest, BY_NAME)
    evaluate_outputs(layout, "npu")
    (tmp_path / "staging").mkdir()
    report = build_report(layout.root, tmp_path / "staging", backend="npu", reference=None)
    assert report["against"] == "ground truth"
    assert [item["disagreement"] for item in report["images"]] == [0, 0, 0]
    assert {row["category_id"]: row["gt_boxes"] for row in report["per_class"]} == {5: 1, 9: 2, 2: 1}
