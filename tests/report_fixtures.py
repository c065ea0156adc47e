"""A run directory whose device is worse than its reference on purpose, evaluated for real, with its report.

The images and annotations are the project's demo COCO set (real JPEGs, portrait and landscape). The
reference ("torch") outputs are the ground-truth boxes themselves (score 0.9), so its AP is 1; the
device ("onnxruntime") outputs are the same boxes without one class (the class with the most boxes;
`drop_class=False` keeps it) and, with `shift_portrait`, with every box of portrait images moved
right by half its width.
Both go through the real `evaluate_outputs`, then the real `write_report`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from support import shard_marker

from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.layout import RunLayout, write_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest
from gfocal_pipeline.report import write_report

SHARD = "00000"
REFERENCE, DEVICE = "torch", "onnxruntime"
MAX_PER_IMG = 100


def _manifest(layout: RunLayout, coco: Path, images: list[dict[str, Any]]) -> Manifest:
    """Identity geometry: input pixels are original pixels (the outputs below are written in them)."""
    entries = [
        ImageEntry(
            i["id"],
            i["file_name"],
            SHARD,
            Geometry(i["width"], i["height"], 1.0, 1.0, i["width"], i["height"], (0, 0, 0, 0)),
        )
        for i in images
    ]
    annotation = coco / "annotations" / "instances_val2017.json"
    manifest = Manifest(
        "letterbox",
        "float32",
        800,
        1216,
        len(entries),
        str(coco),
        str(annotation),
        str(coco / "val2017"),
        entries,
        {SHARD: [e.image_id for e in entries]},
        annotation_sha256=sha256_file(annotation),
    )
    manifest.write(layout.manifest)
    return manifest


def _outputs(layout: RunLayout, manifest: Manifest, backend: str, boxes: dict[int, list[tuple]]) -> None:
    ids = [e.image_id for e in manifest.images]
    dets = np.zeros((len(ids), MAX_PER_IMG, 5), np.float32)
    labels = np.full((len(ids), MAX_PER_IMG), -1, np.int64)
    for n, image_id in enumerate(ids):
        for k, (label, x, y, w, h) in enumerate(boxes.get(image_id, [])[:MAX_PER_IMG]):
            dets[n, k] = (x, y, x + w, y + h, 0.9)
            labels[n, k] = label
    marker = {**shard_marker(manifest, backend, SHARD), "manifest_sha256": manifest.sha256}
    write_shard_outputs(
        layout.output_shard(backend, SHARD), np.asarray(ids), {"dets": dets, "labels": labels}, "dets", marker
    )


def make_report_run(
    tmp_path: Path,
    *,
    images: int = 16,
    drop_class: bool = True,
    shift_portrait: bool = False,
    verdict: dict | None = None,
    report: bool = True,
) -> Path:
    """A run directory under `tmp_path` with both evaluations and `report/` (see the module docstring)."""
    coco = make_demo_coco(tmp_path / "coco", images)
    data = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    label_of = {c["id"]: n for n, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    dropped = Counter(a["category_id"] for a in data["annotations"]).most_common(1)[0][0]
    portrait = {i["id"] for i in data["images"] if i["height"] > i["width"] * 1.05}
    reference: dict[int, list[tuple]] = {}
    device: dict[int, list[tuple]] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        reference.setdefault(a["image_id"], []).append((label_of[a["category_id"]], x, y, w, h))
        if drop_class and a["category_id"] == dropped:
            continue
        if shift_portrait and a["image_id"] in portrait:
            x += w / 2
        device.setdefault(a["image_id"], []).append((label_of[a["category_id"]], x, y, w, h))
    run_dir = tmp_path / "run"
    layout = RunLayout.at(run_dir)
    manifest = _manifest(layout, coco, data["images"])
    for backend, boxes in ((REFERENCE, reference), (DEVICE, device)):
        _outputs(layout, manifest, backend, boxes)
        evaluate_outputs(layout, backend)
    if report:
        write_report(run_dir, verdict=verdict, backend=DEVICE)
    (run_dir / "fixture.json").write_text(
        json.dumps({"dropped_category": dropped, "portrait": sorted(portrait)})
    )
    return run_dir
