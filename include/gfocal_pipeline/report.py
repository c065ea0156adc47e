"""The regression report of one run: which classes, sizes and images changed, with pictures.

Written by the gate task after its verdict (and by `gfocal report --run-dir`), for passing and failing
runs alike, into `<run_dir>/report/` (kept by retention, a few hundred KB):

    report.json        per-class AP of the device vs the PyTorch reference of the same run and vs the
                       median of the gate's baseline runs (their `eval/<backend>/stats.json`), sorted by
                       the largest drop; AP/AR by object size; the images that disagree most
                       (`gfocal_pipeline.disagreement`); disagreement by image orientation
    report.html        the same as a page (inline CSS, no script); pictures referenced relatively
    pictures/NN_<image id>.png   the top images (default 6) with ground truth, reference and device
                       boxes drawn in three styles (`report_pictures`), each under a byte cap

The report is rebuilt whole on every call (a retry replaces it; a reader never sees half of one).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gfocal_pipeline.disagreement import DEFAULT_IOU_THR, DEFAULT_SCORE_THR, Boxes, rank_images
from gfocal_pipeline.errors import DatasetError, EvaluationError
from gfocal_pipeline.fileio import owner_tag, write_json, write_text_atomic
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

REPORT_VERSION = 1
REPORT_DIR = "report"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
PICTURES_DIR = "pictures"
REFERENCE_BACKEND = "torch"
RANKED_LISTED = 50  # images listed in report.json (the pictures are the first `top_images`)
SIZES = (("small", "APs", "ARs"), ("medium", "APm", "ARm"), ("large", "APl", "ARl"))


@dataclass(frozen=True)
class ReportOptions:
    top_images: int = 6  # pictures drawn
    score_thr: float = DEFAULT_SCORE_THR  # confident boxes: the image ranking and the pictures
    iou_thr: float = DEFAULT_IOU_THR
    thumb_side: int = 480  # longest side of a picture, pixels
    picture_bytes: int = 250_000  # a picture is shrunk until its PNG fits

    def __post_init__(self) -> None:
        if not 0 <= self.top_images <= 50:
            raise EvaluationError(f"report top_images must be 0..50, got {self.top_images!r}")
        if not 0 < self.score_thr <= 1 or not 0 < self.iou_thr <= 1:
            raise EvaluationError(
                f"report score_thr and iou_thr must be in (0, 1], got {self.score_thr!r}, {self.iou_thr!r}"
            )
        if self.thumb_side < 64 or self.picture_bytes < 10_000:
            raise EvaluationError("report thumb_side must be >= 64 and picture_bytes >= 10000")


@dataclass
class EvalResult:
    """What `eval/<backend>/stats.json` says of one backend of one run."""

    backend: str
    stats: dict[str, float]
    per_class: dict[int, float | None]  # category id -> AP (None: no ground truth)
    names: dict[int, str] = field(default_factory=dict)
    detections_path: Path | None = None


def report_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_DIR


def read_eval(run_dir: str | Path, backend: str) -> EvalResult | None:
    """The evaluation of `backend` in `run_dir`, or None when it has none; a damaged file is an error."""
    eval_dir = RunLayout.at(run_dir).eval_dir(backend)
    path = eval_dir / "stats.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        per_class = {int(row["category_id"]): row["AP"] for row in data["per_class"]}
        names = {int(row["category_id"]): str(row.get("name", "")) for row in data["per_class"]}
        stats = {str(k): float(v) for k, v in data["stats"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(
            f"evaluation file {str(path)!r} cannot be read ({exc}); re-run the evaluate step of that run"
        ) from exc
    return EvalResult(backend, stats, per_class, names, eval_dir / "detections.json")


_KEYS = ('{"image_id":', '"category_id":', '"bbox":[', '],"score":')


def _parse_evaluate_format(text: str) -> Boxes | None:
    """detections.json as `evaluate` writes it (`_RECORD`: fixed keys, plain numbers), parsed as
    numbers: 5x faster than json for 500,000 records. None when the text is not in that format."""
    body = text.strip()
    if body == "[]":
        return Boxes.from_records([])
    if not body.startswith("[" + _KEYS[0]) or not body.endswith("}]"):
        return None
    for key in _KEYS:
        body = body.replace(key, "," if key.startswith("]") else "")
    try:
        values = np.array(body.replace("}", "").strip("[]").split(","), dtype=np.float64).reshape(-1, 7)
    except ValueError:
        return None
    if len(values) != text.count(_KEYS[0]):
        return None
    return Boxes(values[:, 0].astype(np.int64), values[:, 2:6], values[:, 1].astype(np.int64), values[:, 6])


def _load_detections(path: Path | None, score_thr: float) -> Boxes:
    if path is None or not path.is_file():
        raise EvaluationError(f"detections file {str(path)!r} is missing; re-run the evaluate step")
    try:
        text = path.read_text(encoding="ascii")
        boxes = _parse_evaluate_format(text)
        if boxes is None:
            boxes = Boxes.from_records(json.loads(text))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"detections file {str(path)!r} cannot be read ({exc})") from exc
    return boxes.confident(score_thr) if score_thr > 0 else boxes


@dataclass
class GroundTruth:
    names: dict[int, str]
    boxes: Boxes  # non-crowd annotations
    images: dict[int, dict[str, Any]]


def load_ground_truth(manifest: Manifest) -> GroundTruth:
    """Categories, non-crowd boxes and image records of the manifest's annotation file."""
    path = Path(manifest.annotation_file)
    try:
        data = json.loads(path.read_text())
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        anns = [a for a in data.get("annotations", []) if not a.get("iscrowd")]
        images = {int(i["id"]): i for i in data["images"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"annotation file {str(path)!r} cannot be read ({exc})") from exc
    return GroundTruth(names, Boxes.from_records(anns), images)


def _resolve_backends(
    layout: RunLayout, verdict: Mapping[str, Any] | None, backend: str | None, reference: str | None
) -> tuple[str, str | None]:
    device = backend or ((verdict or {}).get("config") or {}).get("backend")
    evaluated = sorted(p.name for p in (layout.root / "eval").glob("*") if (p / "stats.json").is_file())
    if device is None:
        others = [name for name in evaluated if name != REFERENCE_BACKEND]
        if len(others) != 1:
            raise EvaluationError(
                f"run {str(layout.root)!r} has evaluations {evaluated}: name the device backend "
                "(`gfocal report --backend NAME`)"
            )
        device = others[0]
    if reference == "auto":
        reference = (
            REFERENCE_BACKEND if REFERENCE_BACKEND in evaluated and device != REFERENCE_BACKEND else None
        )
    return device, reference


def _baselines(entries: Sequence[Mapping[str, Any]], backend: str) -> tuple[list[EvalResult], list[str]]:
    """The baseline runs' evaluations of `backend`; a run whose directory or evaluation is gone is noted."""
    found, notes = [], []
    for entry in entries:
        name = f"{entry.get('dag_id', '?')}/{entry.get('run_id', '?')}"
        run_dir = entry.get("run_dir")
        result = None
        try:
            result = read_eval(run_dir, backend) if run_dir else None
        except EvaluationError as exc:
            notes.append(f"baseline run {name}: {exc}")
            continue
        if result is None:
            where = (
                f"no eval/{backend}/stats.json in {run_dir}" if run_dir else "its run directory is unknown"
            )
            notes.append(f"baseline run {name}: per-class AP unavailable ({where})")
        else:
            found.append(result)
    return found, notes


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _delta(value: float | None, other: float | None) -> float | None:
    return None if value is None or other is None else round(value - other, 6)


def class_rows(
    device: EvalResult,
    reference: EvalResult | None,
    baselines: Sequence[EvalResult],
    counts: Mapping[str, Mapping[int, int]],
    names: Mapping[int, str],
) -> list[dict[str, Any]]:
    """One row per category, sorted by the largest AP drop (vs reference or baseline, whichever is
    worse), then by the largest loss of detections vs the reference, then by category id. `boxes`
    count every detection the evaluation scored (any score)."""
    rows = []
    for cat, ap in device.per_class.items():
        ref_ap = reference.per_class.get(cat) if reference else None
        base_ap = _median([b.per_class.get(cat) for b in baselines]) if baselines else None
        row = {
            "category_id": cat,
            "name": names.get(cat) or device.names.get(cat, str(cat)),
            "gt_boxes": counts["gt"].get(cat, 0),
            "AP": ap,
            "AP_reference": ref_ap,
            "AP_baseline": base_ap,
            "delta_reference": _delta(ap, ref_ap),
            "delta_baseline": _delta(ap, base_ap),
            "boxes": counts["device"].get(cat, 0),
            "boxes_reference": counts["reference"].get(cat, 0) if reference else None,
        }
        rows.append(row)

    def key(row: dict[str, Any]) -> tuple[float, int, int]:
        deltas = [d for d in (row["delta_reference"], row["delta_baseline"]) if d is not None]
        lost = (row["boxes"] - row["boxes_reference"]) if row["boxes_reference"] is not None else 0
        return (min(deltas) if deltas else float("inf"), lost, row["category_id"])

    return sorted(rows, key=key)


def size_rows(
    device: EvalResult, reference: EvalResult | None, baselines: Sequence[EvalResult]
) -> list[dict[str, Any]]:
    """AP and AR by COCO object size (and overall AP), device vs reference vs baseline median."""
    rows = []
    for size, ap_key, ar_key in (("all", "AP", "AR100"), *SIZES):
        for metric, key in (("AP", ap_key), ("AR", ar_key)):
            value = device.stats.get(key)
            ref = reference.stats.get(key) if reference else None
            base = _median([b.stats.get(key) for b in baselines]) if baselines else None
            rows.append(
                {
                    "size": size,
                    "metric": metric,
                    "value": value,
                    "reference": ref,
                    "baseline": base,
                    "delta_reference": _delta(value, ref),
                    "delta_baseline": _delta(value, base),
                }
            )
    return rows


def orientation(width: int, height: int) -> str:
    if width > height * 1.05:
        return "landscape"
    if height > width * 1.05:
        return "portrait"
    return "square"


def shape_rows(ranked: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Disagreement by image orientation (a padding or resize bug shows on one orientation only)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for item in ranked:
        groups.setdefault(item["orientation"], []).append(item)
    rows = [
        {
            "orientation": name,
            "images": len(items),
            "mean_disagreement": round(statistics.fmean(i["disagreement"] for i in items), 6),
            "missed": sum(i["missed"] + i["mislocated"] for i in items),
            "extra": sum(i["extra"] for i in items),
        }
        for name, items in groups.items()
    ]
    return sorted(rows, key=lambda r: (-r["mean_disagreement"], r["orientation"]))


@dataclass
class _Sides:
    """The run's evaluations and confident boxes, read once."""

    device: EvalResult
    reference: EvalResult | None
    baselines: list[EvalResult]
    gt: GroundTruth
    device_boxes: Boxes
    expected: Boxes  # the reference's confident boxes, or the ground truth
    against: str  # "reference" | "ground truth"
    notes: list[str]
    counts: dict[str, dict[int, int]]  # detections (any score) per class: gt, device, reference


def _read_sides(
    layout: RunLayout,
    manifest: Manifest,
    device_name: str,
    reference_name: str | None,
    baseline_entries: Sequence[Mapping[str, Any]],
    options: ReportOptions,
) -> _Sides:
    device = read_eval(layout.root, device_name)
    if device is None:
        raise EvaluationError(
            f"run {str(layout.root)!r} has no evaluation of backend {device_name!r} "
            f"(eval/{device_name}/stats.json); run its evaluate step first"
        )
    reference = read_eval(layout.root, reference_name) if reference_name else None
    notes = []
    if reference_name and reference is None:
        notes.append(f"no evaluation of the reference backend {reference_name!r}: compared with ground truth")
    baselines, baseline_notes = _baselines(baseline_entries, device_name)
    gt = load_ground_truth(manifest)
    if device.per_class:  # only the categories evaluation scored (the model's classes) are expected
        gt = GroundTruth(gt.names, gt.boxes.of_classes(device.per_class), gt.images)
    all_device = _load_detections(device.detections_path, 0.0)
    counts = {"gt": gt.boxes.class_counts(), "device": all_device.class_counts(), "reference": {}}
    if reference is not None:
        all_reference = _load_detections(reference.detections_path, 0.0)
        counts["reference"] = all_reference.class_counts()
        expected, against = all_reference.confident(options.score_thr), "reference"
    else:
        expected, against = gt.boxes, "ground truth"
    device_boxes = all_device.confident(options.score_thr)
    return _Sides(
        device, reference, baselines, gt, device_boxes, expected, against, notes + baseline_notes, counts
    )


def _ranked_images(manifest: Manifest, sides: _Sides, options: ReportOptions) -> list[dict[str, Any]]:
    entries = manifest.by_id()
    ranked = rank_images(sides.expected, sides.device_boxes, list(entries), iou_thr=options.iou_thr)
    out = []
    for item in ranked:
        entry = entries[item.image_id]
        width, height = entry.geometry.width, entry.geometry.height
        out.append(
            {
                **item.as_dict(),
                "file_name": entry.file_name,
                "width": width,
                "height": height,
                "orientation": orientation(width, height),
            }
        )
    return out


def _pictures(
    folder: Path, manifest: Manifest, ranked: list[dict[str, Any]], sides: _Sides, options: ReportOptions
) -> list[str]:
    """Draw the top images that disagree at all; returns notes for images that could not be drawn."""
    from gfocal_pipeline.report_pictures import draw_picture

    notes = []
    boxes = {
        "gt": sides.gt.boxes,
        "reference": sides.expected if sides.against == "reference" else None,
        "device": sides.device_boxes,
    }
    index = {name: side.by_image() for name, side in boxes.items() if side is not None}
    for rank, item in enumerate(ranked[: options.top_images], start=1):
        if item["disagreement"] <= 0:
            break
        name = f"{rank:02d}_{item['image_id']}.png"
        source = Path(manifest.image_dir) / item["file_name"]
        picked = {k: (boxes[k], rows.get(item["image_id"])) for k, rows in index.items()}
        try:
            png = draw_picture(source, picked, sides.gt.names, options)
        except (OSError, ValueError) as exc:
            notes.append(f"picture of image {item['image_id']} not drawn: {exc}")
            continue
        (folder / PICTURES_DIR).mkdir(exist_ok=True)
        (folder / PICTURES_DIR / name).write_bytes(png)
        item["picture"] = f"{PICTURES_DIR}/{name}"
    return notes


def _verdict_part(verdict: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not verdict:
        return None
    keys = ("passed", "label", "regressed", "metrics", "checks", "notes", "baseline_runs", "dag_id", "run_id")
    return {key: verdict.get(key) for key in keys}


def _run_ids(layout: RunLayout, verdict: Mapping[str, Any] | None) -> dict[str, str | None]:
    if verdict:
        return {"dag_id": verdict.get("dag_id"), "run_id": verdict.get("run_id")}
    try:
        data = json.loads(layout.run_json.read_text())
        return {"dag_id": data.get("dag_id"), "run_id": data.get("run_id")}
    except (OSError, ValueError, AttributeError):
        return {"dag_id": None, "run_id": None}


def build_report(
    run_dir: str | Path,
    staging: Path,
    *,
    verdict: Mapping[str, Any] | None = None,
    backend: str | None = None,
    reference: str | None = "auto",
    baseline: Sequence[Mapping[str, Any]] | None = None,
    options: ReportOptions | None = None,
) -> dict[str, Any]:
    """Compute the report of `run_dir` and draw its pictures into `staging`; returns report.json's data."""
    options = options or ReportOptions()
    layout = RunLayout.at(run_dir)
    try:
        manifest = load_manifest(layout.manifest)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from exc
    device_name, reference_name = _resolve_backends(layout, verdict, backend, reference)
    entries = list((verdict or {}).get("baseline") or []) if baseline is None else list(baseline)
    sides = _read_sides(layout, manifest, device_name, reference_name, entries, options)
    ranked = _ranked_images(manifest, sides, options)
    notes = sides.notes + _pictures(staging, manifest, ranked, sides, options)
    return {
        "version": REPORT_VERSION,
        **_run_ids(layout, verdict),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_dir": str(layout.root),
        "backend": device_name,
        "reference": sides.reference.backend if sides.reference else None,
        "against": sides.against,
        "baseline_runs": [f"{e.get('dag_id', '?')}/{e.get('run_id', '?')}" for e in entries],
        "baseline_found": len(sides.baselines),
        "verdict": _verdict_part(verdict),
        "options": asdict(options),
        "per_class": class_rows(sides.device, sides.reference, sides.baselines, sides.counts, sides.gt.names),
        "by_size": size_rows(sides.device, sides.reference, sides.baselines),
        "by_orientation": shape_rows(ranked),
        "images": ranked[:RANKED_LISTED],
        "images_total": len(ranked),
        "notes": notes,
    }


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` (both in the run directory): readers see the old or the new one."""
    old = target.with_name(f".{target.name}-old-{owner_tag()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_report(run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Build and write `<run_dir>/report/` (see the module docstring); returns a small summary for XCom:
    the folder, its html, the three worst classes and the pictures drawn. `kwargs` as `build_report`."""
    from gfocal_pipeline.report_html import render_report

    target = report_dir(run_dir)
    staging = target.with_name(f".{REPORT_DIR}-{owner_tag()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        data = build_report(run_dir, staging, **kwargs)
        write_json(staging / REPORT_JSON, data)
        write_text_atomic(staging / REPORT_HTML, render_report(data))
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pictures = [item["picture"] for item in data["images"] if item.get("picture")]
    worst = [
        {k: row[k] for k in ("name", "AP", "delta_reference", "delta_baseline")}
        for row in data["per_class"][:3]
    ]
    log.info(
        "report of %s vs %s: %s; worst classes %s; %d picture(s)",
        data["backend"],
        data["against"],
        target / REPORT_HTML,
        ", ".join(f"{w['name']} {w['delta_reference'] or w['delta_baseline'] or 0:+.4f}" for w in worst),
        len(pictures),
    )
    return {
        "report_dir": str(target),
        "report_html": str(target / REPORT_HTML),
        "worst_classes": worst,
        "pictures": pictures,
    }


def load_report(run_dir: str | Path) -> dict[str, Any] | None:
    """report.json of a run, or None when it has none (or it cannot be read: logged)."""
    path = report_dir(run_dir) / REPORT_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("report %s cannot be read: %s", path, exc)
        return None
