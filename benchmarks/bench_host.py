"""Host-side steps measured side by side: parallel vs serial preprocessing, vectorised host NMS.

Prints the throughput of each variant and their ratio from one run on this machine:

    .venv/bin/python benchmarks/bench_host.py --images 64
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.postprocess import multiclass_nms
from gfocal_pipeline.preprocess import preprocess


def _preprocess_rate(coco: Path, out: Path, workers: int, images: int) -> float:
    start = time.perf_counter()
    preprocess(coco, out, max_images=images, workers=workers, shard_size=8)
    return images / (time.perf_counter() - start)


def _nms_rate(repeats: int, power: float, seed: int = 0) -> tuple[float, int]:
    """Images/s of host NMS on 800x1216-sized candidate sets (3267 x 80); `power` sets the sparsity."""
    rng = np.random.default_rng(seed)
    k = 3267
    centers = rng.uniform(0, 1216, size=(k, 2))
    sizes = rng.uniform(8, 300, size=(k, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(np.float32)
    scores = (rng.uniform(0, 1, size=(k, 80)) ** power).astype(np.float32)
    kept = int((scores > 0.05).sum())
    start = time.perf_counter()
    for _ in range(repeats):
        multiclass_nms(boxes, scores)
    return repeats / (time.perf_counter() - start), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--nms-repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        root = Path(tmp)
        coco = make_demo_coco(root / "coco", num_images=args.images)
        serial = _preprocess_rate(coco, root / "serial", 1, args.images)
        parallel = _preprocess_rate(coco, root / "parallel", args.workers, args.images)
    print(
        f"preprocess 800x1216 float32: serial {serial:.2f} img/s, "
        f"{args.workers} workers {parallel:.2f} img/s, ratio {parallel / serial:.2f}x"
    )
    for power in (60, 30, 8):  # ~5%, ~10%, ~31% of the 261k (candidate, class) pairs above 0.05
        rate, pairs = _nms_rate(args.nms_repeats, power)
        print(f"host NMS, 3267 candidates x 80 classes, {pairs} pairs above 0.05: {rate:.1f} img/s")


if __name__ == "__main__":
    main()
