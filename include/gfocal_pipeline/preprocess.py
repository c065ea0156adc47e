"""Turn COCO images into fixed-shape model inputs (`inputs/<shard>/<image_id:012d>.bin`) plus `manifest.json`.

Policies (geometry of each image recorded in the manifest, so boxes map back exactly):

- ``letterbox`` — the ModelZoo seed (`gfocal_preprocess.py`): scale = min(W/w, H/h), new size =
  floor(w*scale) x floor(h*scale), bilinear resize, image at the top-left of the HxW canvas.
  scale_x = scale_y = scale. This is what the published Ascend numbers (AP 0.406) used.
- ``mmdet`` — the official test pipeline (AP 41.0): keep ratio into (1333, 800), i.e.
  scale = min(1333/long, 800/short), new size = int(w*scale + 0.5) x int(h*scale + 0.5) (mmcv
  rounding), bilinear, padded to a multiple of 32 and placed top-left in the fixed canvas.
  scale_x = new_w/w, scale_y = new_h/h. The scale is never shrunk to fit the canvas (that would
  silently stop being the official pipeline): an image whose padded size does not fit raises
  `DatasetError`, checked for the whole set before any work, naming the images and the canvas
  needed. Landscape-only sets fit height=800, width=1344; COCO val (portrait too) needs 1344x1344.

Data types:

- ``float32`` — NCHW normalized RGB, bytes identical to the seed: BGR->RGB, (x - mean) * (1/std)
  with mmcv's `imnormalize` operation order and float32 mean/std, zero padding (= the mean colour),
  little-endian, 3*H*W*4 bytes (11,673,600 for 800x1216).
- ``uint8`` — NHWC BGR, the resized cv2 image as is (normalized in the graph or by Ascend AIPP),
  padded with round(mean) per channel (BGR 104, 116, 124) so the padding normalizes to ~0;
  3*H*W bytes (2,918,400 for 800x1216), a quarter of the disk and I/O.

Images are processed by a pool of threads in the calling process (OpenCV's decode, resize and
normalize and numpy's copies release the GIL; memory per worker is one image): no child processes,
so it runs inside any Celery worker pool (a prefork child is daemonic and may not have children) and
never re-imports the host (Airflow) in a child. Each input is written atomically, and only assigned
to shards once all are done, so shards hold exactly `shard_size` images in id order. The manifest
is written last: a run dir with a manifest is complete. A re-run with the same parameters rewrites
the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    MEAN_RGB,
    MMDET_SCALE,
    SIZE_DIVISOR,
    STD_RGB,
)
from gfocal_pipeline.dataset import DEFAULT_ANNOTATION_FILE, DEFAULT_IMAGE_DIR, CocoImage, load_coco
from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file
from gfocal_pipeline.layout import RunLayout, input_file_name, shard_name
from gfocal_pipeline.manifest import DTYPES, POLICIES, Geometry, ImageEntry, Manifest

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
# mmcv.imnormalize: float64 (1, 3) mean and 1/std built from the float32 arrays of the config.
_MEAN = np.float64(np.array(MEAN_RGB, dtype=np.float32).reshape(1, -1))
_STDINV = 1.0 / np.float64(np.array(STD_RGB, dtype=np.float32).reshape(1, -1))
PAD_BGR_U8 = tuple(round(value) for value in reversed(MEAN_RGB))  # (104, 116, 124)
_SHOW = 5


def letterbox_size(width: int, height: int, canvas_h: int, canvas_w: int) -> tuple[int, int, float]:
    """(new_w, new_h, scale) of the seed: scale = min(W/w, H/h), sizes floored (at least 1 pixel)."""
    scale = min(canvas_w / width, canvas_h / height)
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale)), scale


def mmdet_size(width: int, height: int) -> tuple[int, int]:
    """(new_w, new_h) of mmcv `rescale_size` into (1333, 800): keep ratio, round half up."""
    factor = min(max(MMDET_SCALE) / max(width, height), min(MMDET_SCALE) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def mmdet_canvas(width: int, height: int) -> tuple[int, int]:
    """(height, width) an image needs under the mmdet policy: its resized size padded to /32."""
    new_w, new_h = mmdet_size(width, height)
    return (
        math.ceil(new_h / SIZE_DIVISOR) * SIZE_DIVISOR,
        math.ceil(new_w / SIZE_DIVISOR) * SIZE_DIVISOR,
    )


def normalize(img_bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR HWC -> float32 normalized RGB HWC, in mmcv `imnormalize`'s operation order."""
    out = img_bgr.astype(np.float32)
    cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    cv2.subtract(out, _MEAN, out)
    cv2.multiply(out, _STDINV, out)
    return out


def _check_options(policy: str, dtype: str, height: int, width: int) -> None:
    if policy not in POLICIES:
        raise DatasetError(f"unknown preprocessing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if dtype not in DTYPES:
        raise DatasetError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < SIZE_DIVISOR:
            raise DatasetError(f"model input {name}={value!r} must be an integer >= {SIZE_DIVISOR}")


def image_geometry(w: int, h: int, policy: str, height: int, width: int) -> Geometry:
    """Where a w x h image lands in the height x width canvas under `policy` (see the module docstring)."""
    if policy == "letterbox":
        new_w, new_h, scale = letterbox_size(w, h, height, width)
        scale_x = scale_y = scale
    else:
        need_h, need_w = mmdet_canvas(w, h)
        if need_h > height or need_w > width:
            raise DatasetError(
                f"policy 'mmdet' needs a canvas of height {need_h} and width {need_w} for a {w}x{h} (w x h) "
                f"image but the model input is {height}x{width} (h x w); preprocess with height>={need_h} "
                f"and width>={need_w}"
            )
        new_w, new_h = mmdet_size(w, h)
        scale_x, scale_y = new_w / w, new_h / h
    return Geometry(
        width=w,
        height=h,
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        resized_width=new_w,
        resized_height=new_h,
        pad=(0, 0, width - new_w, height - new_h),
    )


def preprocess_image(
    img_bgr: np.ndarray,
    policy: str = "letterbox",
    dtype: str = "float32",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> tuple[np.ndarray, Geometry]:
    """One cv2 (BGR uint8 HWC) image -> model input and its geometry.

    Returns a C-contiguous float32 (3, H, W) normalized RGB array, or a uint8 (H, W, 3) BGR array.
    """
    _check_options(policy, dtype, height, width)
    if (
        not isinstance(img_bgr, np.ndarray)
        or img_bgr.dtype != np.uint8
        or img_bgr.ndim != 3
        or img_bgr.shape[2] != 3
    ):
        shape = getattr(img_bgr, "shape", None)
        kind = getattr(img_bgr, "dtype", type(img_bgr).__name__)
        raise DatasetError(f"expected a uint8 BGR image of shape (h, w, 3), got {kind} {shape}")
    h, w = img_bgr.shape[:2]
    geometry = image_geometry(w, h, policy, height, width)
    new_w, new_h = geometry.resized_width, geometry.resized_height
    resized = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if dtype == "float32":
        canvas = np.zeros((height, width, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = normalize(resized)
        array = np.ascontiguousarray(canvas.transpose(2, 0, 1))
    else:
        array = np.empty((height, width, 3), dtype=np.uint8)
        array[...] = PAD_BGR_U8
        array[:new_h, :new_w] = resized
    return array, geometry


# --------------------------------------------------------------------------------------------------
# Whole data set


@dataclass(frozen=True)
class _Job:
    image_id: int
    source: str
    target: str  # "" plans only: decode and place the image, write nothing
    policy: str
    dtype: str
    height: int
    width: int


_Result = tuple[int, Geometry | None, str]


@contextlib.contextmanager
def _single_threaded_cv2() -> Iterator[None]:
    """OpenCV's own thread pool off while our workers run (one worker per core already; avoids
    cores x cores oversubscription); the caller's setting is restored afterwards."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _run_job(job: _Job) -> _Result:
    """Read, preprocess and atomically write one image; (id, geometry, "") or (id, None, reason)."""
    img = cv2.imread(job.source, cv2.IMREAD_COLOR)
    if img is None:
        return job.image_id, None, "OpenCV cannot decode it (corrupt, truncated or not an image)"
    try:
        if not job.target:
            h, w = img.shape[:2]
            return job.image_id, image_geometry(w, h, job.policy, job.height, job.width), ""
        array, geometry = preprocess_image(img, job.policy, job.dtype, job.height, job.width)
    except DatasetError as exc:
        raise DatasetError(f"image {job.source!r}: {exc}") from None
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    try:
        with atomic_path(job.target) as tmp:
            little.tofile(tmp)
    except OSError as exc:
        raise DatasetError(
            f"cannot write preprocessed input {job.target!r} ({exc.strerror or exc}); "
            "check free disk space and permissions of the run directory"
        ) from None
    return job.image_id, geometry, ""


def _run_jobs(jobs: Iterable[_Job], workers: int) -> Iterator[_Result]:
    """Results in completion order from `workers` threads; at most `4 * workers` jobs in flight;
    the first worker error propagates (jobs not started yet are cancelled)."""
    if workers == 1:
        for job in jobs:
            yield _run_job(job)
        return
    source = iter(jobs)
    with (
        _single_threaded_cv2(),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gfocal-preprocess") as pool,
    ):
        pending: dict[Future[_Result], _Job] = {}
        try:
            while True:
                while len(pending) < 4 * workers and (job := next(source, None)) is not None:
                    pending[pool.submit(_run_job, job)] = job
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        result = future.result()
                    except BaseException as exc:
                        exc.add_note(f"while preprocessing {job.source}")
                        raise
                    yield result
        finally:  # on an error or an abandoned generator: drop what has not started
            for other in pending:
                other.cancel()


class _Progress:
    """Logs done/total, rate and ETA at most every `interval` seconds, and once at the end."""

    def __init__(self, total: int, interval: float) -> None:
        self.total, self.interval, self.done = total, interval, 0
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate
            log.info("preprocess: %d/%d images (%.1f img/s, ETA %.0f s)", self.done, self.total, rate, eta)

    def finish(self) -> float:
        elapsed = time.monotonic() - self.start
        log.info(
            "preprocess: %d/%d images in %.1f s (%.1f img/s)",
            self.done,
            self.total,
            elapsed,
            self.done / max(elapsed, 1e-9),
        )
        return elapsed


def _check_mmdet_fits(images: list[CocoImage], height: int, width: int) -> None:
    """Fail before any work when the canvas cannot hold the mmdet-resized images (annotation sizes)."""
    needs = [(image, *mmdet_canvas(image.width, image.height)) for image in images]
    too_big = [(image, h, w) for image, h, w in needs if h > height or w > width]
    if not too_big:
        return
    need_h = max(h for _, h, _ in needs)
    need_w = max(w for _, _, w in needs)
    shown = ", ".join(
        f"{image.file_name} ({image.width}x{image.height} needs height {h}, width {w})"
        for image, h, w in too_big[:_SHOW]
    ) + (" ..." if len(too_big) > _SHOW else "")
    raise DatasetError(
        f"policy 'mmdet' keeps the official (1333, 800) scale and pads to /32, so {len(too_big)} image(s) "
        f"do not fit the {height}x{width} (h x w) model input: {shown}; preprocess with height={need_h} "
        f"width={need_w} (and export the model for that shape), or use policy='letterbox'"
    )


def _bin_files(inputs_dir: Path) -> Iterator[Path]:
    if inputs_dir.is_dir():
        for child in inputs_dir.iterdir():
            if child.is_dir():
                yield from (path for path in child.iterdir() if path.is_file())


def _check_disk_space(inputs_dir: Path, needed: int) -> None:
    existing = sum(path.stat().st_size for path in _bin_files(inputs_dir))
    probe = inputs_dir if inputs_dir.is_dir() else inputs_dir.parent
    free = shutil.disk_usage(probe).free
    if free + existing < needed:
        gib = 1 << 30
        raise DatasetError(
            f"preprocessed inputs need {needed / gib:.2f} GiB but only {(free + existing) / gib:.2f} GiB "
            f"is available under {str(inputs_dir)!r}; free disk space, use dtype='uint8' (4x smaller) "
            "or limit max_images"
        )


def _clear_inputs(inputs_dir: Path) -> None:
    """Remove inputs of an earlier run (they are regenerated; keeping them would double the disk use)."""
    for path in list(_bin_files(inputs_dir)):
        if path.suffix in (".bin", ".tmp"):
            path.unlink(missing_ok=True)
    if inputs_dir.is_dir():
        for child in inputs_dir.iterdir():
            if child.is_dir() and not any(child.iterdir()):
                child.rmdir()


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fresh_inputs(layout: RunLayout, needed_bytes: int) -> Path:
    """Check the run directory and its free space, remove the old manifest and inputs (they no longer
    describe what is on disk) and return an empty staging folder."""
    ensure_writable_dir(layout.root, "run directory")
    _check_disk_space(layout.inputs_dir, needed_bytes)
    layout.manifest.unlink(missing_ok=True)
    _clear_inputs(layout.inputs_dir)
    staging = layout.inputs_dir / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _run_all(
    jobs: Iterator[_Job], n_workers: int, count: int, progress_interval_s: float
) -> tuple[dict[int, Geometry], dict[int, str]]:
    """Run every job: (geometry by image id, failure reason by image id)."""
    geometries: dict[int, Geometry] = {}
    bad: dict[int, str] = {}
    progress = _Progress(count, progress_interval_s)
    for image_id, geometry, reason in _run_jobs(jobs, n_workers):
        progress.step()
        if geometry is None:
            bad[image_id] = reason
        else:
            geometries[image_id] = geometry
    progress.finish()
    return geometries, bad


def _check_bad(images: list[CocoImage], bad: dict[int, str], image_dir: Path, skip: bool) -> list[CocoImage]:
    """The unreadable images: an error naming them, or (with `skip`) logged and returned."""
    bad_images = [image for image in images if image.image_id in bad]
    if bad_images and not skip:
        raise DatasetError(
            f"{len(bad_images)} image(s) in {str(image_dir)!r} cannot be read: "
            f"{', '.join(str(image.path) for image in bad_images[:_SHOW])}"
            f"{' ...' if len(bad_images) > _SHOW else ''} ({bad[bad_images[0].image_id]}); "
            "replace them, or pass skip_bad_images=True to leave them out of the run"
        )
    for image in bad_images:
        log.warning("preprocess: skipping unreadable image %s: %s", image.path, bad[image.image_id])
    return bad_images


def hash_images(images: list[CocoImage], workers: int) -> dict[int, str]:
    """sha256 of every image file by image id (threads: hashlib releases the GIL); an unreadable
    file maps to "" and is reported by the decoder later."""

    def one(image: CocoImage) -> tuple[int, str]:
        try:
            return image.image_id, sha256_file(image.path)
        except OSError:
            return image.image_id, ""

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gfocal-hash") as pool:
        return dict(pool.map(one, images))


def _link(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (same volume), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _reuse_from(
    donor: Manifest | None, images: list[CocoImage], hashes: dict[int, str], staging: Path
) -> dict[int, Geometry]:
    """Inputs of `donor` (same policy, dtype and size) whose source image has the same sha256 are
    linked into `staging` instead of being computed again: a changed image is the only one redone."""
    if donor is None:
        return {}
    by_sha = {entry.sha256: entry for entry in donor.images if entry.sha256}
    reused: dict[int, Geometry] = {}
    for image in images:
        entry = by_sha.get(hashes.get(image.image_id, ""))
        if entry is None:
            continue
        source = donor.input_dir(entry.shard) / input_file_name(entry.image_id)
        try:
            if source.stat().st_size != donor.bytes_per_image:
                continue
            _link(source, staging / input_file_name(image.image_id))
        except OSError:
            continue
        reused[image.image_id] = entry.geometry
    if reused:
        log.info("preprocess: %d of %d inputs reused from %s", len(reused), len(images), donor.path)
    return reused


def _place(
    kept: list[CocoImage],
    geometries: dict[int, Geometry],
    staging: Path | None,
    layout: RunLayout,
    shard_size: int,
    hashes: dict[int, str],
) -> tuple[list[ImageEntry], dict[str, list[int]]]:
    """Move the staged inputs into their shards (none when `staging` is None: a plan only); the
    manifest entries and the shards' image ids."""
    entries: list[ImageEntry] = []
    shards: dict[str, list[int]] = {}
    for index, image in enumerate(kept):
        shard = shard_name(index // shard_size)
        target_dir = layout.input_shard(shard)
        if shard not in shards:
            if staging is not None:
                target_dir.mkdir(parents=True, exist_ok=True)
            shards[shard] = []
        name = input_file_name(image.image_id)
        if staging is not None:
            os.replace(staging / name, target_dir / name)
        shards[shard].append(image.image_id)
        geometry = geometries[image.image_id]
        entries.append(ImageEntry(image.image_id, image.file_name, shard, geometry, hashes[image.image_id]))
        if (image.width, image.height) != (geometry.width, geometry.height):
            log.warning(
                "preprocess: %s is %dx%d but the annotation file says %dx%d; using the real size",
                image.path,
                geometry.width,
                geometry.height,
                image.width,
                image.height,
            )
    return entries, shards


def _check_arguments(
    policy: str, dtype: str, height: int, width: int, shard_size: object, workers: object
) -> None:
    _check_options(policy, dtype, height, width)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DatasetError(f"shard_size={shard_size!r} must be a positive integer (images per shard)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DatasetError(f"workers={workers!r} must be a positive integer or None (all CPU cores)")


def preprocess(
    coco_root: str | Path,
    run_dir: str | Path,
    policy: str = "letterbox",
    dtype: str = "float32",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    shard_size: int = 8,
    max_images: int | None = None,
    workers: int | None = None,
    skip_bad_images: bool = False,
    image_dir: str = DEFAULT_IMAGE_DIR,
    annotation_file: str = DEFAULT_ANNOTATION_FILE,
    progress_interval_s: float = 10.0,
    *,
    write_inputs: bool = True,
    image_hashes: dict[int, str] | None = None,
    donor: Manifest | None = None,
) -> Manifest:
    """Preprocess a COCO set into `run_dir` (manifest.json + inputs/<shard>/<id:012d>.bin).

    Undecodable images raise `DatasetError` naming them, or with `skip_bad_images` are listed in
    `manifest.skipped` and left out. `workers` defaults to the usable CPU cores. The manifest records
    each image file's sha256 (`image_hashes` when the caller already has them) and the annotation
    file's. `write_inputs=False` writes only the manifest (every image decoded and placed, no
    inputs: each inference task then builds its own shard, see `materialize_shard`). Inputs of
    `donor` whose image is unchanged are linked instead of recomputed.
    """
    _check_arguments(policy, dtype, height, width, shard_size, workers)
    dataset = load_coco(coco_root, image_dir, annotation_file, max_images)
    images = dataset.images
    if policy == "mmdet":
        _check_mmdet_fits(images, height, width)
    layout = RunLayout.at(Path(run_dir))
    per_image = 3 * height * width * np.dtype(dtype).itemsize
    staging = _fresh_inputs(layout, len(images) * per_image if write_inputs else 0)
    n_workers = max(1, min(workers or _default_workers(), len(images)))
    hashes = dict(image_hashes or {})  # the inputs cache hashed them for its key already
    missing = [image for image in images if image.image_id not in hashes]
    if missing:
        hashes.update(hash_images(missing, n_workers))
    reused = _reuse_from(donor, images, hashes, staging) if write_inputs else {}
    shape = f"policy={policy} dtype={dtype} {height}x{width}, shard_size={shard_size}, {n_workers} workers"
    log.info(
        "preprocess: %d of %d images from %s -> %s (%s%s)",
        len(images),
        dataset.total_images,
        dataset.root,
        layout.inputs_dir if write_inputs else "a manifest only",
        shape,
        f", {len(reused)} reused" if reused else "",
    )
    job_options = (policy, dtype, height, width)
    jobs = (
        _Job(
            image.image_id,
            str(image.path),
            str(staging / input_file_name(image.image_id)) if write_inputs else "",
            *job_options,
        )
        for image in images
        if image.image_id not in reused
    )
    geometries, bad = _run_all(jobs, n_workers, len(images) - len(reused), progress_interval_s)
    geometries.update(reused)
    bad_images = _check_bad(images, bad, dataset.image_dir, skip_bad_images)
    kept = [image for image in images if image.image_id in geometries]
    if not kept:
        raise DatasetError(f"none of the {len(images)} images in {str(dataset.image_dir)!r} can be read")
    entries, shards = _place(kept, geometries, staging if write_inputs else None, layout, shard_size, hashes)
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # nothing written (a plan): no empty inputs/ folder either
        layout.inputs_dir.rmdir()
    skipped = [
        {"image_id": i.image_id, "file_name": i.file_name, "reason": bad[i.image_id]} for i in bad_images
    ]
    paths = (str(dataset.root), str(dataset.annotation_file), str(dataset.image_dir))
    manifest = Manifest(
        policy,
        dtype,
        height,
        width,
        shard_size,
        *paths,
        entries,
        shards,
        skipped,
        annotation_sha256=sha256_file(dataset.annotation_file),
    )
    manifest.write(layout.manifest)
    log.info(
        "preprocess: wrote %s with %d images in %d shards (%d skipped)",
        layout.manifest,
        len(entries),
        len(shards),
        len(bad_images),
    )
    return manifest


def materialize_shard(manifest: Manifest, shard: str, target: Path, workers: int | None = None) -> Path:
    """Build `shard`'s inputs into `target` from the source images (for a manifest written with
    `write_inputs=False`): the same bytes preprocessing would have written. An image that changed
    since the manifest was written (sha256 or size) is an error, never silently used."""
    entries = [entry for entry in manifest.images if entry.shard == shard]
    if not entries:
        raise DatasetError(f"shard {shard!r} is not in manifest {str(manifest.path)!r}")
    image_dir = Path(manifest.image_dir)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for entry in entries:
            source = image_dir / entry.file_name
            if entry.sha256 and sha256_file(source) != entry.sha256:
                raise DatasetError(
                    f"image {str(source)!r} changed since preprocessing wrote {str(manifest.path)!r}; "
                    "re-run preprocessing (trigger a new run)"
                )
        opts = (manifest.policy, manifest.dtype, manifest.input_height, manifest.input_width)
        jobs = (
            _Job(e.image_id, str(image_dir / e.file_name), str(staging / input_file_name(e.image_id)), *opts)
            for e in entries
        )
        by_id = manifest.by_id()
        for image_id, geometry, reason in _run_jobs(
            jobs, max(1, min(workers or _default_workers(), len(entries)))
        ):
            if geometry != by_id[image_id].geometry:
                raise DatasetError(
                    f"image {by_id[image_id].file_name!r} of shard {shard} cannot be rebuilt as "
                    f"preprocessing placed it ({reason or 'its size changed'}); re-run preprocessing"
                )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
