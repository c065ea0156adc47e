"""evaluate_outputs on hand-made NMS-in-graph ("dets") outputs: mapping, conversion and every bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from support import shard_marker

from gfocal_pipeline.errors import DatasetError, EvaluationError
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import RunLayout, write_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest
from gfocal_pipeline.steps import combined_timing

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
        **shard_marker(manifest, backend, shard),
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


def _record_annotation_hash(layout: RunLayout, manifest: Manifest) -> str:
    """Record the annotation file's sha256 in the manifest, as preprocessing does."""
    digest = hashlib.sha256(Path(manifest.annotation_file).read_bytes()).hexdigest()
    manifest.annotation_sha256 = digest
    manifest.write(layout.manifest)
    return digest


def test_an_annotation_file_edited_after_preprocessing_is_refused(run: tuple) -> None:
    layout, manifest = run
    recorded = _record_annotation_hash(layout, manifest)
    write_perfect(layout, manifest)
    assert evaluate_outputs(layout, "npu")["stats"]["AP"] == pytest.approx(1.0)
    annotation = Path(manifest.annotation_file)
    document = json.loads(annotation.read_text())
    document["annotations"][0]["bbox"][0] += 5  # a corrected box: another file, another dataset
    annotation.write_text(json.dumps(document))
    edited = hashlib.sha256(annotation.read_bytes()).hexdigest()
    for stale in ("stats.json", "per_class.csv"):
        (layout.eval_dir("npu") / stale).unlink()
    with pytest.raises(EvaluationError) as info:
        evaluate_outputs(layout, "npu")
    message = str(info.value)
    assert f"annotation file {str(annotation)!r} has sha256 {edited}" in message
    assert f"built from one with sha256 {recorded}" in message and "re-run preprocess" in message
    assert not (layout.eval_dir("npu") / "stats.json").exists()


def test_another_annotation_file_than_the_recorded_one_is_refused(run: tuple, tmp_path: Path) -> None:
    layout, manifest = run
    _record_annotation_hash(layout, manifest)
    write_perfect(layout, manifest)
    other = tmp_path / "other.json"
    other.write_text(Path(manifest.annotation_file).read_text() + "\n")  # same content but one byte
    with pytest.raises(EvaluationError, match=r"other\.json' has sha256 .* but the manifest"):
        evaluate_outputs(layout, "npu", annotation_file=other)


def test_a_manifest_without_the_annotation_hash_is_evaluated_with_a_warning(
    run: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    layout, manifest = run  # written as an older version would: no annotation_sha256
    write_perfect(layout, manifest)
    assert evaluate_outputs(layout, "npu")["stats"]["AP"] == pytest.approx(1.0)
    assert "records no annotation sha256" in caplog.text


def test_outputs_of_shards_the_manifest_does_not_list_are_ignored_and_named(
    run: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    first = evaluate_outputs(layout, "npu")
    stale = dataclasses.replace(manifest, shards={"00002": [7]})  # an earlier preprocess's shard
    write_dets(layout, stale, "00002", {7: perfect(7)})
    again = evaluate_outputs(layout, "npu")
    assert again["detections"] == first["detections"] and again["stats"] == first["stats"]
    assert "ignoring 1 output folder(s) of backend 'npu'" in caplog.text and "00002" in caplog.text


def _timing(layout: RunLayout, shard: str, images: int, latencies_ms: list[float]) -> None:
    fps = images / (sum(latencies_ms) / 1000)
    summary = {"fps": fps, "images": images, "batch_size": 1, "latency_ms": {}}
    path = layout.timing_file("npu", shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"latencies_ms": latencies_ms, "batch_size": 1, "summary": summary}))


def test_combined_timing_counts_the_manifest_s_shards_only(
    run: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    layout, _ = run  # shards 00000 (2 images), 00001 (1 image)
    _timing(layout, "00000", 2, [100.0, 100.0])  # 10 fps
    _timing(layout, "00001", 1, [50.0])  # 20 fps
    _timing(layout, "00002", 4, [1000.0] * 4)  # stale: from an earlier preprocess of this run dir
    timing = combined_timing(layout.root, "npu")
    assert timing["images"] == 3 and timing["fps"] == pytest.approx(3 / (2 / 10 + 1 / 20))
    assert sorted(timing["shard_fps"]) == pytest.approx([10.0, 20.0])
    assert timing["latency_ms"]["max"] == pytest.approx(100.0)
    assert "ignoring 1 timing file(s)" in caplog.text and "00002.json" in caplog.text


def test_combined_timing_names_a_listed_shard_without_timing_or_with_another_image_count(run: tuple) -> None:
    layout, _ = run
    _timing(layout, "00000", 2, [100.0, 100.0])
    with pytest.raises(
        DatasetError, match=r"timing of shard '00001' of backend 'npu' is missing.*00001\.json"
    ):
        combined_timing(layout.root, "npu")
    _timing(layout, "00001", 5, [50.0] * 5)  # a shard of the same name, from another preprocess
    with pytest.raises(DatasetError, match=r"records 5 images but shard '00001' of the manifest has 1"):
        combined_timing(layout.root, "npu")
    layout.timing_file("npu", "00001").write_text('{"summary": ')
    with pytest.raises(DatasetError, match=r"00001\.json' is damaged; run the inference of shard '00001'"):
        combined_timing(layout.root, "npu")
    _timing(layout, "00001", 1, [50.0])
    assert combined_timing(layout.root, "npu", shards=["00000"])["images"] == 2


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


# --- the vectorised in-memory path against the straightforward one -----------------------------


def random_run(root: Path, seed: int = 0, images: int = 24) -> tuple[RunLayout, Manifest, Path]:
    """A run of `images` images with their own geometry (pad, scale_x != scale_y), random ground truth
    (some crowd) and 100 dets rows per image near it: real rows, padding, class 80, score ties."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(np.arange(1, 10_000), size=images, replace=False).tolist())
    shards = {f"{n:05d}": ids[n::3] for n in range(3)}
    coco_images, annotations, entries, outputs = [], [], [], {}
    for shard, shard_ids in shards.items():
        for image_id in shard_ids:
            width, height = int(rng.integers(100, 640)), int(rng.integers(100, 640))
            sx, sy = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0))
            pad = (int(rng.integers(0, 30)), int(rng.integers(0, 30)), 0, 0)
            geometry = Geometry(width, height, sx, sy, round(width * sx), round(height * sy), pad)
            entries.append(ImageEntry(image_id, f"img_{image_id}.jpg", shard, geometry))
            coco_images.append(
                {"id": image_id, "file_name": f"img_{image_id}.jpg", "width": width, "height": height}
            )
            gt = np.stack([rng.uniform(0, width / 2, 6), rng.uniform(0, height / 2, 6)], 1)
            gt = np.concatenate([gt, gt + rng.uniform(4, 200, size=(6, 2))], 1)
            gt_labels = rng.integers(0, 8, size=6)  # few classes: several boxes per class and image
            for box, label in zip(gt.tolist(), gt_labels.tolist(), strict=True):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": COCO_IDS[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": int(rng.uniform() < 0.1),
                    }
                )
            outputs[image_id] = _random_dets(rng, gt, gt_labels, geometry)
    annotation_file = root / "instances.json"
    cats = [{"id": c, "name": f"name_{c}"} for c in random.Random(seed).sample(COCO_IDS, len(COCO_IDS))]
    annotation_file.write_text(
        json.dumps({"images": coco_images, "annotations": annotations, "categories": cats})
    )
    layout = RunLayout.at(root)
    manifest = Manifest(
        "mmdet", "float32", 704, 1312, 8, str(root), str(annotation_file), str(root / "val"), entries, shards
    )
    manifest.write(layout.manifest)
    for shard, shard_ids in shards.items():
        marker = {**_marker(manifest, shard), "postprocess": {"nms": "graph"}}
        arrays = {
            name: np.stack([outputs[i][n] for i in shard_ids]) for n, name in enumerate(("dets", "labels"))
        }
        write_shard_outputs(layout.output_shard("npu", shard), np.asarray(shard_ids), arrays, "dets", marker)
    return layout, manifest, annotation_file


def _random_dets(
    rng: np.random.Generator, gt: np.ndarray, gt_labels: np.ndarray, geometry: Geometry
) -> tuple[np.ndarray, np.ndarray]:
    """(100,5) dets in input pixels + (100,) labels: 80 noisy copies of the GT (mostly its class, 10 of
    them class 80), then 20 padding rows."""
    copies = rng.integers(0, len(gt), size=80)
    boxes = gt[copies] + rng.normal(0, 8, size=(80, 4))
    scale = np.array([geometry.scale_x, geometry.scale_y] * 2)
    offset = np.array([geometry.pad[0], geometry.pad[1]] * 2)
    dets = np.zeros((100, 5), np.float32)
    dets[:80, :4] = boxes * scale + offset
    dets[:80, 4] = np.round(rng.uniform(0.05, 1.0, 80), 2)  # two decimals: ties in score
    labels = np.full(100, -1, np.int64)
    labels[:80] = np.where(rng.uniform(size=80) < 0.8, gt_labels[copies], rng.integers(0, 80, 80))
    labels[70:80] = 80  # the 81st (padding) class is not a detection
    return dets, labels


def _marker(manifest: Manifest, shard: str) -> dict[str, object]:
    return {**shard_marker(manifest, "npu", shard), "manifest_sha256": manifest.sha256}


def straightforward_records(layout: RunLayout, manifest: Manifest, cat_ids: list[int]) -> list[dict]:
    """Image by image, row by row: drop padding/class 80, undo pad and scale, xywh, one dict per box."""
    by_id = manifest.by_id()
    records = []
    for shard in manifest.shards:
        with np.load(layout.output_shard("npu", shard) / "outputs.npz") as data:
            rows = zip(
                data["image_ids"].tolist(), data["dets"].tolist(), data["labels"].tolist(), strict=True
            )
            for image_id, dets, labels in rows:
                geometry = by_id[image_id].geometry
                left, top = geometry.pad[0], geometry.pad[1]
                for (x1, y1, x2, y2, score), label in zip(dets, labels, strict=True):
                    if not (0 <= label < 80 and score > 0):
                        continue
                    x1, x2 = (x1 - left) / geometry.scale_x, (x2 - left) / geometry.scale_x
                    y1, y2 = (y1 - top) / geometry.scale_y, (y2 - top) / geometry.scale_y
                    records.append(
                        {
                            "image_id": image_id,
                            "category_id": cat_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score,
                        }
                    )
    return records


def straightforward_stats(
    annotation_file: Path, records_file: Path, image_ids: list[int], engine: str
) -> list[float]:
    """The detections JSON file -> loadRes -> COCOeval of `engine`, as evaluation used to run."""
    with contextlib.redirect_stdout(io.StringIO()):
        if engine == "faster-coco-eval":
            faster = pytest.importorskip("faster_coco_eval")
            gt = faster.COCO(str(annotation_file))
            coco_eval = faster.COCOeval_faster(gt, gt.loadRes(str(records_file)), "bbox")
        else:
            pycoco = pytest.importorskip("pycocotools.coco")
            cocoeval = pytest.importorskip("pycocotools.cocoeval")
            gt = pycoco.COCO(str(annotation_file))
            coco_eval = cocoeval.COCOeval(gt, gt.loadRes(str(records_file)), "bbox")
        coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[:12]]


@pytest.mark.parametrize("engine", ["faster-coco-eval", "pycocotools"])
def test_stats_are_identical_to_the_straightforward_path(tmp_path: Path, engine: str) -> None:
    layout, manifest, annotation_file = random_run(tmp_path / "run")
    records = straightforward_records(layout, manifest, COCO_IDS)
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(records))
    expected = straightforward_stats(
        annotation_file, records_file, [e.image_id for e in manifest.images], engine
    )
    assert 0.05 < expected[0] < 0.95  # a set where matching, ties and areas all matter

    result = evaluate_outputs(layout, "npu", engine=engine)
    assert list(result["stats"].values()) == expected  # identical, not approximately equal
    written = json.loads(Path(result["detections_path"]).read_text())
    assert result["detections"] == len(written) == len(records) == 24 * 70
    for got, want in zip(written, records, strict=True):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["bbox"] == pytest.approx(want["bbox"], rel=1e-9, abs=1e-9)
        assert np.float32(got["score"]) == np.float32(want["score"])  # each float32 score exactly


def test_results_go_to_the_evaluator_in_memory(run: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The detections file is written for the record, never parsed back (loadRes is not called)."""
    import faster_coco_eval
    from pycocotools.coco import COCO

    layout, manifest = run
    write_perfect(layout, manifest)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("results must not be loaded from a file")

    monkeypatch.setattr(faster_coco_eval.COCO, "loadRes", refuse)
    monkeypatch.setattr(COCO, "loadRes", refuse)
    for engine in ("faster-coco-eval", "pycocotools"):
        assert evaluate_outputs(layout, "npu", engine=engine)["stats"]["AP"] == pytest.approx(1.0)


def test_a_candidates_shard_scores_as_its_dets(tmp_path: Path) -> None:
    """Host NMS here (kind "candidates") gives the same records and stats as the same NMS in inference."""
    from gfocal_pipeline.postprocess import multiclass_nms, pad_dets

    rng = np.random.default_rng(3)
    boxes = np.zeros((3, 40, 4), np.float32)
    for n, image_id in enumerate([7, 8, 9]):
        boxes[n] = np.asarray(to_input(GT[image_id][0]), np.float32) + rng.normal(0, 3, size=(40, 4))
    scores = (rng.uniform(size=(3, 40, 81)) ** 8).astype(np.float32)
    results = []
    for kind, backend in (("candidates", "cand"), ("dets", "dets")):
        (tmp_path / kind).mkdir()
        layout, manifest = make_run(tmp_path / kind, {"00000": [7, 8, 9]})
        arrays = {"boxes": boxes, "scores": scores}
        if kind == "dets":
            pairs = [pad_dets(multiclass_nms(boxes[n], scores[n])) for n in range(3)]
            arrays = {"dets": np.stack([p[0] for p in pairs]), "labels": np.stack([p[1] for p in pairs])}
        marker = {**_marker(manifest, "00000"), "backend": backend}
        write_shard_outputs(layout.output_shard(backend, "00000"), np.array([7, 8, 9]), arrays, kind, marker)
        result = evaluate_outputs(layout, backend)
        results.append((result["stats"], json.loads(Path(result["detections_path"]).read_text())))
    assert results[0] == results[1]
    assert results[0][1]  # NMS kept something


# --- non-finite detections and the order results are written in ----------------------------


@pytest.mark.parametrize("where", ["score", "box", "padding"])
def test_non_finite_dets_name_backend_shard_and_images(run: tuple, where: str) -> None:
    layout, manifest = run
    write_perfect(layout, manifest)
    rows = {"score": ([30.0, 60.0, 90.0, 100.0], math.nan, 3), "box": ([30.0, math.inf, 90.0, 100.0], 0.5, 3)}
    per_image = {7: perfect(7), 8: [*perfect(8), rows.get(where, ([0.0] * 4, 0.0, -1))]}
    write_dets(layout, manifest, "00000", per_image)
    if where == "padding":  # a padding row (label -1) with NaN: the outputs are broken all the same
        out = layout.output_shard("npu", "00000")
        with np.load(out / "outputs.npz") as data:
            arrays = {name: data[name] for name in data.files}
        arrays["dets"][1, 5, 0] = math.nan
        image_ids = arrays.pop("image_ids")
        write_shard_outputs(out, image_ids, arrays, "dets", json.loads((out / "done.json").read_text()))
    with pytest.raises(EvaluationError) as info:
        evaluate_outputs(layout, "npu")
    message = str(info.value)
    assert "backend 'npu', shard 00000" in message and "8 (img_8.jpg)" in message
    assert "7 (img_7.jpg)" not in message and "NaN or infinite" in message and "re-run inference" in message
    assert not layout.eval_dir("npu").exists()  # nothing written


def test_non_finite_candidates_are_an_error(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path, {"00000": [7, 8, 9]})
    boxes = np.tile(np.asarray(to_input(GT[7][0]), np.float32), (3, 5, 1))
    scores = np.full((3, 5, 81), 0.01, np.float32)
    scores[2, 4, 10] = math.inf
    arrays = {"boxes": boxes, "scores": scores}
    write_shard_outputs(
        layout.output_shard("npu", "00000"),
        np.array([7, 8, 9]),
        arrays,
        "candidates",
        _marker(manifest, "00000"),
    )
    with pytest.raises(EvaluationError, match=r"backend 'npu', shard 00000 .*1 image\(s\): 9 \(img_9\.jpg\)"):
        evaluate_outputs(layout, "npu")


def test_a_geometry_that_makes_boxes_non_finite_is_named(tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path)
    manifest.images = [
        dataclasses.replace(e, geometry=dataclasses.replace(e.geometry, scale_y=0.0))
        if e.image_id == 9
        else e
        for e in manifest.images
    ]
    manifest.write(layout.manifest)
    write_perfect(layout, manifest)
    with pytest.raises(
        EvaluationError,
        match=r"backend 'npu', shard 00001 become NaN or infinite .*9 \(img_9\.jpg\).*scale_x/scale_y",
    ):
        evaluate_outputs(layout, "npu")


def test_results_are_written_only_after_everything_is_read_and_scored(
    run: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gfocal_pipeline import evaluate as evaluate_module

    layout, manifest = run
    write_perfect(layout, manifest)
    evaluate_outputs(layout, "npu")
    before = {p.name: p.read_bytes() for p in layout.eval_dir("npu").iterdir()}
    write_dets(layout, manifest, "00001", {9: []})

    def broken(*args: object) -> None:
        raise EvaluationError("engine failed")

    monkeypatch.setattr(evaluate_module._CocoEngine, "evaluate", broken)
    with pytest.raises(EvaluationError, match="engine failed"):
        evaluate_outputs(layout, "npu")
    assert {p.name: p.read_bytes() for p in layout.eval_dir("npu").iterdir()} == before  # untouched
    monkeypatch.undo()

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_module, "_write_per_class", full_disk)
    with pytest.raises(OSError):
        evaluate_outputs(layout, "npu")
    # the new detections are there, the old stats are gone: never stale stats beside new detections
    assert sorted(p.name for p in layout.eval_dir("npu").iterdir()) == ["detections.json"]
    assert json.loads((layout.eval_dir("npu") / "detections.json").read_text())[-1]["image_id"] == 8
