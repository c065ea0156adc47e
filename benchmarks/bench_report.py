"""Regression report cost at COCO scale: 5,000 images x 100 detections per backend (issue goal: < 10 s,
report folder < 2 MB).

Builds a synthetic run directory: the demo set's images reused under 5,000 image ids (the pictures need
real files), ground truth of ~7 boxes per image, and `eval/<backend>/` files as the evaluate step writes
them: 100 detections per image for the reference, the device's the same boxes jittered, with one class
dropped. Then times `write_report` (reading both detection files, ranking, pictures, HTML) and prints
the folder size.

    .venv/bin/python benchmarks/bench_report.py [--images 5000] [--work /tmp/bench-report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

from gfocal_pipeline.demo_data import make_demo_coco  # noqa: E402
from gfocal_pipeline.fileio import sha256_file  # noqa: E402
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest  # noqa: E402
from gfocal_pipeline.report import write_report  # noqa: E402

DETS = 100


def _dataset(work: Path, images: int, rng: np.random.Generator) -> tuple[Path, list[dict], list[int]]:
    demo = make_demo_coco(work / "demo", 24)
    base = json.loads((demo / "annotations" / "instances_val2017.json").read_text())
    cats = [c["id"] for c in base["categories"]]
    records, anns = [], []
    for n in range(images):
        src = base["images"][n % len(base["images"])]
        records.append({**src, "id": n + 1})
        for _ in range(7):
            w, h = rng.uniform(10, 120, 2)
            x, y = rng.uniform(0, src["width"] - w), rng.uniform(0, src["height"] - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": n + 1,
                    "category_id": int(rng.choice(cats)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    annotation = work / "instances.json"
    annotation.write_text(json.dumps({**base, "images": records, "annotations": anns}))
    return annotation, records, cats


def _detections(records: list[dict], cats: list[int], rng: np.random.Generator) -> tuple[list, list]:
    ref, dev = [], []
    for image in records:
        for k in range(DETS):
            w, h = rng.uniform(10, 120, 2)
            x, y = rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h)
            cat, score = cats[k % len(cats)], float(rng.uniform(0.05, 1.0))
            ref.append({"image_id": image["id"], "category_id": cat, "bbox": [x, y, w, h], "score": score})
            if cat != cats[0]:
                j = rng.normal(0, 2, 2)
                dev.append(
                    {
                        "image_id": image["id"],
                        "category_id": cat,
                        "bbox": [x + j[0], y + j[1], w, h],
                        "score": score,
                    }
                )
    return ref, dev


def _write_eval(run: Path, backend: str, dets: list, cats: list[int]) -> None:
    folder = run / "eval" / backend
    folder.mkdir(parents=True)
    # compact, keys in evaluate's order: the format `evaluate` writes (report.py parses it as numbers)
    (folder / "detections.json").write_text(json.dumps(dets, separators=(",", ":")))
    per_class = [{"category_id": c, "name": str(c), "AP": 0.5} for c in cats]
    stats = dict.fromkeys(
        ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"), 0.4
    )
    (folder / "stats.json").write_text(json.dumps({"stats": stats, "per_class": per_class}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-report"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    annotation, records, cats = _dataset(args.work, args.images, rng)
    run = args.work / "run"
    entries = [
        ImageEntry(
            r["id"],
            r["file_name"],
            "00000",
            Geometry(r["width"], r["height"], 1.0, 1.0, r["width"], r["height"], (0, 0, 0, 0)),
        )
        for r in records
    ]
    Manifest(
        "letterbox",
        "float32",
        800,
        1216,
        len(entries),
        str(args.work / "demo"),
        str(annotation),
        str(args.work / "demo" / "val2017"),
        entries,
        {"00000": [e.image_id for e in entries]},
        annotation_sha256=sha256_file(annotation),
    ).write(run / "manifest.json")
    ref, dev = _detections(records, cats, rng)
    _write_eval(run, "torch", ref, cats)
    _write_eval(run, "onnxruntime", dev, cats)
    start = time.perf_counter()
    summary = write_report(run, backend="onnxruntime")
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (run / "report").rglob("*") if p.is_file())
    print(f"images {args.images}, detections {len(ref)} reference + {len(dev)} device")
    print(
        f"write_report: {elapsed:.2f} s; report folder {size / 1e6:.2f} MB; "
        f"pictures {len(summary['pictures'])}"
    )


if __name__ == "__main__":
    main()
