"""The backend seam: run one shard of a manifest into the shared output layout and report timing.

In-process backends (onnxruntime, torch) run the host NMS after each batch and write kind "dets"
(`dets` float32 (N, max_per_img, 5), `labels` int64 (N, max_per_img), padding rows score 0 and label
-1): a few KB per image instead of ~1.1 MB of pre-NMS candidates at 800x1216, and a shard's memory is
those small arrays, not its candidates. `keep_candidates=True` also writes the raw candidates of the
shard to `candidates.npz` beside `outputs.npz` (for debugging; written before `done.json`).

Done markers record `shard_digest` (what the shard's inputs are made of, `Manifest.shard_digest`), the
backend's `identity()` (model hash, NMS settings under "postprocess", ...); a retry reuses a finished
shard only when both match, so a changed image recomputes its own shard and nothing else. A done
marker, timing file or `outputs.npz` that cannot be read back (truncated, not JSON, wrong image ids)
counts as "not done": it is logged and the shard is recomputed.

The in-process loop reads batch i+1 in a worker thread while batch i runs (`ReadAhead`: one batch
ahead, never more), straight into that batch's array (no per-image arrays stacked), and runs the host
NMS of batch i in a second worker while batch i+1 runs (one batch of candidates waits, at most).
Only the model call is timed; the first batch is timed like every other (no untimed warm-up pass
unless `warmup` asks for one). Outputs with NaN or infinity fail the shard, naming the images,
before anything is written.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import numpy as np

from gfocal_pipeline.constants import MAX_PER_IMG, NMS_IOU, NUM_CLASSES, SCORE_THR
from gfocal_pipeline.errors import BackendError, DatasetError
from gfocal_pipeline.fileio import atomic_path, read_state_json, write_json
from gfocal_pipeline.layout import (
    DONE_FILE,
    KINDS,
    OUTPUTS_FILE,
    RunLayout,
    input_file_name,
    shard_done,
    write_shard_outputs,
)
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.model_spec import ModelSpec
from gfocal_pipeline.postprocess import multiclass_nms, pad_dets
from gfocal_pipeline.timing import summarize

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.npz"  # raw pre-NMS outputs of a shard, only with keep_candidates=True
CRC_CHECK_BYTES = 256 * 2**20  # reuse checks the CRC of every array of an outputs.npz up to this size
NON_FINITE_LISTED = 20  # image ids named in the message of a non-finite-outputs error

T = TypeVar("T")


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


def _size_error(path: Path, size: int, manifest: Manifest) -> DatasetError:
    return DatasetError(
        f"preprocessed input {str(path)!r} has {size} bytes, expected {manifest.bytes_per_image} for "
        f"{manifest.dtype} {manifest.input_shape()[1:]}; it was written for another shape or dtype"
    )


def read_input_into(path: Path, manifest: Manifest, out: np.ndarray) -> np.ndarray:
    """Read one preprocessed `.bin` straight into `out` (C-contiguous, the manifest's per-image shape
    and dtype, e.g. one row of a batch), size-checked; returns `out`."""
    expected = manifest.bytes_per_image
    if not out.flags.c_contiguous or out.nbytes != expected:
        raise ValueError(f"read_input_into: out must be C-contiguous with {expected} bytes, has {out.nbytes}")
    target = out.reshape(-1).view(np.uint8)  # a view: the bytes land in `out`
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != expected:
                raise _size_error(path, size, manifest)
            done = 0
            while done < expected and (count := handle.readinto(target[done:])):
                done += count
    except FileNotFoundError:
        raise DatasetError(f"preprocessed input {str(path)!r} is missing; re-run preprocessing") from None
    if done != expected:  # the file shrank between stat and read
        raise _size_error(path, done, manifest)
    return out


def read_input(path: Path, manifest: Manifest) -> np.ndarray:
    """One preprocessed `.bin` as an array of the manifest's per-image shape, size-checked."""
    out = np.empty(manifest.input_shape()[1:], dtype=np.dtype(manifest.dtype))
    return read_input_into(path, manifest, out)


class ReadAhead(Generic[T]):
    """Iterate `source` one item ahead: a worker thread makes item i+1 while the caller works on item
    i, and waits for the caller before making i+2, so at most one item is ever waiting. An exception
    raised by `source` reaches the caller at the item where it happened. Use it as a context manager:
    leaving the block (normally, on an error or early) stops the worker and joins its thread."""

    _END = object()

    def __init__(self, source: Iterable[T], name: str = "gfocal-read-ahead") -> None:
        self._source = iter(source)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = self._pool.submit(next, self._source, self._END)

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._pending is None:
            raise StopIteration
        try:
            item = self._pending.result()
        except BaseException:
            self._pending = None
            raise
        if item is self._END:
            self._pending = None
            raise StopIteration
        self._pending = self._pool.submit(next, self._source, self._END)
        return item

    def close(self) -> None:
        """Drop the item made ahead, join the worker thread and close `source` (idempotent)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._pool.shutdown(wait=True)
        close = getattr(self._source, "close", None)
        if close is not None:  # a generator: runs its cleanup (finally blocks) now, in this thread
            close()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def non_finite_rows(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Per image of a batch: True where any floating output has NaN or infinity."""
    bad: np.ndarray | None = None
    for array in outputs.values():
        if not np.issubdtype(array.dtype, np.floating):
            continue
        rows = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return np.zeros(0, bool) if bad is None else bad


def outputs_problem(path: Path, kind: str, image_ids: list[int]) -> str | None:
    """Why the `outputs.npz` at `path` cannot be reused for `image_ids` of kind `kind`, or None when
    it reads back whole: its arrays are there, its image ids are the shard's, and (up to
    `CRC_CHECK_BYTES`) every array's CRC is right."""
    try:
        with np.load(path) as data:
            missing = sorted({"image_ids", *KINDS.get(kind, ())} - set(data.files))
            if missing:
                return f"arrays {missing} are missing"
            if data["image_ids"].tolist() != list(image_ids):
                return "its image ids are not the shard's"
        if path.stat().st_size <= CRC_CHECK_BYTES:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
            if broken is not None:
                return f"member {broken!r} fails its CRC check"
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        return f"it cannot be read ({type(exc).__name__}: {exc})"
    return None


class Backend(ABC):
    """Base of every backend. Subclasses set `name` and `kind` and implement `infer_shard`."""

    name: str = "backend"
    kind: str = "candidates"  # what outputs.npz holds: "candidates" or "dets" (after NMS)

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
        and this same backend identity; any other change to the manifest does not recompute it. A done
        marker, timing file or outputs.npz that does not read back whole is logged and recomputed."""
        out_dir = layout.output_shard(self.name, shard)
        marker = shard_done(out_dir)  # None for a damaged marker too (logged there)
        timing_file = layout.timing_file(self.name, shard)
        if (
            marker is None
            or not isinstance(marker, dict)
            or marker.get("shard_digest") != manifest.shard_digest(shard)
            or not timing_file.is_file()
        ):
            return None
        if any(marker.get(key) != value for key, value in self.identity().items()):
            return None
        ids = manifest.shards.get(shard, [])
        if marker.get("images") != len(ids) or marker.get("kind") not in KINDS:
            return self._not_reusable(shard, out_dir / DONE_FILE, "its image count or kind is wrong")
        timing = read_state_json(timing_file, "timing file")  # None when damaged (logged there)
        if not isinstance(timing, dict) or not isinstance(timing.get("summary"), dict):
            return self._not_reusable(shard, timing_file, "it has no timing summary")
        summary = timing["summary"]
        problem = outputs_problem(out_dir / OUTPUTS_FILE, marker["kind"], ids)
        if problem is not None:
            return self._not_reusable(shard, out_dir / OUTPUTS_FILE, problem)
        log.info("shard %s: outputs already complete for these inputs, reusing them", shard)
        return shard_result(self.name, shard, marker["images"], out_dir, summary, marker["kind"], reused=True)

    @staticmethod
    def _not_reusable(shard: str, path: Path, why: str) -> None:
        log.warning("shard %s: %s is corrupt (%s); recomputing the shard", shard, path, why)
        return None

    @abstractmethod
    def infer_shard(self, layout: RunLayout, manifest: Manifest, shard: str) -> ShardResult:
        """Run every image of `shard`, write outputs + timing in the shared layout."""


def check_nms_options(
    score_thr: object, iou_thr: object, max_per_img: object, spec: ModelSpec | None = None
) -> tuple[float, float, int]:
    """The host NMS settings as (float, float, int), or a BackendError naming the bad one; a None
    setting is the model's (`spec.postprocess`, GFocalV2's official values without a spec)."""
    if spec is not None:
        post = spec.postprocess
        score_thr = post.score_thr if score_thr is None else score_thr
        iou_thr = post.nms_iou if iou_thr is None else iou_thr
        max_per_img = post.max_per_img if max_per_img is None else max_per_img
    score_thr = SCORE_THR if score_thr is None else score_thr
    iou_thr = NMS_IOU if iou_thr is None else iou_thr
    max_per_img = MAX_PER_IMG if max_per_img is None else max_per_img

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

    Host NMS (`nms` given): each image's candidates go through `multiclass_nms` (class-aware unless
    `nms["class_aware"]` is False; labels at or beyond `num_classes` dropped) and only its
    `max_per_img` rows are kept. Without `nms` (the model ends in NMS) the batch's dets/labels are
    copied as they are. With `keep_candidates` the raw batch outputs are also kept (debug mode only).
    """

    def __init__(
        self,
        images: int,
        nms: dict[str, Any] | None,
        keep_candidates: bool,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        self.images = images
        self.nms = nms
        self.num_classes = num_classes
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
                    self.num_classes,
                    self.nms.get("class_aware", True),
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
    host NMS that turns each batch's candidates into the final detections written as kind "dets".

    `warmup` extra untimed runs of the first batch come before it is timed; with the default 0 the
    first batch is timed like the others (its cold-start cost counts), so no batch runs twice."""

    kind = "dets"  # what outputs.npz holds; `model_kind` is what `run_batch` returns
    model_kind = "candidates"  # or "dets" for a graph that ends in NMS (passed through unchanged)
    overlap_postprocess = True  # host NMS of batch i in a worker thread while batch i+1 runs

    def __init__(
        self,
        batch_size: int = 1,
        warmup: int = 0,
        keep_candidates: bool = False,
        score_thr: float | None = None,
        iou_thr: float | None = None,
        max_per_img: int | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.check_batch_size(batch_size)
        self.batch_size = batch_size
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise BackendError(f"warmup must be an integer >= 0 (untimed runs before timing), got {warmup!r}")
        self.warmup = warmup
        if not isinstance(keep_candidates, bool):
            raise BackendError(f"keep_candidates must be true or false, got {keep_candidates!r}")
        self.keep_candidates = keep_candidates
        self.spec = spec
        self.score_thr, self.iou_thr, self.max_per_img = check_nms_options(
            score_thr, iou_thr, max_per_img, spec
        )
        # the model's classes (labels at or beyond are a padding channel) and its NMS kind
        self.num_classes = spec.num_classes if spec is not None else NUM_CLASSES
        self.class_aware = spec.postprocess.class_aware if spec is not None else True

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
        """How the written detections were made: host NMS and its settings, or NMS inside the graph.
        Class-agnostic host NMS adds "class_aware": False (class-aware records stay as they were)."""
        if self.model_kind != "candidates":
            return {"nms": "graph"}
        agnostic = {} if self.class_aware else {"class_aware": False}
        return {
            "nms": "host",
            "score_thr": self.score_thr,
            "iou_thr": self.iou_thr,
            "max_per_img": self.max_per_img,
            **agnostic,
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
        """(image ids, stacked inputs) per batch, read from the manifest's input folder of `shard`; each
        batch is a new array its images are read straight into."""
        ids = manifest.shards.get(shard)
        if ids is None:
            raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
        directory = manifest.input_dir(shard)
        shape, dtype = manifest.input_shape()[1:], np.dtype(manifest.dtype)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            batch = np.empty((len(chunk), *shape), dtype)
            for row, image_id in enumerate(chunk):
                read_input_into(directory / input_file_name(image_id), manifest, batch[row])
            yield chunk, batch

    def run_batches(
        self, layout: RunLayout, manifest: Manifest, shard: str, found: ShardDetections
    ) -> tuple[list[float], list[int]]:
        """Run the shard's batches into `found`: batch i+1 is read while batch i runs, and (with
        `overlap_postprocess`) batch i's host NMS runs while batch i+1 runs; it is handed to its
        thread just before batch i+1 starts, so the two threads do not trade the GIL between batches.
        Returns the timed latencies (ms) and the ids of images whose outputs are not finite."""
        latencies: list[float] = []
        non_finite: list[int] = []
        waiting: tuple[list[int], dict[str, np.ndarray]] | None = None  # ran, NMS not started
        ran = 0
        with (
            ReadAhead(self.batches(layout, manifest, shard)) as batches,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="gfocal-host-nms") as post,
        ):
            for ids, batch in batches:
                if not latencies:
                    for _ in range(self.warmup):  # warm-up runs are not timed and not recorded
                        self.run_batch(batch)
                adding = post.submit(found.add, *waiting) if waiting is not None else None
                start = time.perf_counter()
                result = self.run_batch(batch)
                latencies.append((time.perf_counter() - start) * 1000.0)
                bad = non_finite_rows(result)
                non_finite += [image_id for image_id, flag in zip(ids, bad, strict=False) if flag]
                if adding is not None:
                    adding.result()  # the previous batch's NMS: one batch of candidates waits, at most
                waiting = None if non_finite else (ids, result)  # a failing shard skips its NMS
                if waiting is not None and not self.overlap_postprocess:
                    found.add(*waiting)
                    waiting = None
                ran += len(ids)
                log.info(
                    "shard %s: %d/%d images, last batch %.1f ms", shard, ran, found.images, latencies[-1]
                )
        if waiting is not None:  # the last batch: nothing left to overlap with
            found.add(*waiting)
        return latencies, non_finite

    def check_finite(self, shard: str, image_ids: list[int]) -> None:
        """A BackendError naming the images whose outputs have NaN or infinity, if any."""
        if not image_ids:
            return
        named = ", ".join(str(i) for i in image_ids[:NON_FINITE_LISTED])
        more = f" and {len(image_ids) - NON_FINITE_LISTED} more" if len(image_ids) > NON_FINITE_LISTED else ""
        raise BackendError(
            f"{self.name} produced NaN or infinite outputs for {len(image_ids)} image(s) of shard "
            f"{shard!r} (ids {named}{more}); nothing was written for the shard. Check the model (export, "
            "precision) and those images' preprocessed inputs"
        )

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
            len(manifest.shards[shard]),
            post if post["nms"] == "host" else None,
            self.keep_candidates,
            self.num_classes,
        )
        latencies, non_finite = self.run_batches(layout, manifest, shard, found)
        self.check_finite(shard, non_finite)
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
