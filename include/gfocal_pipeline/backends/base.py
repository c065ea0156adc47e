"""The backend seam: run one shard of a manifest into the shared output layout and report timing."""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gfocal_pipeline.errors import BackendError, DatasetError
from gfocal_pipeline.fileio import write_json
from gfocal_pipeline.layout import RunLayout, input_file_name, shard_done, write_shard_outputs
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.timing import summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardResult:
    """What a backend reports for one shard (small: goes to XCom)."""

    backend: str
    shard: str
    images: int
    output_dir: str
    timing: dict[str, Any]
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "shard": self.shard,
            "images": self.images,
            "output_dir": self.output_dir,
            "timing": self.timing,
            "reused": self.reused,
        }


def read_input(path: Path, manifest: Manifest) -> np.ndarray:
    """One preprocessed `.bin` as an array of the manifest's per-image shape, size-checked."""
    expected = manifest.bytes_per_image
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"preprocessed input {str(path)!r} is missing; re-run preprocessing") from None
    if size != expected:
        raise DatasetError(
            f"preprocessed input {str(path)!r} has {size} bytes, expected {expected} for "
            f"{manifest.dtype} {manifest.input_shape()[1:]}; it was written for another shape or dtype"
        )
    return np.fromfile(path, dtype=np.dtype(manifest.dtype)).reshape(manifest.input_shape()[1:])


class Backend(ABC):
    """Base of every backend. Subclasses set `name` and `kind` and implement `infer_shard`."""

    name: str = "backend"
    kind: str = "candidates"  # or "dets" (NMS inside the model)
    cheap_to_build = False  # True when the constructor only validates (no file, no session)

    @classmethod
    def check_batch_size(cls, batch_size: object) -> None:
        """Raise a BackendError when this backend cannot run `batch_size` (any integer >= 1 here)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BackendError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    def identity(self) -> dict[str, Any]:
        """What else the outputs depend on (e.g. the model file's hash); stored in the done marker and
        compared on reuse, so a retry after the model changed recomputes instead of reusing stale outputs."""
        return {}

    def marker(self, manifest: Manifest, shard: str) -> dict[str, Any]:
        return {
            **self.identity(),
            "backend": self.name,
            "shard": shard,
            "policy": manifest.policy,
            "dtype": manifest.dtype,
            "input_height": manifest.input_height,
            "input_width": manifest.input_width,
            "manifest_sha256": manifest.sha256,
        }

    def reuse(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult | None:
        """A retried task skips a shard whose outputs are already complete for this same manifest."""
        marker = shard_done(layout.output_shard(self.name, shard))
        timing_file = layout.timing_file(self.name, shard)
        if marker is None or marker.get("manifest_sha256") != manifest.sha256 or not timing_file.is_file():
            return None
        if any(marker.get(key) != value for key, value in self.identity().items()):
            return None
        timing = json.loads(timing_file.read_text())
        log.info("shard %s: outputs already complete for this manifest, reusing them", shard)
        return ShardResult(
            self.name,
            shard,
            marker["images"],
            str(layout.output_shard(self.name, shard)),
            timing["summary"],
            reused=True,
        )

    @abstractmethod
    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        """Run every image of `shard`, write outputs + timing in the shared layout."""


class InProcessBackend(Backend):
    """Backends that run batches in this process (onnxruntime, torch): shared batching and timing."""

    def __init__(self, batch_size: int = 1, warmup: int = 1) -> None:
        self.check_batch_size(batch_size)
        self.batch_size = batch_size
        self.warmup = max(0, warmup)

    def timing_facts(self) -> dict[str, Any]:
        """Extra facts stored with the timing (e.g. the device it ran on)."""
        return {}

    @abstractmethod
    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs (B, ...) -> named outputs with first axis B."""

    def batches(
        self, layout: RunLayout, manifest: Manifest, shard: str
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        ids = manifest.shards.get(shard)
        if ids is None:
            raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
        directory = layout.input_shard(shard)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            yield chunk, np.stack([read_input(directory / input_file_name(i), manifest) for i in chunk])

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        reused = self.reuse(layout, manifest, shard)
        if reused is not None:
            return reused
        ids_all: list[int] = []
        outputs: dict[str, list[np.ndarray]] = {}
        latencies: list[float] = []
        timed_images = 0
        warm = 0
        for ids, batch in self.batches(layout, manifest, shard):
            if warm < self.warmup:  # warm-up runs are not timed and not recorded
                self.run_batch(batch)
                warm += 1
            start = time.perf_counter()
            result = self.run_batch(batch)
            latencies.append((time.perf_counter() - start) * 1000.0)
            timed_images += len(ids)
            ids_all += ids
            for name, array in result.items():
                outputs.setdefault(name, []).append(array)
            log.info(
                "shard %s: %d/%d images, last batch %.1f ms",
                shard,
                len(ids_all),
                len(manifest.shards[shard]),
                latencies[-1],
            )
        arrays = {name: np.concatenate(parts) for name, parts in outputs.items()}
        out_dir = layout.output_shard(self.name, shard)
        summary = {**summarize(latencies, timed_images, self.batch_size), **self.timing_facts()}
        write_json(
            layout.timing_file(self.name, shard),
            {"latencies_ms": latencies, "batch_size": self.batch_size, "summary": summary},
        )
        write_shard_outputs(out_dir, np.asarray(ids_all), arrays, self.kind, self.marker(manifest, shard))
        return ShardResult(self.name, shard, len(ids_all), str(out_dir), summary)
