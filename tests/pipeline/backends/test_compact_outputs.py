"""In-process backends write compact final detections (host NMS per batch) instead of raw candidates.

Real ONNX Runtime sessions on a GFocalV2 graph exported here from a checkpoint whose classifier is
confident for three classes (random weights alone give no score above 0.05, so NMS would keep
nothing and every check below would hold trivially).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from emulators.checkpoints import confident_checkpoint
from test_backends import SHARDS, H, W, export, make_run, ort_backend, tiny_graph

from gfocal_pipeline.backends.base import CANDIDATES_FILE
from gfocal_pipeline.backends.registry import get_backend
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import RunLayout, read_shard_outputs, shard_done, write_shard_outputs
from gfocal_pipeline.manifest import Manifest, load_manifest
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model

# COCO's 80 category ids (1..90 with ten gaps); label k is the k-th smallest
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
OFFICIAL = {"nms": "host", "score_thr": 0.05, "iou_thr": 0.6, "max_per_img": 100}


@pytest.fixture(scope="module")
def confident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("confident")
    network = load_model(confident_checkpoint(root / "confident.pth"))
    return export(network, root / "confident.onnx", uint8=False, dynamic=True)


def infer_all(backend, layout: RunLayout, manifest: Manifest) -> dict[str, bool]:
    """Run every shard; {shard: reused}."""
    return {shard: backend.infer_shard(layout, manifest, shard).reused for shard in manifest.shards}


def write_ground_truth(path: Path, manifest: Manifest, kept: dict[str, dict[str, np.ndarray]]) -> Path:
    """Per image: the best raw candidate box of classes 0 and 1, moved by a pixel, as ground truth of
    those classes, plus a class-2 box in a corner. Built from the model's raw outputs, so some
    detections match and many do not (AP strictly between 0 and 1)."""
    rng = np.random.default_rng(0)
    annotations = []
    for arrays in kept.values():
        for row, image_id in enumerate(arrays["image_ids"].tolist()):
            for label in (0, 1):
                best = int(np.argmax(arrays["scores"][row, :, label]))
                x1, y1, x2, y2 = (arrays["boxes"][row, best] + rng.uniform(-1, 1, 4)).tolist()
                annotations.append((image_id, label, [x1, y1, max(x2 - x1, 1.0), max(y2 - y1, 1.0)]))
            annotations.append((image_id, 2, [0.0, 0.0, 6.0, 6.0]))
    data = {
        "images": [
            {"id": e.image_id, "file_name": e.file_name, "width": W, "height": H} for e in manifest.images
        ],
        "annotations": [
            {
                "id": n + 1,
                "image_id": image_id,
                "category_id": COCO_IDS[label],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            for n, (image_id, label, bbox) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in COCO_IDS],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_dets_evaluate_to_the_same_stats_as_host_nms_of_the_kept_candidates(
    tmp_path: Path, confident: Path
) -> None:
    coco = tmp_path / "coco"
    layout, manifest = make_run(tmp_path / "run", SHARDS, coco_root=str(coco))
    backend = ort_backend(confident, batch_size=2, keep_candidates=True)
    infer_all(backend, layout, manifest)
    kept = {}
    for shard, ids in manifest.shards.items():
        with np.load(layout.output_shard("onnxruntime", shard) / CANDIDATES_FILE) as data:
            kept[shard] = {name: data[name] for name in data.files}
        assert kept[shard]["image_ids"].tolist() == ids
        assert kept[shard]["scores"].shape[-1] == 80 and kept[shard]["boxes"].shape[-1] == 4
    write_ground_truth(Path(manifest.annotation_file), manifest, kept)

    # the previous path: the same candidates written as kind "candidates", NMS run by the evaluation
    for shard in manifest.shards:
        marker = shard_done(layout.output_shard("onnxruntime", shard))
        assert marker is not None
        inputs = {
            k: v for k, v in marker.items() if k not in ("kind", "output_names", "images", "postprocess")
        }
        arrays = {"boxes": kept[shard]["boxes"], "scores": kept[shard]["scores"]}
        write_shard_outputs(
            layout.output_shard("old", shard), kept[shard]["image_ids"], arrays, "candidates", inputs
        )
    new, old = evaluate_outputs(layout, "onnxruntime"), evaluate_outputs(layout, "old")

    assert len(new["stats"]) == 12 and new["stats"] == old["stats"]
    assert 0.0 < new["stats"]["AP"] < 1.0 and 0.0 < new["stats"]["AR100"] <= 1.0
    assert new["detections"] == old["detections"] > len(manifest.images)
    new_dets = json.loads(Path(new["detections_path"]).read_text())
    assert new_dets == json.loads(Path(old["detections_path"]).read_text())
    # stats.json says which NMS made the detections: the inference task's here, the evaluation's there
    new_post = json.loads(Path(new["stats_path"]).read_text())["postprocess"]
    old_post = json.loads(Path(old["stats_path"]).read_text())["postprocess"]
    assert new_post == [{**OFFICIAL, "where": "inference", "shards": ["00000", "00001"]}]
    assert old_post == [{**OFFICIAL, "where": "evaluate", "shards": ["00000", "00001"]}]


def test_dets_outputs_are_small_and_no_candidates_are_written_by_default(
    tmp_path: Path, confident: Path
) -> None:
    layout, manifest = make_run(tmp_path, SHARDS)
    result = ort_backend(confident, batch_size=2).infer_shard(layout, manifest, "00000")
    out_dir = layout.output_shard("onnxruntime", "00000")
    size = (out_dir / "outputs.npz").stat().st_size
    assert (result.kind, result.output_bytes) == ("dets", size)
    assert size / 3 < 20_000  # vs ~1.1 MB of candidates per image at 800x1216
    assert not (out_dir / CANDIDATES_FILE).exists()
    facts = result.to_dict()
    assert (facts["kind"], facts["output_bytes"]) == ("dets", size)
    json.dumps(facts)

    marker, arrays = read_shard_outputs(out_dir)
    assert marker["kind"] == "dets" and marker["postprocess"] == OFFICIAL
    assert marker["keep_candidates"] is False
    dets, labels = arrays["dets"], arrays["labels"]
    assert dets.shape == (3, 100, 5) and dets.dtype == np.float32
    assert labels.shape == (3, 100) and labels.dtype == np.int64
    valid = labels >= 0
    assert valid.sum(axis=1).min() > 0  # every image has detections
    assert set(np.unique(labels[valid]).tolist()) <= {0, 1, 2}  # the classes the checkpoint is sure of
    assert (dets[valid][:, 4] > 0.05).all()
    assert (dets[~valid] == 0).all()  # padding rows: all zero, label -1
    for row in range(3):  # detections first, best score first
        count = int(valid[row].sum())
        assert valid[row, :count].all()
        assert (np.diff(dets[row, :count, 4]) <= 0).all()


def test_a_changed_image_recomputes_only_its_shard(tmp_path: Path, confident: Path) -> None:
    layout, manifest = make_run(tmp_path, SHARDS)
    backend = ort_backend(confident, batch_size=2)
    assert infer_all(backend, layout, manifest) == {"00000": False, "00001": False}
    stamps = {s: (layout.output_shard("onnxruntime", s) / "done.json").stat().st_mtime_ns for s in SHARDS}
    digests = {s: manifest.shard_digest(s) for s in SHARDS}

    # image 724 (shard 00001) was replaced by another file: rewrite the manifest with its new hash
    manifest.images = [
        dataclasses.replace(entry, sha256="f" * 64) if entry.image_id == 724 else entry
        for entry in manifest.images
    ]
    manifest.write(layout.manifest)
    changed = load_manifest(layout.manifest)
    assert changed.shard_digest("00000") == digests["00000"] != digests["00001"]  # preconditions
    assert changed.shard_digest("00001") != digests["00001"]
    assert infer_all(backend, layout, changed) == {"00000": True, "00001": False}
    done = {s: layout.output_shard("onnxruntime", s) / "done.json" for s in SHARDS}
    assert done["00000"].stat().st_mtime_ns == stamps["00000"]
    assert done["00001"].stat().st_mtime_ns != stamps["00001"]
    assert json.loads(done["00001"].read_text())["shard_digest"] == changed.shard_digest("00001")
    assert infer_all(backend, layout, changed) == {"00000": True, "00001": True}


def test_other_nms_settings_or_keep_candidates_recompute(tmp_path: Path, confident: Path) -> None:
    layout, manifest = make_run(tmp_path, {"00000": [1, 2]})
    out_dir = layout.output_shard("onnxruntime", "00000")
    assert infer_all(ort_backend(confident), layout, manifest) == {"00000": False}
    default = read_shard_outputs(out_dir)[1]
    default_count = int((default["labels"] >= 0).sum())
    # a threshold inside the range of the scores the defaults kept, so it really removes some
    threshold = round(float(np.median(default["dets"][default["labels"] >= 0][:, 4])), 4)

    strict = get_backend(
        "onnxruntime",
        model=confident,
        intra_op_num_threads=1,
        score_thr=threshold,
        iou_thr=0.3,
        max_per_img=7,
    )
    assert infer_all(strict, layout, manifest) == {"00000": False}
    marker, arrays = read_shard_outputs(out_dir)
    assert marker["postprocess"] == {"nms": "host", "score_thr": threshold, "iou_thr": 0.3, "max_per_img": 7}
    assert arrays["dets"].shape == (2, 7, 5) and arrays["labels"].shape == (2, 7)
    valid = arrays["labels"] >= 0
    assert (arrays["dets"][valid][:, 4] > threshold).all()
    assert 0 < valid.sum() < default_count
    assert infer_all(strict, layout, manifest) == {"00000": True}
    # back to the defaults: the strict outputs are not reused either
    assert infer_all(ort_backend(confident), layout, manifest) == {"00000": False}

    # asking for the candidates recomputes once (they were not kept), then reuses them
    keeping = ort_backend(confident, keep_candidates=True)
    assert infer_all(keeping, layout, manifest) == {"00000": False}
    assert (out_dir / CANDIDATES_FILE).is_file()
    assert infer_all(keeping, layout, manifest) == {"00000": True}
    # a recompute without keep_candidates removes the candidates of the earlier computation
    assert infer_all(ort_backend(confident, max_per_img=50), layout, manifest) == {"00000": False}
    assert not (out_dir / CANDIDATES_FILE).exists()


def test_inputs_are_read_from_the_manifests_input_folder(tmp_path: Path, confident: Path) -> None:
    layout, manifest = make_run(tmp_path / "run", {"00000": [3, 4]})
    ort_backend(confident).infer_shard(layout, manifest, "00000")
    expected = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))[1]

    cache = tmp_path / "inputs-cache"
    layout.inputs_dir.rename(cache)  # nothing left under the run directory's inputs/
    moved = RunLayout.at(tmp_path / "other-run")
    manifest.inputs_root = str(cache)
    manifest.write(moved.manifest)
    result = ort_backend(confident).infer_shard(moved, load_manifest(moved.manifest), "00000")
    assert result.reused is False
    arrays = read_shard_outputs(moved.output_shard("onnxruntime", "00000"))[1]
    np.testing.assert_array_equal(arrays["labels"], expected["labels"])
    np.testing.assert_allclose(arrays["dets"], expected["dets"], atol=1e-5, rtol=0)


def test_bad_postprocess_options_are_refused(tmp_path: Path, confident: Path) -> None:
    for options, message in (
        ({"score_thr": 1.5}, r"score_thr must be in \[0, 1\), got 1.5"),
        ({"score_thr": "0.1"}, "score_thr must be a number"),
        ({"iou_thr": 0}, r"iou_thr must be in \(0, 1\]"),
        ({"max_per_img": 0}, "max_per_img must be an integer >= 1"),
        ({"keep_candidates": "yes"}, "keep_candidates must be true or false"),
    ):
        with pytest.raises(BackendError, match=message):
            get_backend("onnxruntime", model=confident, **options)
    with pytest.raises(BackendError, match="bad options for backend 'onnxruntime'"):
        get_backend("onnxruntime", model=confident, nms_iou=0.5)

    graph = tiny_graph(
        tmp_path / "dets.onnx",
        {"dets": (onnx.TensorProto.FLOAT, [100, 5]), "labels": (onnx.TensorProto.INT64, [100])},
    )
    with pytest.raises(BackendError, match=r"keep_candidates=True but .*dets\.onnx.* outputs dets"):
        ort_backend(graph, keep_candidates=True)
