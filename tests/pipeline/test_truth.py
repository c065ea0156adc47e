"""The truth of the numbers: head outputs built to decode exactly onto the ground truth must score AP 1.

Ground-truth boxes (original image pixels) are mapped into a 256x320 input canvas with hand-written
letterbox geometry, then turned into raw head outputs by inverting the integral decode: one anchor per box
gets a two-hot distance distribution whose expectation is the exact distance, and probability 0.9 for the
box's class. Those go through the real `decode_candidates`, the shared output layout and
`evaluate_outputs`. Perturbed outputs then check both engines against pycocotools run here, independently.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from support import shard_marker

from gfocal_pipeline.constants import CLS_OUT_CHANNELS, NUM_CLASSES, REG_MAX, STRIDES
from gfocal_pipeline.evaluate import STAT_NAMES, evaluate_outputs
from gfocal_pipeline.layout import RunLayout, write_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest
from gfocal_pipeline.models.gfocalv2.decode import decode_candidates, level_sizes

HEIGHT, WIDTH = 256, 320
# the 80 COCO category ids: 1..90 without the ten unused ones (gaps exercise the label -> id mapping)
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]

# image id -> (width, height, scale_x, scale_y, resized (w, h), pad (l, t, r, b),
#              GT [(x1, y1, x2, y2, label)] in original pixels)
IMAGES = {
    11: (
        320,
        256,
        1.0,
        1.0,
        (320, 256),
        (0, 0, 0, 0),
        [(20, 30, 44, 50, 0), (100, 60, 180, 140, 5), (200, 20, 310, 240, 79)],
    ),
    22: (640, 480, 0.5, 0.5, (320, 240), (0, 0, 0, 16), [(40, 40, 100, 90, 1), (300, 200, 620, 470, 10)]),
    33: (200, 100, 1.6, 1.6, (320, 160), (0, 48, 0, 48), [(10, 10, 30, 25, 2), (100, 20, 190, 95, 2)]),
    44: (200, 160, 1.5, 1.25, (300, 200), (10, 28, 10, 28), [(20, 20, 60, 80, 40), (120, 100, 190, 150, 70)]),
    55: (320, 256, 1.0, 1.0, (320, 256), (0, 0, 0, 0), []),  # no ground truth at all
}
SHARDS = {"00000": [11, 22], "00001": [33, 44, 55]}


def write_annotations(path: Path) -> Path:
    images, annotations = [], []
    for image_id, (width, height, *_, boxes) in IMAGES.items():
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        for x1, y1, x2, y2, label in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": COCO_IDS[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cat, "name": f"class_{cat}", "supercategory": "thing"} for cat in COCO_IDS]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_manifest(layout: RunLayout, annotation_file: Path) -> Manifest:
    entries = []
    for shard, ids in SHARDS.items():
        for image_id in ids:
            width, height, sx, sy, resized, pad, _ = IMAGES[image_id]
            entries.append(
                ImageEntry(
                    image_id,
                    f"{image_id:012d}.jpg",
                    shard,
                    Geometry(width, height, sx, sy, resized[0], resized[1], pad),
                )
            )
    manifest = Manifest(
        policy="letterbox",
        dtype="float32",
        input_height=HEIGHT,
        input_width=WIDTH,
        shard_size=3,
        coco_root=str(layout.root),
        annotation_file=str(annotation_file),
        image_dir=str(layout.root / "val"),
        images=entries,
        shards=SHARDS,
    )
    manifest.write(layout.manifest)
    return manifest


def two_hot_logits(distance: float) -> np.ndarray:
    """17 logits whose softmax puts mass on floor/ceil bins so that the expectation is `distance`."""
    low = min(math.floor(distance), REG_MAX)
    frac = distance - low
    logits = np.full(REG_MAX + 1, -1e4)
    logits[low] = math.log(1.0 - frac)
    if frac > 0:
        logits[low + 1] = math.log(frac)
    return logits


def choose_anchor(box: tuple[float, float, float, float], taken: set) -> tuple[int, int, int]:
    """(level, row, col) of the grid point nearest the box centre on the finest level reaching the box."""
    x1, y1, x2, y2 = box
    for level, ((h, w), stride) in enumerate(zip(level_sizes(HEIGHT, WIDTH), STRIDES, strict=True)):
        col = min(max(round((x1 + x2) / 2 / stride), 0), w - 1)
        row = min(max(round((y1 + y2) / 2 / stride), 0), h - 1)
        ax, ay = col * stride, row * stride
        inside = x1 < ax < x2 and y1 < ay < y2
        reach = max(ax - x1, ay - y1, x2 - ax, y2 - ay) / stride <= REG_MAX
        if inside and reach and (level, row, col) not in taken:
            return level, row, col
    raise AssertionError(f"no anchor can represent box {box}")


def input_box(image_id: int, box: tuple) -> tuple[float, float, float, float]:
    _, _, sx, sy, _, pad, _ = IMAGES[image_id]
    x1, y1, x2, y2 = box[:4]
    return (x1 * sx + pad[0], y1 * sy + pad[1], x2 * sx + pad[0], y2 * sy + pad[1])


def head_outputs(image_ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Raw cls (probabilities) and bbox-distribution maps for a batch, exact for every GT box."""
    sizes = level_sizes(HEIGHT, WIDTH)
    cls = [np.zeros((len(image_ids), CLS_OUT_CHANNELS, h, w), np.float32) for h, w in sizes]
    reg = [np.zeros((len(image_ids), 4 * (REG_MAX + 1), h, w), np.float32) for h, w in sizes]
    for n, image_id in enumerate(image_ids):
        taken: set = set()
        for box in IMAGES[image_id][6]:
            x1, y1, x2, y2 = input_box(image_id, box)
            level, row, col = choose_anchor((x1, y1, x2, y2), taken)
            taken.add((level, row, col))
            stride = STRIDES[level]
            ax, ay = col * stride, row * stride
            for side, dist in enumerate((ax - x1, ay - y1, x2 - ax, y2 - ay)):
                reg[level][n, side * (REG_MAX + 1) : (side + 1) * (REG_MAX + 1), row, col] = two_hot_logits(
                    dist / stride
                )
            cls[level][n, box[4], row, col] = 0.9
    return [torch.from_numpy(a) for a in cls], [torch.from_numpy(a) for a in reg]


def exact_candidates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """shard -> (boxes (N,K,4), scores (N,K,80)) decoded by the project's own decoder."""
    result = {}
    for shard, ids in SHARDS.items():
        cls, reg = head_outputs(ids)
        with torch.no_grad():
            boxes, scores = decode_candidates(cls, reg, HEIGHT, WIDTH)
        result[shard] = (
            boxes.numpy().astype(np.float32),
            scores[..., :NUM_CLASSES].numpy().astype(np.float32),
        )
    return result


def write_outputs(layout: RunLayout, manifest: Manifest, backend: str, candidates: dict) -> None:
    for shard, (boxes, scores) in candidates.items():
        marker = {**shard_marker(manifest, backend, shard), "manifest_sha256": manifest.sha256}
        write_shard_outputs(
            layout.output_shard(backend, shard),
            np.asarray(SHARDS[shard]),
            {"boxes": boxes, "scores": scores},
            "candidates",
            marker,
        )


def perturb(candidates: dict, seed: int = 0) -> dict:
    """Jitter and rescore every true box, drop one, give one the wrong class, add false positives."""
    rng = np.random.default_rng(seed)
    out = {}
    for shard, (boxes, scores) in candidates.items():
        boxes, scores = boxes.copy(), scores.copy()
        for n, image_id in enumerate(SHARDS[shard]):
            true_rows = np.flatnonzero(scores[n].max(axis=1) > 0.5)
            size = np.tile(boxes[n, true_rows, 2:] - boxes[n, true_rows, :2], 2)
            boxes[n, true_rows] += (rng.normal(0.0, 0.05, size.shape) * size).astype(np.float32)
            scores[n, true_rows] *= rng.uniform(0.55, 1.0, (len(true_rows), 1)).astype(np.float32)
            if image_id == 11:
                scores[n, true_rows[0]] = 0.0  # dropped
            if image_id == 44:
                row = true_rows[1]
                label = int(scores[n, row].argmax())
                scores[n, row, (label + 1) % NUM_CLASSES] = scores[n, row, label]  # wrong class
                scores[n, row, label] = 0.0
            free = rng.choice(np.flatnonzero(scores[n].max(axis=1) == 0.0), 6, replace=False)
            xy = rng.uniform(0, [WIDTH - 40, HEIGHT - 40], (6, 2))
            boxes[n, free] = np.concatenate([xy, xy + rng.uniform(8, 40, (6, 2))], axis=1)
            labels = rng.choice([0, 1, 2, 5, 10, 40, 70, 79], 6)
            scores[n, free, labels] = rng.uniform(0.06, 0.85, 6)
            if len(true_rows) >= 3:  # a shifted duplicate of a true box: suppressed or a false positive
                boxes[n, free[0]] = boxes[n, true_rows[2]] + 3.0
                scores[n, free[0], :] = 0.0
                scores[n, free[0], int(scores[n, true_rows[2]].argmax())] = 0.5
        out[shard] = (boxes, scores)
    return out


def independent_pycocotools(annotation_file: Path, detections_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """12 stats + per-category AP (IoU .50:.95, area all, maxDets 100) straight from pycocotools."""
    gt = COCO(str(annotation_file))
    detections = json.loads(detections_path.read_text())
    dt = gt.loadRes(detections)
    coco_eval = COCOeval(gt, dt, "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    per_class = []
    for k in range(len(coco_eval.params.catIds)):
        precision = coco_eval.eval["precision"][:, :, k, 0, -1]
        valid = precision[precision > -1]
        per_class.append(float(valid.mean()) if valid.size else math.nan)
    return np.asarray(coco_eval.stats), np.asarray(per_class)


def read_per_class(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLayout, Manifest, Path, dict]:
    root = tmp_path_factory.mktemp("truth")
    layout = RunLayout.at(root)
    annotation_file = write_annotations(root / "instances_truth.json")
    manifest = write_manifest(layout, annotation_file)
    candidates = exact_candidates()
    write_outputs(layout, manifest, "exact", candidates)
    write_outputs(layout, manifest, "perturbed", perturb(candidates))
    return layout, manifest, annotation_file, candidates


@pytest.mark.parametrize("engine", ["faster-coco-eval", "pycocotools"])
def test_exact_outputs_score_ap_one(run: tuple, engine: str) -> None:
    layout = run[0]
    result = evaluate_outputs(layout, "exact", engine=engine)
    n_gt = sum(len(spec[6]) for spec in IMAGES.values())
    assert result["detections"] == n_gt
    assert result["images"] == len(IMAGES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert result["stats"][name] == pytest.approx(1.0, abs=1e-6), name
    # per-class AP is 1 exactly for classes with ground truth, empty for the others
    rows = read_per_class(result["per_class_path"])
    assert [int(r["category_id"]) for r in rows] == COCO_IDS
    with_gt = {COCO_IDS[box[4]] for spec in IMAGES.values() for box in spec[6]}
    for r in rows:
        if int(r["category_id"]) in with_gt:
            assert float(r["AP"]) == pytest.approx(1.0, abs=1e-6)
        else:
            assert r["AP"] == ""
    stats_file = json.loads(Path(result["stats_path"]).read_text())
    assert stats_file["stats"] == result["stats"]
    assert stats_file["engine"] == engine


def test_exact_outputs_map_back_to_original_coordinates(run: tuple) -> None:
    """Letterbox geometry (scale != 1, anisotropic, top/left padding) is undone exactly."""
    layout, _, _, _ = run
    result = evaluate_outputs(layout, "exact")
    detections = json.loads(Path(result["detections_path"]).read_text())
    for image_id, spec in IMAGES.items():
        mine = [d for d in detections if d["image_id"] == image_id]
        assert len(mine) == len(spec[6])
        for x1, y1, x2, y2, label in spec[6]:
            matches = [
                d
                for d in mine
                if d["category_id"] == COCO_IDS[label]
                and np.allclose(d["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=2e-3)
            ]
            assert len(matches) == 1, (image_id, (x1, y1, x2, y2))
            assert matches[0]["score"] == pytest.approx(0.9, abs=1e-6)


def test_engines_agree_with_independent_pycocotools_on_perturbed_outputs(run: tuple) -> None:
    layout, _, annotation_file, _ = run
    fast = evaluate_outputs(layout, "perturbed", engine="faster-coco-eval")
    fast_rows = read_per_class(fast["per_class_path"])
    slow = evaluate_outputs(layout, "perturbed", engine="pycocotools")
    slow_rows = read_per_class(slow["per_class_path"])
    assert 0.05 < fast["stats"]["AP"] < 0.95  # the perturbations really changed the score
    assert fast["detections"] == slow["detections"]
    for name in STAT_NAMES:
        assert fast["stats"][name] == pytest.approx(slow["stats"][name], abs=1e-4), name

    stats, per_class = independent_pycocotools(annotation_file, Path(slow["detections_path"]))
    for name, value in zip(STAT_NAMES, stats, strict=True):
        assert slow["stats"][name] == pytest.approx(float(value), abs=1e-12), name
        assert fast["stats"][name] == pytest.approx(float(value), abs=1e-4), name
    for rows in (slow_rows, fast_rows):
        for row, expected in zip(rows, per_class, strict=True):
            if math.isnan(expected):
                assert row["AP"] == ""
            else:
                assert float(row["AP"]) == pytest.approx(expected, abs=1e-4)
