"""Host-side steps measured side by side: serial vs thread-pool (the product) vs process-pool
preprocessing (the previous implementation, kept here for comparison), vectorised host NMS.

Prints the throughput of each variant and their ratios from one run on this machine:

    .venv/bin/python benchmarks/bench_host.py --images 64
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from unittest import mock

import cv2
import numpy as np

from gfocal_pipeline import preprocess as preprocess_module
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.postprocess import multiclass_nms
from gfocal_pipeline.preprocess import preprocess


def _init_process() -> None:
    cv2.setNumThreads(1)


def _process_pool_jobs(jobs: Iterable, workers: int) -> Iterator:
    """The previous `_run_jobs`: spawned processes (fails inside a daemonic Celery prefork child)."""
    source = iter(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_process) as pool:
        pending: dict[Future, object] = {}
        while True:
            while len(pending) < 4 * workers and (job := next(source, None)) is not None:
                pending[pool.submit(preprocess_module._run_job, job)] = job
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                yield future.result()


def _preprocess_rate(coco: Path, out: Path, workers: int, images: int, processes: bool = False) -> float:
    """Images/s of one `preprocess` call (the process pool's start-up included, as a task pays it)."""
    runner = _process_pool_jobs if processes else preprocess_module._run_jobs
    start = time.perf_counter()
    with mock.patch.object(preprocess_module, "_run_jobs", runner):
        preprocess(coco, out, max_images=images, workers=workers, shard_size=8)
    return images / (time.perf_counter() - start)


def _same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*.bin"))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


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
        threads = _preprocess_rate(coco, root / "threads", args.workers, args.images)
        processes = _preprocess_rate(coco, root / "processes", args.workers, args.images, processes=True)
        assert _same_bytes(root / "serial", root / "threads"), "thread pool changed the bytes"
        assert _same_bytes(root / "serial", root / "processes"), "process pool changed the bytes"
    print(
        f"preprocess 800x1216 float32, {args.images} images, {os.cpu_count()} CPUs: "
        f"serial {serial:.2f} img/s; "
        f"{args.workers} threads {threads:.2f} img/s ({threads / serial:.2f}x); "
        f"{args.workers} processes {processes:.2f} img/s ({processes / serial:.2f}x); "
        f"threads / processes {threads / processes:.2f}x"
    )
    for power in (60, 30, 8):  # ~5%, ~10%, ~31% of the 261k (candidate, class) pairs above 0.05
        rate, pairs = _nms_rate(args.nms_repeats, power)
        print(f"host NMS, 3267 candidates x 80 classes, {pairs} pairs above 0.05: {rate:.1f} img/s")


if __name__ == "__main__":
    main()
