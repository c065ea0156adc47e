"""evaluate_outputs on hand-made NMS-in-graph ("dets") outputs: mapping, conversion and every bad input."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from gfocal_pipeline.errors import EvaluationError
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import RunLayout, write_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest

# COCO's 80 ids (1..90 with ten gaps), written to the annotation file in shuffled order
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
SCALE, PAD = 2.0, (10, 20, 110, 76)  # every image: 100x80 original -> 200x160 at (10, 20) in 256x320
# image id -> GT box (x1, y1, x2, y2) in original pixels and its label 0..79
GT = {7: ((10, 20, 40, 40), 3), 8: ((5, 5, 50, 60), 11), 9: ((0, 0, 90, 70), 79)}
OUTSIDE_RUN = {10: ((1, 1, 30, 30), 0)}  # in the annotation file, not in the manifest


def write_annotations(path: Path, categories: list[int] = COCO_IDS) -> Path:
    shuffled = list(categories)
    random.Random(0).shuffle(shuffled)
    images = [{"id": i, "file_name": f"img_{i}.jpg", "width": 100, "height": 80} for i in [*GT, *OUTSIDE_RUN]]
    annotations = [
        {
            "id": n + 1,
            "image_id": i,
            "category_id": COCO_IDS[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "iscrowd": 0,
        }
        for n, (i, ((x1, y1, x2, y2), label)) in enumerate({**GT, **OUTSIDE_RUN}.items())
    ]
    cats = [{"id": c, "name": f"name_{c}"} for c in shuffled]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def make_run(root: Path, shards: dict[str, list[int]] | None = None) -> tuple[RunLayout, Manifest]:
    shards = shards or {"00000": [7, 8], "00001": [9]}
    layout = RunLayout.at(root)
    annotation_file = write_annotations(root / "instances.json")
    entries = [
        ImageEntry(i, f"img_{i}.jpg", shard, Geometry(100, 80, SCALE, SCALE, 200, 160, PAD))
        for shard, ids in shards.items()
        for i in ids
    ]
    manifest = Manifest(
        "letterbox",
        "float32",
        256,
        320,
        2,
        str(root),
        str(annotation_file),
        str(root / "val"),
        entries,
        shards,
    )
    manifest.write(layout.manifest)
    return layout, manifest


def to_input(box: tuple[float, ...]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 * SCALE + PAD[0], y1 * SCALE + PAD[1], x2 * SCALE + PAD[0], y2 * SCALE + PAD[1]]


def dets_for(rows: list[tuple[list[float], float, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(100,5) dets + (100,) labels: the given rows, then padding rows (zeros, label -1) as the NPU writes."""
    dets = np.zeros((100, 5), np.float32)
    labels = np.full(100, -1, np.int64)
    for n, (box, score, label) in enumerate(rows):
        dets[n] = [*box, score]
        labels[n] = label
    return dets, labels


def write_dets(
    layout: RunLayout,
    manifest: Manifest,
    shard: str,
    per_image: dict[int, list],
    backend: str = "npu",
    **marker_changes: object,
) -> None:
    ids = list(per_image)
    pairs = [dets_for(per_image[i]) for i in ids]
    marker = {
        "backend": backend,
        "shard": shard,
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "input_height": manifest.input_height,
        "input_width": manifest.input_width,
        "shard_digest": manifest.shard_digest(shard),
        "manifest_sha256": manifest.sha256,
        **marker_changes,
    }
    write_shard_outputs(
        layout.output_shard(backend, shard),
        np.asarray(ids),
        {"dets": np.stack([p[0] for p in pairs]), "labels": np.stack([p[1] for p in pairs])},
        "dets",
        marker,
    )


def perfect(image_id: int) -> list:
    box, label = GT[image_id]
    return [(to_input(box), 0.9, label)]


def write_perfect(layout: RunLayout, manifest: Manifest, backend: str = "npu") -> None:
    for shard, ids in manifest.shards.items():
        write_dets(layout, manifest, shard, {i: perfect(i) for i in ids}, backend=backend)


@pytest.fixture
def run(tmp_path: Path) -> tuple[RunLayout, Manifest]:
    return make_run(tmp_path)


def test_perfect_dets_score_one_on_the_manifest_images_only(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    result = evaluate_outputs(layout.root, "npu")
    # image 10's ground truth is in the annotation file but not in the run: it does not count as missed
    assert result["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)
    assert result["stats"]["AR100"] == pytest.approx(1.0, abs=1e-9)
    assert (result["images"], result["detections"], result["missing_images"]) == (3, 3, 0)
    assert set(result) == {
        "backend",
        "engine",
        "images",
        "detections",
        "missing_images",
        "stats",
        "detections_path",
        "per_class_path",
        "stats_path",
    }
    assert list(result["stats"]) == [
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    ]
    json.dumps(result)  # small and serialisable: goes to XCom
    assert Path(result["stats_path"]).parent == layout.eval_dir("npu")


def test_dets_path_drops_padding_and_class_80_and_writes_xywh_in_original_pixels(run: tuple) -> None:
    layout, manifest = run
    # input box (30, 60, 90, 100) -> original ((30-10)/2, (60-20)/2, (90-10)/2, (100-20)/2) = (10, 20, 40, 40)
    rows = [
        ([30.0, 60.0, 90.0, 100.0], 0.8, 3),
        ([0.0, 0.0, 50.0, 50.0], 0.95, 80),
        ([1.0, 1.0, 9.0, 9.0], 0.0, 5),
    ]  # class 80 and a zero-score row are not detections
    write_dets(layout, manifest, "00000", {7: rows, 8: []})
    write_dets(layout, manifest, "00001", {9: []})
    result = evaluate_outputs(layout, "npu")
    detections = json.loads(Path(result["detections_path"]).read_text())
    assert detections == [
        {"image_id": 7, "category_id": 4, "bbox": [10.0, 20.0, 30.0, 20.0], "score": pytest.approx(0.8)}
    ]
    assert result["detections"] == 1


@pytest.mark.parametrize(("label", "category_id"), [(0, 1), (11, 13), (24, 27), (43, 49), (44, 50), (79, 90)])
def test_label_maps_to_kth_sorted_category_id(run: tuple, label: int, category_id: int) -> None:
    layout, manifest = run
    write_dets(layout, manifest, "00000", {7: [([30.0, 60.0, 90.0, 100.0], 0.5, label)], 8: []})
    write_dets(layout, manifest, "00001", {9: []})
    detections = json.loads(Path(evaluate_outputs(layout, "npu")["detections_path"]).read_text())
    assert [d["category_id"] for d in detections] == [category_id]


@pytest.mark.parametrize("engine", ["faster-coco-eval", "pycocotools"])
def test_no_detections_at_all_scores_zero(run: tuple, engine: str) -> None:
    layout, manifest = run
    write_dets(layout, manifest, "00000", {7: [], 8: [([0.0, 0.0, 5.0, 5.0], 0.7, 80)]})
    write_dets(layout, manifest, "00001", {9: []})
    result = evaluate_outputs(layout, "npu", engine=engine)
    assert result["detections"] == 0
    assert json.loads(Path(result["detections_path"]).read_text()) == []
    assert result["stats"]["AP"] == 0.0
    assert result["stats"]["AR100"] == 0.0


def test_missing_shard_folder_is_named(run: tuple) -> None:
    layout, manifest = run
    write_dets(layout, manifest, "00000", {7: perfect(7), 8: perfect(8)})
    with pytest.raises(EvaluationError, match=r"shard 00001.*outputs/npu/00001.*does not exist"):
        evaluate_outputs(layout, "npu")


def test_unfinished_shard_is_an_error(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    (layout.output_shard("npu", "00001") / "done.json").unlink()
    with pytest.raises(EvaluationError, match=r"00001.*unfinished"):
        evaluate_outputs(layout, "npu")


def test_backend_without_outputs_is_named(run: tuple) -> None:
    layout, _ = run
    with pytest.raises(EvaluationError, match=r"no outputs for backend 'msame'"):
        evaluate_outputs(layout, "msame")


def test_outputs_of_another_policy_are_refused(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    write_dets(layout, manifest, "00001", {9: perfect(9)}, policy="mmdet")
    with pytest.raises(EvaluationError) as info:
        evaluate_outputs(layout, "npu")
    message = str(info.value)
    assert "policy 'mmdet'" in message and "'letterbox'" in message and "re-run inference" in message


def test_outputs_of_a_shard_whose_images_changed_are_refused(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    manifest.skipped = [{"file_name": "broken.jpg", "image_id": 3, "reason": "unreadable"}]
    manifest.write(layout.manifest)  # another manifest file, the same shards: outputs still belong to it
    assert evaluate_outputs(layout, "npu")["stats"]["AP"] == pytest.approx(1.0)

    old_digest = manifest.shard_digest("00001")
    manifest.images = [
        dataclasses.replace(e, sha256="a" * 64) if e.image_id == 9 else e for e in manifest.images
    ]
    manifest.write(layout.manifest)  # image 9 (shard 00001) is another file now
    with pytest.raises(EvaluationError) as info:
        evaluate_outputs(layout, "npu")
    message = str(info.value)
    assert "outputs/npu/00001" in message and f"shard digest {old_digest!r}" in message
    assert repr(manifest.shard_digest("00001")) in message and "re-run inference" in message
    write_dets(layout, manifest, "00001", {9: perfect(9)})  # only that shard is re-run
    assert evaluate_outputs(layout, "npu")["stats"]["AP"] == pytest.approx(1.0)


def test_a_marker_without_shard_digest_asks_to_rerun_inference(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    marker_file = layout.output_shard("npu", "00000") / "done.json"
    marker = json.loads(marker_file.read_text())
    del marker["shard_digest"]  # as written before shard digests (manifest_sha256 only)
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(EvaluationError, match=r"outputs/npu/00000.*no shard_digest.*re-run inference"):
        evaluate_outputs(layout, "npu")


def test_stats_record_which_nms_made_the_detections(run: tuple) -> None:
    layout, manifest = run
    host = {"nms": "host", "score_thr": 0.1, "iou_thr": 0.5, "max_per_img": 100}
    write_dets(layout, manifest, "00000", {7: perfect(7), 8: perfect(8)}, postprocess=host)
    write_dets(layout, manifest, "00001", {9: perfect(9)})  # an older marker: nothing recorded
    result = evaluate_outputs(layout, "npu", score_thr=0.3)
    saved = json.loads(Path(result["stats_path"]).read_text())
    assert saved["postprocess"] == [
        {**host, "where": "inference", "shards": ["00000"]},
        {"nms": "unrecorded", "where": "inference", "shards": ["00001"]},
    ]
    assert saved["score_thr"] == 0.3  # the evaluation's own NMS setting (kind "candidates" only)
    assert result["stats"]["AP"] == pytest.approx(1.0)  # dets are not filtered again at 0.3


def test_image_without_output_row_is_named_unless_allowed(run: tuple) -> None:
    layout, manifest = run
    write_dets(layout, manifest, "00000", {7: perfect(7)})
    write_dets(layout, manifest, "00001", {9: perfect(9)})
    with pytest.raises(EvaluationError, match=r"8 \(img_8\.jpg\)"):
        evaluate_outputs(layout, "npu")
    result = evaluate_outputs(layout, "npu", allow_missing=True)
    assert result["missing_images"] == 1
    assert result["detections"] == 2
    # image 8 counts with its ground truth and no detections: 2 of 3 objects found
    assert result["stats"]["AR100"] == pytest.approx(2 / 3, abs=1e-9)


def test_rows_for_images_outside_the_manifest_are_refused(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    write_dets(layout, manifest, "00001", {9: perfect(9), 99: []})
    with pytest.raises(EvaluationError, match=r"image ids 99 .*not in the manifest"):
        evaluate_outputs(layout, "npu")


def test_an_image_twice_is_refused(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    write_dets(layout, manifest, "00001", {9: perfect(9), 7: perfect(7)})
    with pytest.raises(EvaluationError, match=r"image id 7 \(img_7\.jpg\) has more than one output row"):
        evaluate_outputs(layout, "npu")


def test_manifest_images_missing_from_the_annotation_file(tmp_path: Path) -> None:
    layout, _ = make_run(tmp_path, {"00000": [7, 8, 123]})
    with pytest.raises(EvaluationError, match=r"123 \(img_123\.jpg\).*not in annotation file"):
        evaluate_outputs(layout, "npu")


def test_annotation_file_without_the_80_classes(run: tuple, tmp_path: Path) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    small = write_annotations(tmp_path / "few.json", categories=COCO_IDS[:20])
    with pytest.raises(EvaluationError, match=r"has 20 categories"):
        evaluate_outputs(layout, "npu", annotation_file=small)
    with pytest.raises(EvaluationError, match=r"does not exist"):
        evaluate_outputs(layout, "npu", annotation_file=tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    for engine in ("faster-coco-eval", "pycocotools"):
        with pytest.raises(EvaluationError, match=r"broken\.json.*not a readable COCO annotation file"):
            evaluate_outputs(layout, "npu", annotation_file=broken, engine=engine)


def test_unknown_engine(run: tuple) -> None:
    layout, _ = run
    with pytest.raises(EvaluationError, match="unknown evaluation engine 'detectron'"):
        evaluate_outputs(layout, "npu", engine="detectron")


def test_rerun_replaces_the_files_and_leaves_no_temporaries(run: tuple) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    first = evaluate_outputs(layout, "npu")
    write_dets(layout, manifest, "00001", {9: []})
    second = evaluate_outputs(layout, "npu", engine="pycocotools")
    assert first["stats"]["AR100"] == pytest.approx(1.0)
    assert second["stats"]["AR100"] == pytest.approx(2 / 3, abs=1e-9)
    assert sorted(p.name for p in layout.eval_dir("npu").iterdir()) == [
        "detections.json",
        "per_class.csv",
        "stats.json",
    ]
    assert json.loads(Path(second["stats_path"]).read_text())["engine"] == "pycocotools"
