"""The backend seam: run one shard of a manifest into the shared output layout and report timing.

In-process backends (onnxruntime, torch) run the host NMS after each batch and write kind "dets"
(`dets` float32 (N, max_per_img, 5), `labels` int64 (N, max_per_img), padding rows score 0 and label
-1): a few KB per image instead of ~1.1 MB of pre-NMS candidates at 800x1216, and a shard's memory is
those small arrays, not its candidates. `keep_candidates=True` also writes the raw candidates of the
shard to `candidates.npz` beside `outputs.npz` (for debugging; written before `done.json`).

Done markers record `shard_digest` (what the shard's inputs are made of, `Manifest.shard_digest`), the
backend's `identity()` (model hash, NMS settings under "postprocess", ...); a retry reuses a finished
shard only when both match, so a changed image recomputes its own shard and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gfocal_pipeline.constants import MAX_PER_IMG, NMS_IOU, SCORE_THR
from gfocal_pipeline.errors import BackendError, DatasetError
from gfocal_pipeline.fileio import atomic_path, write_json
from gfocal_pipeline.layout import (
    DONE_FILE,
    OUTPUTS_FILE,
    RunLayout,
    input_file_name,
    shard_done,
    write_shard_outputs,
)
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.postprocess import multiclass_nms, pad_dets
from gfocal_pipeline.timing import summarize

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.npz"  # raw pre-NMS outputs of a shard, only with keep_candidates=True


@dataclass(frozen=True)
class ShardResult:
    """What a backend reports for one shard (small: goes to XCom)."""

    backend: str
    shard: str
    images: int
    output_dir: str
    timing: dict[str, Any]
    reused: bool = False
    kind: str = ""  # the kind written to outputs.npz ("dets" or "candidates")
    output_bytes: int = 0  # size of the shard's outputs.npz

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "shard": self.shard,
            "images": self.images,
            "output_dir": self.output_dir,
            "timing": self.timing,
            "reused": self.reused,
            "kind": self.kind,
            "output_bytes": self.output_bytes,
        }


def shard_result(
    backend: str, shard: str, images: int, out_dir: Path, timing: dict[str, Any], kind: str, reused: bool
) -> ShardResult:
    """The ShardResult of a finished shard folder (its outputs.npz size read from disk)."""
    size = (out_dir / OUTPUTS_FILE).stat().st_size
    return ShardResult(backend, shard, images, str(out_dir), timing, reused, kind, size)


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
    kind: str = "candidates"  # what outputs.npz holds: "candidates" or "dets" (after NMS)
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
            "shard_digest": manifest.shard_digest(shard),
            "manifest_sha256": manifest.sha256,  # for information; reuse and evaluation use shard_digest
        }

    def reuse(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult | None:
        """A retried task skips a shard whose outputs are complete for these same inputs (shard digest)
        and this same backend identity; any other change to the manifest does not recompute it."""
        out_dir = layout.output_shard(self.name, shard)
        marker = shard_done(out_dir)
        timing_file = layout.timing_file(self.name, shard)
        if (
            marker is None
            or marker.get("shard_digest") != manifest.shard_digest(shard)
            or not timing_file.is_file()
        ):
            return None
        if any(marker.get(key) != value for key, value in self.identity().items()):
            return None
        timing = json.loads(timing_file.read_text())
        log.info("shard %s: outputs already complete for these inputs, reusing them", shard)
        return shard_result(
            self.name, shard, marker["images"], out_dir, timing["summary"], marker["kind"], reused=True
        )

    @abstractmethod
    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        """Run every image of `shard`, write outputs + timing in the shared layout."""


def check_nms_options(score_thr: object, iou_thr: object, max_per_img: object) -> tuple[float, float, int]:
    """The host NMS settings as (float, float, int), or a BackendError naming the bad one."""

    def number(value: object, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BackendError(f"{name} must be a number, got {value!r}")
        return float(value)

    score, iou = number(score_thr, "score_thr"), number(iou_thr, "iou_thr")
    if not 0.0 <= score < 1.0:
        raise BackendError(f"score_thr must be in [0, 1), got {score}; the official value is {SCORE_THR}")
    if not 0.0 < iou <= 1.0:
        raise BackendError(f"iou_thr must be in (0, 1], got {iou}; the official value is {NMS_IOU}")
    if isinstance(max_per_img, bool) or not isinstance(max_per_img, int) or max_per_img < 1:
        raise BackendError(
            f"max_per_img must be an integer >= 1, got {max_per_img!r}; the official value is {MAX_PER_IMG}"
        )
    return score, iou, max_per_img


class ShardDetections:
    """One shard's final detections, filled batch by batch into preallocated (N, rows) arrays.

    Host NMS (`nms` given): each image's candidates go through `multiclass_nms` and only its
    `max_per_img` rows are kept. Without `nms` (the model ends in NMS) the batch's dets/labels are
    copied as they are. With `keep_candidates` the raw batch outputs are also kept (debug mode only).
    """

    def __init__(self, images: int, nms: dict[str, Any] | None, keep_candidates: bool) -> None:
        self.images = images
        self.nms = nms
        self.image_ids = np.zeros(images, np.int64)
        self.dets: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        if nms is not None:
            self.dets, self.labels = self._allocate(nms["max_per_img"])
        self.count = 0
        self.candidates: dict[str, list[np.ndarray]] | None = {} if keep_candidates else None
        self.nms_ms = 0.0

    def _allocate(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((self.images, rows, 5), np.float32), np.full((self.images, rows), -1, np.int64)

    def add(self, ids: list[int], outputs: dict[str, np.ndarray]) -> None:
        start, stop = self.count, self.count + len(ids)
        if stop > self.images:
            raise BackendError(f"{stop} images in a shard of {self.images}; the shard's id list changed")
        self.image_ids[start:stop] = ids
        if self.candidates is not None:
            for name, array in outputs.items():
                self.candidates.setdefault(name, []).append(array)
        began = time.perf_counter()
        if self.nms is None:  # NMS inside the model: dets/labels pass through unchanged
            if self.dets is None:
                self.dets = np.zeros((self.images, *outputs["dets"].shape[1:]), np.float32)
                self.labels = np.zeros((self.images, *outputs["labels"].shape[1:]), np.int64)
            self.dets[start:stop] = outputs["dets"]
            self.labels[start:stop] = outputs["labels"]  # type: ignore[index]
        else:
            boxes, scores = outputs["boxes"], outputs["scores"]
            for row in range(len(ids)):
                found = multiclass_nms(
                    boxes[row],
                    scores[row],
                    self.nms["score_thr"],
                    self.nms["iou_thr"],
                    self.nms["max_per_img"],
                )
                self.dets[start + row], self.labels[start + row] = pad_dets(  # type: ignore[index]
                    found, self.nms["max_per_img"]
                )
        self.nms_ms += (time.perf_counter() - began) * 1000.0
        self.count = stop

    def arrays(self) -> dict[str, np.ndarray]:
        if self.count != self.images or self.dets is None or self.labels is None:
            raise BackendError(f"only {self.count} of the shard's {self.images} images were run")
        return {"dets": self.dets, "labels": self.labels}

    def write_candidates(self, path: Path) -> Path:
        """The kept raw outputs as `image_ids` + one array per model output, written atomically."""
        if self.candidates is None:
            raise BackendError("write_candidates needs keep_candidates=True")
        arrays = {name: np.concatenate(parts) for name, parts in self.candidates.items()}
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, image_ids=self.image_ids, **arrays)
        return path


class InProcessBackend(Backend):
    """Backends that run batches in this process (onnxruntime, torch): shared batching, timing and the
    host NMS that turns each batch's candidates into the final detections written as kind "dets"."""

    kind = "dets"  # what outputs.npz holds; `model_kind` is what `run_batch` returns
    model_kind = "candidates"  # or "dets" for a graph that ends in NMS (passed through unchanged)

    def __init__(
        self,
        batch_size: int = 1,
        warmup: int = 1,
        keep_candidates: bool = False,
        score_thr: float = SCORE_THR,
        iou_thr: float = NMS_IOU,
        max_per_img: int = MAX_PER_IMG,
    ) -> None:
        self.check_batch_size(batch_size)
        self.batch_size = batch_size
        self.warmup = max(0, warmup)
        if not isinstance(keep_candidates, bool):
            raise BackendError(f"keep_candidates must be true or false, got {keep_candidates!r}")
        self.keep_candidates = keep_candidates
        self.score_thr, self.iou_thr, self.max_per_img = check_nms_options(score_thr, iou_thr, max_per_img)

    def check_keep_candidates(self, where: str) -> None:
        """keep_candidates needs candidates: refuse it for a model that ends in NMS (call after
        `model_kind` is known)."""
        if self.keep_candidates and self.model_kind != "candidates":
            raise BackendError(
                f"keep_candidates=True but {where} outputs {self.model_kind} (NMS inside the model), so "
                "there are no raw candidates to keep; use the portable graph (outputs boxes, scores) or "
                "drop keep_candidates"
            )

    def postprocess(self) -> dict[str, Any]:
        """How the written detections were made: host NMS and its settings, or NMS inside the graph."""
        if self.model_kind != "candidates":
            return {"nms": "graph"}
        return {
            "nms": "host",
            "score_thr": self.score_thr,
            "iou_thr": self.iou_thr,
            "max_per_img": self.max_per_img,
        }

    def identity(self) -> dict[str, Any]:
        return {"model_kind": self.model_kind, "postprocess": self.postprocess()}

    def marker(self, manifest: Manifest, shard: str) -> dict[str, Any]:
        return {**super().marker(manifest, shard), "keep_candidates": self.keep_candidates}

    def reuse(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult | None:
        """As `Backend.reuse`, and with keep_candidates the shard's candidates file must be there too."""
        if self.keep_candidates and not (layout.output_shard(self.name, shard) / CANDIDATES_FILE).is_file():
            return None
        return super().reuse(layout, manifest, shard)

    def timing_facts(self) -> dict[str, Any]:
        """Extra facts stored with the timing (e.g. the device it ran on)."""
        return {}

    @abstractmethod
    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs (B, ...) -> named outputs with first axis B."""

    def batches(
        self, layout: RunLayout, manifest: Manifest, shard: str
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """(image ids, stacked inputs) per batch, read from the manifest's input folder of `shard`."""
        ids = manifest.shards.get(shard)
        if ids is None:
            raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
        directory = manifest.input_dir(shard)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            yield chunk, np.stack([read_input(directory / input_file_name(i), manifest) for i in chunk])

    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        reused = self.reuse(layout, manifest, shard)
        if reused is not None:
            return reused
        if shard not in manifest.shards:
            raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
        out_dir = layout.output_shard(self.name, shard)
        # outputs of an earlier computation are stale from here on (and must not pair with new files)
        (out_dir / DONE_FILE).unlink(missing_ok=True)
        (out_dir / CANDIDATES_FILE).unlink(missing_ok=True)
        post = self.postprocess()
        found = ShardDetections(
            len(manifest.shards[shard]), post if post["nms"] == "host" else None, self.keep_candidates
        )
        latencies: list[float] = []
        for ids, batch in self.batches(layout, manifest, shard):
            if len(latencies) < self.warmup:  # warm-up runs are not timed and not recorded
                self.run_batch(batch)
            start = time.perf_counter()
            result = self.run_batch(batch)
            latencies.append((time.perf_counter() - start) * 1000.0)
            found.add(ids, result)
            log.info(
                "shard %s: %d/%d images, last batch %.1f ms", shard, found.count, found.images, latencies[-1]
            )
        summary = {**summarize(latencies, found.count, self.batch_size), **self.timing_facts()}
        if found.nms is not None:
            summary["host_nms_ms_per_image"] = found.nms_ms / max(found.count, 1)
        write_json(
            layout.timing_file(self.name, shard),
            {"latencies_ms": latencies, "batch_size": self.batch_size, "summary": summary},
        )
        arrays = found.arrays()
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.keep_candidates:
            found.write_candidates(out_dir / CANDIDATES_FILE)
        write_shard_outputs(out_dir, found.image_ids, arrays, self.kind, self.marker(manifest, shard))
        return shard_result(self.name, shard, found.count, out_dir, summary, self.kind, reused=False)
