"""Backend outputs -> COCO detections -> COCO bbox metrics, for one backend of one run.

Steps: read every shard of `outputs/<backend>/` (checking its done marker against that shard of the manifest:
`shard_digest`, policy, dtype, input size), turn its rows into detections (padding removal for kind
"dets", the normal case: the in-process backends run the host NMS per batch and the Ascend graph has NMS
inside; host NMS here for kind "candidates", from older outputs or a backend without NMS), map boxes
from input pixels back to the original image with the manifest geometry, map labels 0..num_classes-1
to the annotation file's category ids, and score them with faster-coco-eval (default) or
pycocotools; both give the same numbers. The run's recorded model spec decides the classes: label k
scores as the category named `classes[k]`, or without `classes` as the k-th category id (sorted, as
mmdet's `cat_ids`; the file must then have exactly `num_classes` categories); only those categories
are scored. Without a recorded spec: COCO's 80 by id, class-aware host NMS. Padding removal, rescaling,
the category mapping and xyxy -> xywh run on a whole shard's arrays at once (no per-image loop).

The detections go to the evaluator in memory: the result records are built once, with the fields
`loadRes` would add (`area` = w * h, `id` 1.., `iscrowd` 0), and indexed as its result object, so
nothing is written and parsed back before scoring. Outputs with NaN or infinity (or boxes that become
non-finite through the geometry) are an error naming the backend, shard and images.

Results are written only once everything is read and scored: `detections.json` (every record,
numbers to 10 significant digits: 1e-6 pixel at 1000 px, each float32 score exactly), then
`per_class.csv`, then `stats.json` last (stale `stats.json` and `per_class.csv` are removed first, so
a failed re-evaluation never leaves old stats beside new detections).

Rescaling is x = (x_in - pad_left) / scale_x, y = (y_in - pad_top) / scale_y without clipping to the
original image, as the ModelZoo postprocess does: clipping would change the numbers against the reference.

Only the manifest's images are evaluated (`params.imgIds`), so a run over a subset of val2017 is scored on
that subset; ground truth of other images in the annotation file does not count as missed.
Stats follow COCO's convention: -1.0 where a metric is undefined (e.g. no ground truth of that area).
stats.json records under "postprocess" which NMS produced the detections, per group of shards: the
backend's (from the done markers) or this module's host NMS with its thresholds (kind "candidates").
"""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gfocal_pipeline.constants import MAX_PER_IMG, NMS_IOU, NUM_CLASSES, SCORE_THR
from gfocal_pipeline.errors import DatasetError, EvaluationError
from gfocal_pipeline.fileio import atomic_path, sha256_file, write_json
from gfocal_pipeline.layout import KINDS, RunLayout, read_shard_outputs
from gfocal_pipeline.manifest import ImageEntry, Manifest, load_manifest
from gfocal_pipeline.postprocess import Detections, from_dets_rows, multiclass_nms

log = logging.getLogger(__name__)

ENGINES = ("faster-coco-eval", "pycocotools")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DETECTIONS_FILE = "detections.json"
PER_CLASS_FILE = "per_class.csv"
STATS_FILE = "stats.json"
# done-marker fields that must equal the manifest's, with the words used in the error message
_MARKER_FIELDS = (
    ("policy", "policy"),
    ("dtype", "dtype"),
    ("input_height", "input height"),
    ("input_width", "input width"),
    ("shard_digest", "shard digest"),
)
_LIST_LIMIT = 10
# one detections.json record; %.10g: 1e-6 pixel at 1000 px, and every float32 score exactly
_RECORD = '{"image_id":%d,"category_id":%d,"bbox":[%.10g,%.10g,%.10g,%.10g],"score":%.10g}'


@dataclass(frozen=True)
class ImageDetections:
    """All detections of a run, one row per box: original-image xyxy boxes (float64), scores
    (float32), labels 0..num_classes-1, in manifest shard order, image by image, in each image's row order."""

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def geometry_arrays(entries: list[ImageEntry]) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) of each image, each (n,4) float64 in x1,y1,x2,y2 order: an input-pixel box
    maps back to the original image as (box - offset) / scale (see `rescale_boxes`)."""
    offset = [(e.geometry.pad[0], e.geometry.pad[1]) * 2 for e in entries]
    scale = [(e.geometry.scale_x, e.geometry.scale_y) * 2 for e in entries]
    return np.array(offset, np.float64).reshape(-1, 4), np.array(scale, np.float64).reshape(-1, 4)


def _nms_settings(
    layout: RunLayout, score_thr: float | None, iou_thr: float | None, max_per_img: int | None
) -> tuple[float, float, int]:
    """The host NMS settings: those given, else the run's recorded model's, else GFocalV2's."""
    post = layout.recorded_model().get("postprocess") or {}
    return (
        float(post.get("score_thr", SCORE_THR)) if score_thr is None else score_thr,
        float(post.get("nms_iou", NMS_IOU)) if iou_thr is None else iou_thr,
        int(post.get("max_per_img", MAX_PER_IMG)) if max_per_img is None else max_per_img,
    )


def _class_settings(layout: RunLayout) -> tuple[int, tuple[str, ...] | None, bool]:
    """(num_classes, classes, class_aware) of the run's recorded model spec; without one COCO's 80
    classes in id order and class-aware NMS."""
    model = layout.recorded_model()
    post = model.get("postprocess") or {}
    classes = model.get("classes")
    return (
        int(model.get("num_classes") or NUM_CLASSES),
        None if classes is None else tuple(str(name) for name in classes),
        bool(post.get("class_aware", True)),
    )


def rescale_boxes(boxes: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(k,4) xyxy boxes in input pixels -> original-image pixels (float64), undoing pad then scale;
    `offset`/`scale` hold each box's image row of `geometry_arrays` (or one row for all)."""
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - offset) / scale


def category_ids(
    categories: list[dict[str, Any]],
    annotation_file: str | Path,
    num_classes: int = NUM_CLASSES,
    classes: tuple[str, ...] | list[str] | None = None,
) -> list[int]:
    """The category id label k scores as, for k in 0..num_classes-1: with `classes`, the id of the
    file's category named classes[k] (`_named_category_ids`); without, the k-th of the file's ids
    sorted ascending (mmdet's `cat_ids`), which must number `num_classes`."""
    if classes is not None:
        return _named_category_ids(categories, annotation_file, list(classes))
    ids = sorted(int(cat["id"]) for cat in categories)
    if len(ids) != num_classes:
        fix = (
            "use a COCO instances annotation file (e.g. instances_val2017.json)"
            if num_classes == NUM_CLASSES
            else f"use an annotation file with exactly those {num_classes} categories (label k scores as the "
            "k-th category id), or list the model's class names in its spec's `classes` (label k scores as "
            "the category named classes[k])"
        )
        coco = " COCO" if num_classes == NUM_CLASSES else ""
        raise EvaluationError(
            f"annotation file {str(annotation_file)!r} has {len(ids)} categories, but the model predicts "
            f"{num_classes}{coco} classes; {fix}"
        )
    return ids


def _class_key(name: str) -> str:
    """How class and category names compare: case-insensitively, without surrounding blanks."""
    return name.strip().casefold()


def _named_category_ids(
    categories: list[dict[str, Any]], annotation_file: str | Path, classes: list[str]
) -> list[int]:
    """The id of the file's category named classes[k], for each k; EvaluationError naming the file
    and the names that match no category, several categories, or one category twice."""
    by_name: dict[str, list[int]] = {}
    for cat in categories:
        by_name.setdefault(_class_key(str(cat.get("name", ""))), []).append(int(cat["id"]))
    where = f"annotation file {str(annotation_file)!r}"
    missing = [name for name in classes if _class_key(name) not in by_name]
    if missing:
        raise EvaluationError(
            f"{where} has no category named {', '.join(map(repr, missing))} ({len(missing)} of the model's "
            f"{len(classes)} classes); use the annotation file of the model's classes, or fix the names in "
            "its spec's `classes` (compared case-insensitively)"
        )
    ambiguous = [
        f"{name!r} (ids {by_name[_class_key(name)]})"
        for name in classes
        if len(by_name[_class_key(name)]) > 1
    ]
    if ambiguous:
        raise EvaluationError(
            f"{where} names several categories alike: {', '.join(ambiguous)}, so a class cannot be told "
            "which one it scores as; give each category its own name"
        )
    keys = [_class_key(name) for name in classes]
    twice = [name for name in classes if keys.count(_class_key(name)) > 1]
    if twice:
        raise EvaluationError(
            f"the model's classes {twice} name the same category of {where} (names compare "
            "case-insensitively); fix the spec's `classes`"
        )
    return [by_name[key][0] for key in keys]


def result_columns(dets: ImageDetections, cat_ids: list[int]) -> tuple[list[Any], ...]:
    """The COCO result fields as Python lists, converted on the whole arrays at once:
    (image_id, category_id, x, y, w, h, score), bbox xywh = [x1, y1, x2 - x1, y2 - y1]."""
    cats = np.asarray(cat_ids, dtype=np.int64)[dets.labels]
    wh = dets.boxes[:, 2:] - dets.boxes[:, :2]
    return (
        dets.image_ids.tolist(),
        cats.tolist(),
        dets.boxes[:, 0].tolist(),
        dets.boxes[:, 1].tolist(),
        wh[:, 0].tolist(),
        wh[:, 1].tolist(),
        dets.scores.astype(np.float64).tolist(),
    )


def to_coco_results(columns: tuple[list[Any], ...]) -> list[dict[str, Any]]:
    """COCO result records {image_id, category_id, bbox [x, y, w, h], score} of `result_columns`,
    with the fields `loadRes` adds for bbox results: area w * h, id 1.., iscrowd 0."""
    return [
        {
            "image_id": i,
            "category_id": c,
            "bbox": [x, y, w, h],
            "score": s,
            "area": w * h,
            "id": n,
            "iscrowd": 0,
        }
        for n, (i, c, x, y, w, h, s) in enumerate(zip(*columns, strict=True), 1)
    ]


def _expected_marker(manifest: Manifest, shard: str) -> dict[str, Any]:
    """What the done marker of `shard` must say for its outputs to belong to the manifest's inputs."""
    return {
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "input_height": manifest.input_height,
        "input_width": manifest.input_width,
        "shard_digest": manifest.shard_digest(shard),
    }


def _check_marker(
    marker: dict[str, Any], expected: dict[str, Any], manifest: Manifest, out_dir: Path
) -> None:
    if "shard_digest" not in marker:
        raise EvaluationError(
            f"outputs in {str(out_dir)!r} have no shard_digest in their done marker (written by an older "
            f"version), so they cannot be matched to the manifest {str(manifest.path)!r}; re-run inference"
        )
    for key, words in _MARKER_FIELDS:
        if marker.get(key) != expected[key]:
            raise EvaluationError(
                f"outputs in {str(out_dir)!r} were produced from a manifest with {words} {marker.get(key)!r} "
                f"but the manifest {str(manifest.path)!r} says {expected[key]!r}; re-run inference"
            )
    if marker.get("kind") not in KINDS:
        raise EvaluationError(
            f"outputs in {str(out_dir)!r} have unknown kind {marker.get('kind')!r} (expected one of "
            f"{sorted(KINDS)}); re-run inference"
        )


def _shard_rows(
    arrays: dict[str, np.ndarray], kind: str, out_dir: Path, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, ...]:
    """The arrays of one shard for `kind`, shape-checked so a bad file fails here, not inside NMS
    (candidates' scores hold at least the model's `num_classes` classes)."""
    missing = [name for name in KINDS[kind] if name not in arrays]
    if missing or "image_ids" not in arrays:
        raise EvaluationError(
            f"outputs in {str(out_dir)!r} lack arrays {missing or ['image_ids']} for kind {kind!r}; "
            "re-run inference"
        )
    first, second = (arrays[name] for name in KINDS[kind])
    n = len(arrays["image_ids"])
    if kind == "candidates":
        ok = (
            first.ndim == 3
            and first.shape[-1] == 4
            and second.ndim == 3
            and second.shape[:2] == first.shape[:2]
            and second.shape[-1] >= num_classes
        )
    else:
        second = second.reshape(len(second), -1)
        ok = first.ndim == 3 and first.shape[-1] == 5 and second.shape == first.shape[:2]
    if not ok or len(first) != n:
        raise EvaluationError(
            f"outputs in {str(out_dir)!r} have unexpected shapes {KINDS[kind][0]}={first.shape}, "
            f"{KINDS[kind][1]}={second.shape} for {n} images of kind {kind!r}; re-run inference"
        )
    return arrays["image_ids"].astype(np.int64), first, second


def _describe(ids: list[int], by_id: dict[int, ImageEntry]) -> str:
    shown = ", ".join(f"{i} ({by_id[i].file_name})" if i in by_id else str(i) for i in ids[:_LIST_LIMIT])
    more = f" and {len(ids) - _LIST_LIMIT} more" if len(ids) > _LIST_LIMIT else ""
    return shown + more


def collect_detections(
    layout: RunLayout,
    manifest: Manifest,
    backend: str,
    score_thr: float = SCORE_THR,
    iou_thr: float = NMS_IOU,
    max_per_img: int = MAX_PER_IMG,
    allow_missing: bool = False,
    num_classes: int | None = None,
    class_aware: bool | None = None,
) -> tuple[ImageDetections, list[int]]:
    """Read all shards of `backend` (one at a time) into original-image detections.

    Returns the detections and the ids of manifest images without an output row (only when
    `allow_missing`; otherwise they raise). Score/IoU/max thresholds and `class_aware` apply to kind
    "candidates" only; kind "dets" was already reduced by the backend's NMS (host NMS in the inference
    task, or in-graph). Labels at or beyond `num_classes` are dropped. `num_classes`/`class_aware`
    None: the run's recorded model's (COCO's 80, class-aware without one).
    """
    collected = read_detections(
        layout, manifest, backend, score_thr, iou_thr, max_per_img, allow_missing, num_classes, class_aware
    )
    return collected.detections, collected.missing


@dataclass(frozen=True)
class Collected:
    """What `read_detections` found: the detections, images without outputs, and how each group of
    shards was reduced (`postprocess`: [{"shards": [...], "nms": "host"|"graph"|..., thresholds}])."""

    detections: ImageDetections
    missing: list[int]
    postprocess: list[dict[str, Any]]


def _shard_postprocess(marker: dict[str, Any], here: dict[str, Any]) -> dict[str, Any]:
    """How one shard's detections were made: NMS here (kind "candidates") or as its marker records."""
    if marker["kind"] == "candidates":
        return {"where": "evaluate", **here}
    recorded = marker.get("postprocess")
    if isinstance(recorded, dict):
        return {"where": "inference", **recorded}
    return {"where": "inference", "nms": "unrecorded"}  # dets written before markers recorded it


def _group_postprocess(per_shard: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """[(shard, postprocess)] -> one entry per distinct postprocess with its shards, in shard order."""
    groups: list[dict[str, Any]] = []
    for shard, how in per_shard:
        group = next((g for g in groups if {k: v for k, v in g.items() if k != "shards"} == how), None)
        if group is None:
            groups.append({**how, "shards": [shard]})
        else:
            group["shards"].append(shard)
    return groups


def read_detections(
    layout: RunLayout,
    manifest: Manifest,
    backend: str,
    score_thr: float = SCORE_THR,
    iou_thr: float = NMS_IOU,
    max_per_img: int = MAX_PER_IMG,
    allow_missing: bool = False,
    num_classes: int | None = None,
    class_aware: bool | None = None,
) -> Collected:
    """`collect_detections` plus the record of which NMS produced the detections of each shard."""
    recorded_classes, _, recorded_aware = _class_settings(layout)
    num_classes = recorded_classes if num_classes is None else num_classes
    class_aware = recorded_aware if class_aware is None else class_aware
    by_id = manifest.by_id()
    if not layout.outputs_dir(backend).is_dir():
        raise EvaluationError(
            f"no outputs for backend {backend!r}: {str(layout.outputs_dir(backend))!r} does not exist; "
            f"run inference with backend {backend!r} first"
        )
    here = {"nms": "host", "score_thr": score_thr, "iou_thr": iou_thr, "max_per_img": max_per_img}
    if not class_aware:  # recorded only when class-agnostic: class-aware records stay as they were
        here["class_aware"] = False
    index = {entry.image_id: n for n, entry in enumerate(manifest.images)}
    offset, scale = geometry_arrays(manifest.images)
    seen: set[int] = set()
    chunks: list[ImageDetections] = []
    per_shard: list[tuple[str, dict[str, Any]]] = []
    for shard in manifest.shards:
        out_dir = layout.output_shard(backend, shard)
        marker, image_ids, first, second = _read_shard(out_dir, backend, shard, manifest, by_id, num_classes)
        per_shard.append((shard, _shard_postprocess(marker, here)))
        _check_unique(image_ids.tolist(), seen, by_id, out_dir, layout.outputs_dir(backend))
        where = _Where(backend, shard, out_dir, by_id)
        _check_finite(_non_finite_rows(first, second), image_ids, where, geometry=False)
        nms = (score_thr, iou_thr, max_per_img, num_classes, class_aware)
        rows, found = _shard_detections(first, second, marker["kind"], nms)
        geometry = np.array([index[i] for i in image_ids.tolist()], np.int64)[rows]
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero scale is named just below
            boxes = rescale_boxes(found.boxes, offset[geometry], scale[geometry])
        _check_finite(~np.isfinite(boxes).all(axis=1), image_ids[rows], where, geometry=True)
        chunks.append(ImageDetections(image_ids[rows], boxes, found.scores, found.labels))
        log.info("evaluate %s: shard %s read, %d images", backend, shard, len(image_ids))

    missing = [entry.image_id for entry in manifest.images if entry.image_id not in seen]
    _check_missing(missing, backend, by_id, allow_missing)
    warn_unlisted(layout.outputs_dir(backend), manifest, f"output folder(s) of backend {backend!r}")
    return Collected(_concatenate(chunks), missing, _group_postprocess(per_shard))


def unlisted_shards(folder: Path, manifest: Manifest, suffix: str = "") -> list[str]:
    """Names in `folder` (`<shard><suffix>`) of shards the manifest does not list, sorted."""
    if not folder.is_dir():
        return []
    names = (path.name for path in folder.iterdir() if not path.name.startswith("."))
    return sorted(
        name
        for name in names
        if name.endswith(suffix) and name[: len(name) - len(suffix)] not in manifest.shards
    )


def warn_unlisted(folder: Path, manifest: Manifest, what: str, suffix: str = "") -> list[str]:
    """Log (and return) the shards in `folder` that the manifest does not list: stale ones, from an
    earlier preprocess of the same run directory, that this step ignores."""
    stale = unlisted_shards(folder, manifest, suffix)
    if stale:
        shown = ", ".join(stale[:_LIST_LIMIT]) + (
            f" and {len(stale) - _LIST_LIMIT} more" if len(stale) > _LIST_LIMIT else ""
        )
        log.warning(
            "ignoring %d %s in %s that are not shards of the manifest %s (stale, from an earlier preprocess "
            "of this run directory): %s",
            len(stale),
            what,
            folder,
            manifest.path,
            shown,
        )
    return stale


def _shard_detections(
    first: np.ndarray, second: np.ndarray, kind: str, nms: tuple[float, float, int, int, bool]
) -> tuple[np.ndarray, Detections]:
    """(row in the shard of each detection, the detections in input pixels) of one shard's arrays:
    padding removal on the whole shard for kind "dets", host NMS image by image for "candidates";
    `nms` = (score_thr, iou_thr, max_per_img, num_classes, class_aware) of `multiclass_nms`."""
    if kind == "dets":
        return from_dets_rows(first, second, nms[3])
    parts = [multiclass_nms(first[row], second[row], *nms) for row in range(len(first))]
    rows = np.repeat(np.arange(len(parts), dtype=np.int64), [len(found) for found in parts])
    if not parts:
        return rows, Detections.empty()
    return rows, Detections(
        np.concatenate([found.boxes for found in parts]).reshape(-1, 4),
        np.concatenate([found.scores for found in parts]),
        np.concatenate([found.labels for found in parts]),
    )


def _check_unique(
    image_ids: list[int], seen: set[int], by_id: dict[int, ImageEntry], out_dir: Path, outputs: Path
) -> None:
    """Add one shard's image ids to `seen`; an image with a second output row is an error."""
    for image_id in image_ids:
        if image_id in seen:
            raise EvaluationError(
                f"image id {image_id} ({by_id[image_id].file_name}) has more than one output row "
                f"(again in {str(out_dir)!r}); delete {str(outputs)!r} and re-run inference"
            )
        seen.add(image_id)


@dataclass(frozen=True)
class _Where:
    """Which shard of which backend is being read (for error messages)."""

    backend: str
    shard: str
    out_dir: Path
    by_id: dict[int, ImageEntry]


def _non_finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Per image (first axis): True where any floating array has NaN or infinity in that image."""
    bad = np.zeros(len(arrays[0]), dtype=bool)
    for array in arrays:
        if np.issubdtype(array.dtype, np.floating):
            bad |= ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return bad


def _check_finite(bad: np.ndarray, image_ids: np.ndarray, where: _Where, geometry: bool) -> None:
    """Raise naming the backend, shard and images where `bad` (one flag per row of `image_ids`) is set:
    NaN or infinity in the outputs, or (`geometry`) in the boxes mapped back to the original image."""
    if not bad.any():
        return
    ids = np.unique(image_ids[bad]).tolist()
    named = _describe(ids, where.by_id)
    if geometry:
        raise EvaluationError(
            f"detections of backend {where.backend!r}, shard {where.shard} become NaN or infinite when "
            f"mapped back to the original image for {len(ids)} image(s): {named}; their geometry "
            "(scale_x/scale_y) in the manifest is invalid: re-run preprocessing"
        )
    raise EvaluationError(
        f"outputs of backend {where.backend!r}, shard {where.shard} have NaN or infinite values for "
        f"{len(ids)} image(s): {named} (in {str(where.out_dir)!r}); the model produced invalid numbers "
        f"(e.g. a float16 overflow on the device): re-run inference of shard {where.shard}, with a "
        "higher precision if it happens again"
    )


def _check_missing(
    missing: list[int], backend: str, by_id: dict[int, ImageEntry], allow_missing: bool
) -> None:
    """Raise for manifest images without an output row, or (with `allow_missing`) log them."""
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} manifest image(s) have no output for backend {backend!r}: "
            f"{_describe(missing, by_id)}; re-run inference for their shards "
            "(or pass allow_missing=True to count them as images without detections)"
        )
    if missing:
        log.warning(
            "evaluate %s: %d images without outputs count as empty: %s",
            backend,
            len(missing),
            _describe(missing, by_id),
        )


def _read_shard(
    out_dir: Path,
    backend: str,
    shard: str,
    manifest: Manifest,
    by_id: dict[int, ImageEntry],
    num_classes: int = NUM_CLASSES,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """(done marker, image ids, first, second output) of one finished shard, checked against that
    shard of the manifest (and candidates against the model's `num_classes`)."""
    if not out_dir.is_dir():
        raise EvaluationError(
            f"outputs of shard {shard} for backend {backend!r} are missing: {str(out_dir)!r} does not "
            f"exist; run inference for shard {shard} first"
        )
    try:
        marker, arrays = read_shard_outputs(out_dir)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from exc
    _check_marker(marker, _expected_marker(manifest, shard), manifest, out_dir)
    image_ids, first, second = _shard_rows(arrays, marker["kind"], out_dir, num_classes)
    unknown = sorted({int(i) for i in image_ids} - by_id.keys())
    if unknown:
        raise EvaluationError(
            f"outputs in {str(out_dir)!r} have rows for image ids {_describe(unknown, by_id)} that are "
            f"not in the manifest {str(manifest.path)!r}; they come from another dataset, "
            "re-run inference"
        )
    return marker, image_ids, first, second


def _concatenate(chunks: list[ImageDetections]) -> ImageDetections:
    if not chunks:
        return ImageDetections(
            np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64)
        )
    return ImageDetections(
        image_ids=np.concatenate([chunk.image_ids for chunk in chunks]).astype(np.int64, copy=False),
        boxes=np.concatenate([chunk.boxes for chunk in chunks]),
        scores=np.concatenate([chunk.scores for chunk in chunks]).astype(np.float32, copy=False),
        labels=np.concatenate([chunk.labels for chunk in chunks]).astype(np.int64, copy=False),
    )


class _CocoEngine:
    """One evaluation library behind the same three calls: load ground truth, index results, evaluate."""

    def __init__(self, engine: str) -> None:
        if engine not in ENGINES:
            raise EvaluationError(f"unknown evaluation engine {engine!r}; choose one of {list(ENGINES)}")
        self.engine = engine

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:  # pycocotools prints; keep its chatter in the debug log
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            yield
        if buffer.getvalue().strip():
            log.debug("%s: %s", self.engine, buffer.getvalue().strip())

    def load_gt(self, annotation_file: Path) -> Any:
        try:
            with self._quiet():
                if self.engine == "faster-coco-eval":
                    from faster_coco_eval import COCO

                    return COCO(str(annotation_file), print_function=log.debug)
                from pycocotools.coco import COCO

                return COCO(str(annotation_file))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise EvaluationError(
                f"annotation file {str(annotation_file)!r} is not a readable COCO annotation file ({exc}); "
                "pass the instances_*.json the manifest was built from"
            ) from exc

    def results(self, gt: Any, records: list[dict[str, Any]]) -> Any:
        """The result object `gt.loadRes(records)` builds, from records that already carry the
        fields loadRes adds (`to_coco_results`): the images and categories of `gt`, indexed once.
        No per-record pass, no JSON round trip, and no result is too small (pycocotools' loadRes
        fails on an empty list)."""
        if self.engine == "faster-coco-eval":
            from faster_coco_eval import COCO

            dt = COCO(print_function=log.debug)
        else:
            from pycocotools.coco import COCO

            dt = COCO()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": records,
        }
        with self._quiet():
            dt.createIndex()
        return dt

    def evaluate(
        self, gt: Any, dt: Any, image_ids: list[int], cat_ids: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(12 summary stats, per-category AP over IoU .50:.95, area all, maxDets 100 (nan without GT)
        in `cat_ids` order), scoring the categories `cat_ids` only (the model's classes)."""
        with self._quiet():
            if self.engine == "faster-coco-eval":
                from faster_coco_eval import COCOeval_faster

                coco_eval = COCOeval_faster(gt, dt, "bbox", print_function=log.debug)
            else:
                from pycocotools.cocoeval import COCOeval

                coco_eval = COCOeval(gt, dt, "bbox")
            coco_eval.params.imgIds = sorted(image_ids)
            coco_eval.params.catIds = sorted(cat_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        params = coco_eval.params
        precision = np.asarray(coco_eval.eval["precision"])  # (iou, recall, category, area, maxDets)
        per_iou_recall = precision[:, :, :, params.areaRngLbl.index("all"), params.maxDets.index(100)]
        valid = per_iou_recall > -1
        counts = valid.sum(axis=(0, 1))
        sums = np.where(valid, per_iou_recall, 0.0).sum(axis=(0, 1))
        per_class = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        per_class = per_class[np.searchsorted(sorted(cat_ids), cat_ids)]  # sorted ids -> cat_ids order
        return np.asarray(coco_eval.stats[: len(STAT_NAMES)], dtype=np.float64), per_class


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while the records are built and scored: a full run is
    ~500k dicts, and the collector's passes over them cost several times building them (they hold
    no reference cycles; everything is freed by reference counting when evaluation returns)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_detections(path: Path, columns: tuple[list[Any], ...]) -> Path:
    """`detections.json`: one {image_id, category_id, bbox, score} record per detection, formatted
    from `result_columns` (numbers to 10 significant digits) in one pass, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii") as handle:
        handle.write("[")
        handle.write(",".join(map(_RECORD.__mod__, zip(*columns, strict=True))))
        handle.write("]")
    return path


def _write_per_class(path: Path, rows: list[dict[str, Any]]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category_id", "name", "AP"])
        for row in rows:
            writer.writerow([row["category_id"], row["name"], "" if row["AP"] is None else repr(row["AP"])])
    return path


def evaluate_outputs(
    run_dir: str | Path | RunLayout,
    backend: str,
    annotation_file: str | Path | None = None,
    engine: str = "faster-coco-eval",
    allow_missing: bool = False,
    score_thr: float | None = None,
    iou_thr: float | None = None,
    max_per_img: int | None = None,
) -> dict[str, Any]:
    """Evaluate `outputs/<backend>/` of a run against COCO ground truth; write `eval/<backend>/`:
    detections.json, per_class.csv, stats.json (last), atomically. Returns the XCom dict: backend,
    engine, images, detections, missing_images, stats (the 12 COCO numbers by name), the three paths.
    `annotation_file` defaults to the manifest's; the host NMS settings (for candidate shards) to the
    run's recorded model spec, else GFocalV2's; the classes (`category_ids`) and the NMS's class
    awareness are always the recorded spec's (COCO's 80, class-aware without one)."""
    layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout.at(run_dir)
    score_thr, iou_thr, max_per_img = _nms_settings(layout, score_thr, iou_thr, max_per_img)
    num_classes, classes, class_aware = _class_settings(layout)
    coco = _CocoEngine(engine)
    manifest, annotation_file = _manifest_and_annotations(layout, annotation_file)
    gt = coco.load_gt(annotation_file)
    cat_ids = category_ids(gt.loadCats(gt.getCatIds()), annotation_file, num_classes, classes)
    names = {int(cat["id"]): str(cat.get("name", "")) for cat in gt.loadCats(cat_ids)}
    image_ids = _annotated_image_ids(manifest, gt, annotation_file)

    collected = read_detections(
        layout, manifest, backend, score_thr, iou_thr, max_per_img, allow_missing, num_classes, class_aware
    )
    columns = result_columns(collected.detections, cat_ids)
    with _gc_paused():
        records = coco.results(gt, to_coco_results(columns))
        stats_array, per_class_ap = coco.evaluate(gt, records, image_ids, cat_ids)
    result = {
        "backend": backend,
        "engine": engine,
        "images": len(image_ids),
        "detections": len(collected.detections),
        "missing_images": len(collected.missing),
        "stats": {name: float(value) for name, value in zip(STAT_NAMES, stats_array, strict=True)},
    }
    # score_thr/iou_thr/max_per_img: this step's host NMS (kind "candidates" only); "postprocess" says
    # which NMS and thresholds produced the detections of each group of shards
    facts = {
        "annotation_file": str(annotation_file),
        "manifest_sha256": manifest.sha256,
        "score_thr": score_thr,
        "iou_thr": iou_thr,
        "max_per_img": max_per_img,
        "postprocess": collected.postprocess,
    }
    per_class = _per_class_rows(cat_ids, names, per_class_ap)
    result = _write_results(layout.eval_dir(backend), columns, per_class, result, facts)
    _log_result(result)
    return result


def _write_results(
    eval_dir: Path,
    columns: tuple[list[Any], ...],
    per_class: list[dict[str, Any]],
    result: dict[str, Any],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """Write detections.json, per_class.csv, then stats.json (`result`, `facts`, per_class) into
    `eval_dir`; the old summaries go first, so an interrupted write never leaves stale stats beside
    new detections. Returns `result` with the three paths."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATS_FILE, PER_CLASS_FILE):
        (eval_dir / stale).unlink(missing_ok=True)
    detections_path = _write_detections(eval_dir / DETECTIONS_FILE, columns)
    per_class_path = _write_per_class(eval_dir / PER_CLASS_FILE, per_class)
    result = {
        **result,
        "detections_path": str(detections_path),
        "per_class_path": str(per_class_path),
        "stats_path": str(eval_dir / STATS_FILE),
    }
    write_json(eval_dir / STATS_FILE, {**result, **facts, "per_class": per_class})
    return result


def _annotated_image_ids(manifest: Manifest, gt: Any, annotation_file: Path) -> list[int]:
    """The manifest's image ids, in manifest order; each must be an image of the annotation file."""
    image_ids = [entry.image_id for entry in manifest.images]
    unknown = sorted(set(image_ids) - set(gt.getImgIds()))
    if unknown:
        raise EvaluationError(
            f"manifest image ids {_describe(unknown, manifest.by_id())} are not in annotation file "
            f"{str(annotation_file)!r}; evaluate with the annotation file the manifest was built from"
        )
    return image_ids


def _per_class_rows(
    cat_ids: list[int], names: dict[int, str], per_class_ap: np.ndarray
) -> list[dict[str, Any]]:
    """One {category_id, name, AP} row per category; AP None where the category has no ground truth."""
    return [
        {"category_id": cat, "name": names[cat], "AP": None if math.isnan(ap) else float(ap)}
        for cat, ap in zip(cat_ids, per_class_ap.tolist(), strict=True)
    ]


def _log_result(result: dict[str, Any]) -> None:
    """Log the one-line summary of an evaluation result."""
    shown = ", ".join(f"{name} {value:.3f}" for name, value in result["stats"].items())
    log.info(
        "evaluate %s (%s): %d images, %d detections, %s",
        result["backend"],
        result["engine"],
        result["images"],
        result["detections"],
        shown,
    )


def _manifest_and_annotations(layout: RunLayout, annotation_file: str | Path | None) -> tuple[Manifest, Path]:
    """The run's manifest and the annotation file to score against (default: the manifest's), which
    must be the file preprocessing recorded (`check_annotation_file`)."""
    try:
        manifest = load_manifest(layout.manifest)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from exc
    path = Path(annotation_file or manifest.annotation_file)
    if not path.is_file():
        raise EvaluationError(
            f"annotation file {str(path)!r} does not exist; pass annotation_file= or fix the "
            f"coco root of the manifest {str(manifest.path)!r}"
        )
    check_annotation_file(manifest, path)
    return manifest, path


def check_annotation_file(manifest: Manifest, path: Path) -> None:
    """Refuse an annotation file whose sha256 is not the one the manifest recorded at preprocessing:
    an edited or replaced file would be scored, and filed under the old dataset's history key.
    A manifest without the hash (written by an older version) is only logged."""
    if not manifest.annotation_sha256:
        log.warning(
            "manifest %s records no annotation sha256 (an older version wrote it): cannot check that %s "
            "is the annotation file it was built from",
            manifest.path,
            path,
        )
        return
    try:
        found = sha256_file(path)
    except OSError as exc:
        raise EvaluationError(
            f"annotation file {str(path)!r} cannot be read ({exc.strerror or exc})"
        ) from exc
    if found != manifest.annotation_sha256:
        raise EvaluationError(
            f"annotation file {str(path)!r} has sha256 {found} but the manifest {str(manifest.path)!r} was "
            f"built from one with sha256 {manifest.annotation_sha256}: it was edited or replaced after "
            "preprocessing; re-run preprocess (trigger a new run) to score against it, or restore the "
            "original file"
        )
