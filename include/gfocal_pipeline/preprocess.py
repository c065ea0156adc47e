"""Turn COCO images into fixed-shape model inputs (`inputs/<shard>/<image_id:012d>.bin`) plus `manifest.json`.

Policies (geometry of each image recorded in the manifest, so boxes map back exactly):

- ``letterbox`` — the ModelZoo seed (`gfocal_preprocess.py`): scale = min(W/w, H/h), new size =
  floor(w*scale) x floor(h*scale), bilinear resize, image at the top-left of the HxW canvas.
  scale_x = scale_y = scale. This is what the published Ascend numbers (AP 0.406) used.
- ``centered`` — the letterbox scale and size, the image in the middle of the canvas (left and top
  padding (W - new_w) // 2 and (H - new_h) // 2, recorded as the geometry's offset).
- ``mmdet`` — the official test pipeline (AP 41.0): keep ratio into the model's `resize_scale`
  (1333, 800 for mmdet's R50 detectors), i.e. scale = min(1333/long, 800/short), new size =
  int(w*scale + 0.5) x int(h*scale + 0.5) (mmcv rounding), bilinear, padded to a multiple of the
  model's `size_divisor` (32) and placed top-left in the fixed canvas.
  scale_x = new_w/w, scale_y = new_h/h. The scale is never shrunk to fit the canvas (that would
  silently stop being the official pipeline): an image whose padded size does not fit raises
  `DatasetError`, checked for the whole set before any work, naming the images and the canvas
  needed. Landscape-only sets fit height=800, width=1344; COCO val (portrait too) needs 1344x1344.

Pixels follow the model's `PixelFormat` (`pixels.py`, from its spec): the network's channel order
(RGB or BGR), mean/std or none, and the value of a padded pixel in its input (0 for mmdet's normalized
models, 114 for YOLOX). The examples below are GFocalV2's (RGB, ImageNet mean/std, pad 0).

Data types:

- ``uint8`` (recommended for Ascend and ONNX Runtime) — NHWC BGR, the resized cv2 image as is,
  padded with the raw colour that normalizes to the pad value (round(pad * std + mean) per channel:
  BGR 104, 116, 124 for GFocalV2, 114 for YOLOX);
  3*H*W bytes (2,918,400 for 800x1216): a quarter of the disk and I/O, and 4-7x the preprocessing
  throughput of float32 (`benchmarks/bench_preprocess.py`). The normalization happens on the
  device: Ascend's AIPP (static, in the .om model) or, for ONNX Runtime, inside the graph (export
  with normalize-in-graph).
- ``float32`` — NCHW in the network's channel order, normalized; for GFocalV2 bytes identical to the
  seed: BGR->RGB, (x - mean) * (1/std) with mmcv's `imnormalize` operation order and float32 mean/std,
  padding = the pad value (0: the mean colour),
  little-endian, 3*H*W*4 bytes (11,673,600 for 800x1216). Use it to compare with the recipe's
  .bin files, or for a backend that cannot normalize.

How it is fast without changing a byte: the normalization is elementwise and its input is uint8, so
it is a 256-entry table per channel, computed once per pixel format with `normalize` itself (mmcv's
operation order) and applied with `cv2.LUT` from the resized uint8 planes straight into the CHW
float32 canvas (the channel order is the choice of plane; no float colour conversion, no transpose
copy). For uint8,
`cv2.resize` writes straight into the canvas. Each worker thread keeps one canvas in the final
layout whose padding is written once (before each image only what the previous one covered and this
one does not is reset), and the file is written from that buffer (`os.write`, no copy).

Image files are checked before decoding: a JPEG whose marker structure never reaches its end-of-image
marker (0xFFD9) or a PNG without its IEND chunk is truncated (OpenCV would decode a truncated JPEG
into a partly grey image with only a libjpeg warning on stderr), and an image whose header (JPEG
frame header SOFn, PNG IHDR) claims more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`,
100 megapixels: COCO's largest images are under half a megapixel) is over the pixel budget: a
631-byte JPEG claiming 20000x20000 would otherwise decode into 1.2 GB. Both count as unreadable, like
a file OpenCV cannot decode or refuses (its own limit, `cv2.error`): an error naming it, or with
`skip_bad_images` listed in `manifest.skipped` with the reason. Other formats have no header check:
OpenCV's limit (2^30 pixels) bounds their decode and the budget is checked right after it.
Grayscale, CMYK and EXIF-rotated JPEGs, PNGs (whatever their extension) and 1x1 images decode as
`cv2.imread(path, cv2.IMREAD_COLOR)` does.

Images are processed by a pool of threads in the calling process (OpenCV's decode, resize and
table look-up and the writes release the GIL; memory per worker is one image and its canvas): no
child processes, so it runs inside any Celery worker pool (a prefork child is daemonic and may not
have children) and never re-imports the host (Airflow) in a child. Each input is written atomically,
and only assigned to shards once all are done, so shards hold exactly `shard_size` images in id
order. The manifest is written last: a run dir with a manifest is complete. A re-run with the same
parameters rewrites the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_MAX_PIXELS,
    DEFAULT_WIDTH,
    MMDET_SCALE,
    SIZE_DIVISOR,
)
from gfocal_pipeline.dataset import (
    DEFAULT_ANNOTATION_FILE,
    DEFAULT_IMAGE_DIR,
    CocoDataset,
    CocoImage,
    load_coco,
)
from gfocal_pipeline.errors import DatasetError, os_error_fix
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file
from gfocal_pipeline.layout import RunLayout, input_file_name, shard_name
from gfocal_pipeline.manifest import DTYPES, POLICIES, Geometry, ImageEntry, Manifest
from gfocal_pipeline.pixels import DEFAULT_PIXELS, PixelFormat
from gfocal_pipeline.sharding import ShardPlan, resolve_shard_size

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
PAD_BGR_U8 = DEFAULT_PIXELS.pad_bgr_u8()  # (104, 116, 124): ImageNet's mean colour
_SHOW = 5
_WRITE_CHUNK = 1 << 18  # bytes per write call
_JPEG_SOI = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the end of a JPEG scan: 0xFF followed by neither 0x00 (a stuffed byte) nor RST0..7
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# JPEG frame headers (SOF0..SOF15 but DHT 0xC4, JPG 0xC8 and DAC 0xCC): precision, height, width
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def letterbox_size(width: int, height: int, canvas_h: int, canvas_w: int) -> tuple[int, int, float]:
    """(new_w, new_h, scale) of the seed: scale = min(W/w, H/h), sizes floored (at least 1 pixel)."""
    scale = min(canvas_w / width, canvas_h / height)
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale)), scale


def mmdet_size(width: int, height: int, scale: tuple[int, int] = MMDET_SCALE) -> tuple[int, int]:
    """(new_w, new_h) of mmcv `rescale_size` into `scale` (default (1333, 800)): keep ratio, round
    half up."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def mmdet_canvas(width: int, height: int, pixels: PixelFormat = DEFAULT_PIXELS) -> tuple[int, int]:
    """(height, width) an image needs under the mmdet policy: its resized size (the model's
    `resize_scale`) padded to its `size_divisor`."""
    new_w, new_h = mmdet_size(width, height, pixels.resize_scale)
    divisor = pixels.size_divisor
    return math.ceil(new_h / divisor) * divisor, math.ceil(new_w / divisor) * divisor


def normalize(img_bgr: np.ndarray, pixels: PixelFormat = DEFAULT_PIXELS) -> np.ndarray:
    """uint8 BGR HWC -> float32 HWC in the network's channel order, normalized as `pixels` says, in
    mmcv `imnormalize`'s operation order (float64 mean and 1/std from the float32 config values)."""
    out = img_bgr.astype(np.float32)
    if pixels.swaps_channels:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    if pixels.mean is not None:
        cv2.subtract(out, np.float64(np.array(pixels.mean, dtype=np.float32).reshape(1, -1)), out)
    if pixels.std is not None:
        cv2.multiply(out, 1.0 / np.float64(np.array(pixels.std, dtype=np.float32).reshape(1, -1)), out)
    return out


@functools.lru_cache(maxsize=16)
def _normalize_tables(pixels: PixelFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`normalize` as three 256-entry float32 tables (the network's channels in order), for `cv2.LUT`.

    Built by `normalize` itself on every uint8 value: an elementwise operation on uint8 input is a
    table, so applying it gives the same bytes as `normalize` on the whole image.
    """
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # B = G = R = v
    out = normalize(values, pixels)[0]
    first, second, third = (np.ascontiguousarray(out[:, c]).reshape(1, 256) for c in range(3))
    return first, second, third


def _check_options(policy: str, dtype: str, height: int, width: int, pixels: object = DEFAULT_PIXELS) -> None:
    if not isinstance(pixels, PixelFormat):
        raise DatasetError(f"pixels={pixels!r} must be a PixelFormat (gfocal_pipeline.pixels)")
    if policy not in POLICIES:
        raise DatasetError(f"unknown preprocessing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if dtype not in DTYPES:
        raise DatasetError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < SIZE_DIVISOR:
            raise DatasetError(
                f"model input {name}={value!r} must be an integer >= {SIZE_DIVISOR} and a multiple of "
                f"{SIZE_DIVISOR}, e.g. {name}={DEFAULT_HEIGHT if name == 'height' else DEFAULT_WIDTH}"
            )
        if value % SIZE_DIVISOR:
            below = value // SIZE_DIVISOR * SIZE_DIVISOR
            raise DatasetError(
                f"model input {name}={value} is not a multiple of {SIZE_DIVISOR} (the network downsamples "
                f"by {SIZE_DIVISOR}; the model could not be exported for it): preprocess with "
                f"{name}={below} or {name}={below + SIZE_DIVISOR}"
            )


def image_geometry(
    w: int, h: int, policy: str, height: int, width: int, pixels: PixelFormat = DEFAULT_PIXELS
) -> Geometry:
    """Where a w x h image lands in the height x width canvas under `policy` (see the module docstring)."""
    left = top = 0
    if policy in ("letterbox", "centered"):
        new_w, new_h, scale = letterbox_size(w, h, height, width)
        scale_x = scale_y = scale
        if policy == "centered":
            left, top = (width - new_w) // 2, (height - new_h) // 2
    else:
        need_h, need_w = mmdet_canvas(w, h, pixels)
        if need_h > height or need_w > width:
            raise DatasetError(
                f"policy 'mmdet' needs a canvas of height {need_h} and width {need_w} for a {w}x{h} (w x h) "
                f"image but the model input is {height}x{width} (h x w); preprocess with height>={need_h} "
                f"and width>={need_w}"
            )
        new_w, new_h = mmdet_size(w, h, pixels.resize_scale)
        scale_x, scale_y = new_w / w, new_h / h
    return Geometry(
        width=w,
        height=h,
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        resized_width=new_w,
        resized_height=new_h,
        pad=(left, top, width - new_w - left, height - new_h - top),
    )


def _check_image(img_bgr: object) -> None:
    if (
        not isinstance(img_bgr, np.ndarray)
        or img_bgr.dtype != np.uint8
        or img_bgr.ndim != 3
        or img_bgr.shape[2] != 3
    ):
        shape = getattr(img_bgr, "shape", None)
        kind = getattr(img_bgr, "dtype", type(img_bgr).__name__)
        raise DatasetError(f"expected a uint8 BGR image of shape (h, w, 3), got {kind} {shape}")


def _blank(dtype: str, height: int, width: int, pixels: PixelFormat = DEFAULT_PIXELS) -> np.ndarray:
    """An input canvas that is all padding: (3, H, W) float32 of the model's pad value, or (H, W, 3)
    uint8 of the raw colour that normalizes to it (ImageNet's mean colour for pad value 0)."""
    if dtype == "float32":
        return np.full((3, height, width), pixels.pad_value, dtype=np.float32)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    _pad_region(canvas, pixels)
    return canvas


def _pad_region(region: np.ndarray, pixels: PixelFormat) -> None:
    """Fill a view of a canvas with padding: an (h, w, 3) uint8 view with the padding colour (a whole
    row at a time: fast), a (3, h, w) float32 view with the pad value."""
    if not region.size:
        return
    if region.dtype == np.uint8:
        region[...] = np.tile(np.array(pixels.pad_bgr_u8(), dtype=np.uint8), (region.shape[1], 1))
    else:
        region[...] = pixels.pad_value


def _into(result: np.ndarray, view: np.ndarray) -> None:
    """Make sure an OpenCV call given `dst=view` wrote into `view` (copy if the binding did not)."""
    if result.ctypes.data != view.ctypes.data:
        view[...] = result


def _draw(img_bgr: np.ndarray, geometry: Geometry, canvas: np.ndarray, pixels: PixelFormat) -> None:
    """Resize `img_bgr` into `canvas` (its dtype's layout) at the geometry's offset, normalized into
    the network's channel order for float32."""
    new_w, new_h = geometry.resized_width, geometry.resized_height
    left, top = geometry.pad[0], geometry.pad[1]
    rows, cols = slice(top, top + new_h), slice(left, left + new_w)
    if canvas.dtype == np.uint8:
        view = canvas[rows, cols]
        _into(cv2.resize(img_bgr, (new_w, new_h), dst=view, interpolation=cv2.INTER_LINEAR), view)
        return
    resized = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    planes = cv2.split(resized)
    sources = (planes[index] for index in pixels.source_planes())
    for plane, table, out in zip(sources, _normalize_tables(pixels), canvas, strict=True):
        view = out[rows, cols]
        _into(cv2.LUT(plane, table, dst=view), view)


def preprocess_image(
    img_bgr: np.ndarray,
    policy: str = "letterbox",
    dtype: str = "float32",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    pixels: PixelFormat = DEFAULT_PIXELS,
) -> tuple[np.ndarray, Geometry]:
    """One cv2 (BGR uint8 HWC) image -> model input and its geometry.

    Returns a C-contiguous float32 (3, H, W) array normalized in the network's channel order
    (`pixels`), or a uint8 (H, W, 3) BGR array.
    """
    _check_options(policy, dtype, height, width, pixels)
    _check_image(img_bgr)
    h, w = img_bgr.shape[:2]
    geometry = image_geometry(w, h, policy, height, width, pixels)
    canvas = _blank(dtype, height, width, pixels)
    _draw(img_bgr, geometry, canvas, pixels)
    return canvas, geometry


_Rect = tuple[int, int, int, int]  # top, left, bottom, right (exclusive)


def _uncovered(old: _Rect, new: _Rect) -> list[tuple[slice, slice]]:
    """The parts of rectangle `old` outside rectangle `new`, as (rows, columns) slices (at most 4)."""
    top, left, bottom, right = old
    n_top, n_left, n_bottom, n_right = new
    parts = []
    if n_top > top:
        parts.append((slice(top, min(bottom, n_top)), slice(left, right)))
    if bottom > n_bottom:
        parts.append((slice(max(top, n_bottom), bottom), slice(left, right)))
    middle = slice(max(top, n_top), min(bottom, n_bottom))
    if middle.stop > middle.start:
        if n_left > left:
            parts.append((middle, slice(left, min(right, n_left))))
        if right > n_right:
            parts.append((middle, slice(max(left, n_right), right)))
    return parts


class _Canvas:
    """A reusable model-input buffer: padding written once; before each image, only the part the
    previous image covered and this one does not is reset to padding."""

    def __init__(self, dtype: str, height: int, width: int, pixels: PixelFormat) -> None:
        self.key = (dtype, height, width, pixels)
        self.pixels = pixels
        self.array = _blank(dtype, height, width, pixels)
        self.covered: _Rect = (0, 0, 0, 0)  # the rectangle holding the last image

    def fill(self, img_bgr: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The model input of `img_bgr` (valid until the next call)."""
        left, top = geometry.pad[0], geometry.pad[1]
        rect = (top, left, top + geometry.resized_height, left + geometry.resized_width)
        for rows, cols in _uncovered(self.covered, rect):
            region = self.array[rows, cols] if self.array.dtype == np.uint8 else self.array[:, rows, cols]
            _pad_region(region, self.pixels)
        _draw(img_bgr, geometry, self.array, self.pixels)
        self.covered = rect
        return self.array


class _Canvases:
    """One `_Canvas` per worker thread, for the duration of one run (freed with this object)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, dtype: str, height: int, width: int, pixels: PixelFormat = DEFAULT_PIXELS) -> _Canvas:
        canvas: _Canvas | None = getattr(self._local, "canvas", None)
        if canvas is None or canvas.key != (dtype, height, width, pixels):
            canvas = self._local.canvas = _Canvas(dtype, height, width, pixels)
        return canvas


# --------------------------------------------------------------------------------------------------
# Reading image files


def _jpeg_walk(data: bytes, until_scan: bool) -> bool:
    """Whether the JPEG's marker structure reaches its end-of-image marker (0xFFD9), or with
    `until_scan` the start of its first scan's data.

    Walks the segments (skipping their payload, e.g. an EXIF thumbnail and its own markers) and each
    scan's entropy-coded data; stray bytes between segments are skipped as libjpeg does.
    """
    size, pos = len(data), 2
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < size:
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01, 0xD8):
            pos += 1 if marker == 0xFF else 2  # fill byte, or a marker without a length
            continue
        if pos + 4 > size:
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            if until_scan:
                return pos <= size
            found = _SCAN_END.search(data, pos)
            if found is None:
                return False
            pos = found.start()
    return False


def _jpeg_truncation(data: bytes) -> str:
    """Why the JPEG is truncated, or "" when it is complete. Fast path: the headers are complete and
    the file ends with the EOI marker (entropy-coded data never holds 0xFFD9); otherwise (e.g. bytes
    after the EOI) the whole structure is walked."""
    if data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9") and _jpeg_walk(data, until_scan=True):
        return ""
    if _jpeg_walk(data, until_scan=False):
        return ""
    return f"truncated JPEG: the file ({len(data)} bytes) ends before its end-of-image marker (0xFFD9)"


def _png_truncation(data: bytes) -> str:
    """Why the PNG is truncated, or "" when its chunks reach a complete IEND chunk."""
    size, pos = len(data), len(_PNG_SIGNATURE)
    while pos + 12 <= size:
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            return ""
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return f"truncated PNG: the file ({size} bytes) ends before its IEND chunk"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the JPEG's frame header (SOFn), or None when no frame header comes before
    its first scan. Segments are skipped by their length (an EXIF thumbnail's own markers too)."""
    size, pos = len(data), 2
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < size:
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01, 0xD8):
            pos += 1 if marker == 0xFF else 2  # fill byte, or a marker without a length
            continue
        if marker in (0xD9, 0xDA) or pos + 4 > size:
            return None
        if marker in _SOF_MARKERS and pos + 9 <= size:
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            return int.from_bytes(data[pos + 7 : pos + 9], "big"), height
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an image file's header claims (JPEG SOFn, PNG IHDR), read without decoding;
    None for other formats or a header that says nothing."""
    if data.startswith(_JPEG_SOI):
        return _jpeg_size(data)
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _over_budget(width: int, height: int, max_pixels: int | None, claimed: bool) -> str:
    """Why a `width` x `height` image is over the pixel budget `max_pixels`, or "" (None: no budget)."""
    if max_pixels is None or width * height <= max_pixels:
        return ""
    source = "its header claims" if claimed else "it decodes to"
    pixels = width * height
    return (
        f"{source} {width}x{height} pixels ({pixels / 1e6:.1f} megapixels, {pixels * 3 / 2**30:.2f} GiB "
        f"decoded), over the pixel budget of {max_pixels / 1e6:g} megapixels (max_pixels; raise it if "
        "the image is genuine)"
    )


def _problem(data: bytes, max_pixels: int | None) -> str:
    """Why an image file is unusable before decoding it (truncated, over the pixel budget), or ""."""
    if data.startswith(_JPEG_SOI):
        problem = _jpeg_truncation(data)
    elif data.startswith(_PNG_SIGNATURE):
        problem = _png_truncation(data)
    else:
        problem = ""
    claimed = header_size(data) if not problem else None
    return problem or (_over_budget(*claimed, max_pixels, claimed=True) if claimed else "")


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray | None, str]:
    """(BGR uint8 image, "") as `cv2.imread(path, cv2.IMREAD_COLOR)` decodes it (EXIF orientation,
    grayscale and CMYK to BGR, any extension), or (None, why it is unusable): a truncated JPEG or PNG
    (which OpenCV would decode into a partly grey image), one whose header claims more than
    `max_pixels` pixels (checked before decoding; None: no budget), or one OpenCV cannot decode or
    refuses (`cv2.error`, e.g. its own pixel limit)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return None, f"cannot read it ({exc.strerror or exc})"
    problem = _problem(data, max_pixels)
    if problem:
        return None, problem
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None, f"OpenCV refused to decode it ({detail})"
    if img is None:
        return None, "OpenCV cannot decode it (corrupt, truncated or not an image)"
    problem = _over_budget(img.shape[1], img.shape[0], max_pixels, claimed=False)
    return (None, problem) if problem else (img, "")


def _write_input(target: str, array: np.ndarray) -> None:
    """Write `array`'s bytes (little-endian) to `target` atomically, straight from its buffer in
    `_WRITE_CHUNK` pieces (measured 15-25 % faster than one 11.6 MB write under dirty-page pressure)."""
    if sys.byteorder != "little":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = memoryview(array).cast("B")
    try:
        with atomic_path(target) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                while data:
                    data = data[os.write(fd, data[:_WRITE_CHUNK]) :]
            finally:
                os.close(fd)
    except OSError as exc:
        raise DatasetError(
            f"cannot write preprocessed input {target!r} ({exc.strerror or exc}); {os_error_fix(exc)}"
        ) from None


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    pixels: PixelFormat = DEFAULT_PIXELS


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


def _run_job(job: _Job, canvases: _Canvases | None = None) -> _Result:
    """Read, preprocess and atomically write one image; (id, geometry, "") or (id, None, reason).
    `canvases` lends the thread its reusable output buffer (none: a fresh one)."""
    img, reason = read_image(job.source, job.max_pixels)
    if img is None:
        return job.image_id, None, reason
    h, w = img.shape[:2]
    try:
        geometry = image_geometry(w, h, job.policy, job.height, job.width, job.pixels)
    except DatasetError as exc:
        raise DatasetError(f"image {job.source!r}: {exc}") from None
    if job.target:
        canvas = (canvases or _Canvases()).get(job.dtype, job.height, job.width, job.pixels)
        _write_input(job.target, canvas.fill(img, geometry))
    return job.image_id, geometry, ""


def _run_jobs(jobs: Iterable[_Job], workers: int) -> Iterator[_Result]:
    """Results in completion order from `workers` threads; at most `4 * workers` jobs in flight;
    the first worker error propagates (jobs not started yet are cancelled)."""
    canvases = _Canvases()
    if workers == 1:
        for job in jobs:
            yield _run_job(job, canvases)
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
                    pending[pool.submit(_run_job, job, canvases)] = job
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


def _check_mmdet_fits(images: list[CocoImage], height: int, width: int, pixels: PixelFormat) -> None:
    """Fail before any work when the canvas cannot hold the mmdet-resized images (annotation sizes)."""
    needs = [(image, *mmdet_canvas(image.width, image.height, pixels)) for image in images]
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
        f"policy 'mmdet' keeps the model's {pixels.resize_scale} scale and pads to /{pixels.size_divisor}, "
        f"so {len(too_big)} image(s) "
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
            f"{', '.join(f'{image.path} ({bad[image.image_id]})' for image in bad_images[:_SHOW])}"
            f"{' ...' if len(bad_images) > _SHOW else ''}; "
            "replace them, or pass skip_bad_images=True (gfocal preprocess --skip-bad-images) to leave "
            "them out of the run"
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
    donor: Manifest | None,
    images: list[CocoImage],
    hashes: dict[int, str],
    staging: Path,
    check: Callable[[Path], bool] | None = None,
) -> dict[int, Geometry]:
    """Inputs of `donor` (same policy, dtype and size) whose source image has the same sha256 are
    linked into `staging` instead of being computed again: a changed image is the only one redone.
    `check(input file)` (the donor entry's recorded checksum) must pass too: a damaged input of the
    donor is computed again, never linked."""
    if donor is None:
        return {}
    check = check or (lambda path: True)
    by_sha = {entry.sha256: entry for entry in donor.images if entry.sha256}
    reused: dict[int, Geometry] = {}
    for image in images:
        entry = by_sha.get(hashes.get(image.image_id, ""))
        if entry is None:
            continue
        source = donor.input_dir(entry.shard) / input_file_name(entry.image_id)
        try:
            if source.stat().st_size != donor.bytes_per_image or not check(source):
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
    policy: str,
    dtype: str,
    size: tuple[int, int],
    shard_size: object,
    workers: object,
    max_pixels: object,
    pixels: object = DEFAULT_PIXELS,
) -> None:
    _check_options(policy, dtype, *size, pixels)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DatasetError(f"shard_size={shard_size!r} must be a positive integer (images per shard)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DatasetError(f"workers={workers!r} must be a positive integer or None (all CPU cores)")
    check_max_pixels(max_pixels)


def check_max_pixels(value: object, source: str = "max_pixels") -> int | None:
    """`value` as a pixel budget (an integer >= 1, or None for none), else a DatasetError naming it."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise DatasetError(
        f"{source}={value!r} must be a positive integer (the most pixels, width x height, one image may "
        f"have; default {DEFAULT_MAX_PIXELS:_} = {DEFAULT_MAX_PIXELS / 1e6:g} megapixels)"
    )


@dataclass(frozen=True)
class _Format:
    """How one preprocess call turns images into inputs."""

    policy: str
    dtype: str
    height: int
    width: int
    max_pixels: int | None
    pixels: PixelFormat = DEFAULT_PIXELS

    def job(self, image: CocoImage, target: str) -> _Job:
        """The job of one image (`target` "": decode and place it only)."""
        options = (self.policy, self.dtype, self.height, self.width, self.max_pixels, self.pixels)
        return _Job(image.image_id, str(image.path), target, *options)


def _all_hashes(images: list[CocoImage], known: dict[int, str] | None, workers: int) -> dict[int, str]:
    """sha256 of every image: those in `known` (the inputs cache hashed them for its key), the others now."""
    hashes = dict(known or {})
    missing = [image for image in images if image.image_id not in hashes]
    if missing:
        hashes.update(hash_images(missing, workers))
    return hashes


def _drop_staging(layout: RunLayout, staging: Path) -> None:
    """Remove the staging folder, and `inputs/` when that leaves it empty (a plan writes nothing)."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        layout.inputs_dir.rmdir()


def _decode_all(
    dataset: CocoDataset,
    layout: RunLayout,
    staging: Path | None,
    fmt: _Format,
    run: tuple[int, float, bool],
    reused: dict[int, Geometry],
) -> tuple[dict[int, Geometry], list[CocoImage], dict[int, str]]:
    """Decode and place (into `staging`, unless None) every image not `reused`: (geometry by id,
    the bad images, their reasons). `run` is (workers, progress interval, skip_bad_images)."""
    n_workers, progress_interval_s, skip_bad_images = run
    images = dataset.images
    log.info(
        "preprocess: %d of %d images from %s -> %s (policy=%s dtype=%s %dx%d, %d workers%s)",
        len(images),
        dataset.total_images,
        dataset.root,
        layout.inputs_dir if staging is not None else "a manifest only",
        fmt.policy,
        fmt.dtype,
        fmt.height,
        fmt.width,
        n_workers,
        f", {len(reused)} reused" if reused else "",
    )
    jobs = (
        fmt.job(image, str(staging / input_file_name(image.image_id)) if staging is not None else "")
        for image in images
        if image.image_id not in reused
    )
    geometries, bad = _run_all(jobs, n_workers, len(images) - len(reused), progress_interval_s)
    geometries.update(reused)
    bad_images = _check_bad(images, bad, dataset.image_dir, skip_bad_images)
    if not any(image.image_id in geometries for image in images):
        raise DatasetError(f"none of the {len(images)} images in {str(dataset.image_dir)!r} can be read")
    return geometries, bad_images, bad


def preprocess(
    coco_root: str | Path,
    run_dir: str | Path,
    policy: str = "letterbox",
    dtype: str = "float32",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    shard_size: int | None = None,
    max_images: int | None = None,
    workers: int | None = None,
    skip_bad_images: bool = False,
    image_dir: str = DEFAULT_IMAGE_DIR,
    annotation_file: str = DEFAULT_ANNOTATION_FILE,
    progress_interval_s: float = 10.0,
    *,
    shard_plan: ShardPlan | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    write_inputs: bool = True,
    image_hashes: dict[int, str] | None = None,
    donor: Manifest | None = None,
    donor_check: Callable[[Path], bool] | None = None,
    pixels: PixelFormat | None = None,
    classes: Mapping[str, Any] | None = None,
) -> Manifest:
    """Preprocess a COCO set into `run_dir` (manifest.json + inputs/<shard>/<id:012d>.bin):
    undecodable images and images over the pixel budget `max_pixels` (None: none) raise a
    `DatasetError` naming them, or with `skip_bad_images` are listed in `manifest.skipped` and left
    out. `workers` defaults to the usable CPU cores. The manifest records each image file's sha256
    (`image_hashes` when the caller already has them) and the annotation file's. `write_inputs=False`
    writes only the manifest (every image decoded and placed, no inputs: each inference task then
    builds its own shard, see `materialize_shard`). Inputs of `donor` whose image is unchanged (and
    that pass `donor_check`, the donor entry's content check) are linked instead of recomputed.
    `shard_size` None: the `shard_plan` rule (`sharding`). `pixels`: the model's `PixelFormat` (None:
    GFocalV2's); `classes`: its `num_classes` / `classes` for the annotation checks (None: COCO's 80).
    """
    fmt = _Format(policy, dtype, height, width, max_pixels, pixels or DEFAULT_PIXELS)
    checked = 1 if shard_size is None else shard_size
    _check_arguments(policy, dtype, (height, width), checked, workers, max_pixels, fmt.pixels)
    dataset = load_coco(coco_root, image_dir, annotation_file, max_images, **(classes or {}))
    images = dataset.images
    shard_size = resolve_shard_size(shard_size, len(images), height, width, shard_plan)
    if policy == "mmdet":
        _check_mmdet_fits(images, height, width, fmt.pixels)
    layout = RunLayout.at(Path(run_dir))
    per_image = 3 * height * width * np.dtype(dtype).itemsize
    staging = _fresh_inputs(layout, len(images) * per_image if write_inputs else 0)
    try:
        n_workers = max(1, min(workers or _default_workers(), len(images)))
        hashes = _all_hashes(images, image_hashes, n_workers)
        reused = _reuse_from(donor, images, hashes, staging, donor_check) if write_inputs else {}
        target = staging if write_inputs else None
        run = (n_workers, progress_interval_s, skip_bad_images)
        geometries, bad_images, bad = _decode_all(dataset, layout, target, fmt, run, reused)
        kept = [image for image in images if image.image_id in geometries]
        entries, shards = _place(kept, geometries, target, layout, shard_size, hashes)
    except BaseException:  # a refused or failed run leaves no half-written inputs behind
        _drop_staging(layout, staging)
        raise
    _drop_staging(layout, staging)
    return _write_manifest(layout, dataset, fmt, shard_size, (entries, shards, _skipped(bad_images, bad)))


def _skipped(bad_images: list[CocoImage], reasons: dict[int, str]) -> list[dict[str, object]]:
    """The manifest's record of the images left out (skip_bad_images), each with its reason."""
    return [
        {"image_id": i.image_id, "file_name": i.file_name, "reason": reasons[i.image_id]} for i in bad_images
    ]


def _write_manifest(
    layout: RunLayout,
    dataset: CocoDataset,
    fmt: _Format,
    shard_size: int,
    found: tuple[list[ImageEntry], dict[str, list[int]], list[dict[str, object]]],
) -> Manifest:
    """Write the run's manifest (last: a run directory with a manifest is complete) and return it."""
    entries, shards, skipped = found
    paths = (str(dataset.root), str(dataset.annotation_file), str(dataset.image_dir))
    manifest = Manifest(
        fmt.policy,
        fmt.dtype,
        fmt.height,
        fmt.width,
        shard_size,
        *paths,
        entries,
        shards,
        skipped,
        annotation_sha256=sha256_file(dataset.annotation_file),
        max_pixels=fmt.max_pixels,
        pixels=fmt.pixels.to_dict(),
    )
    manifest.write(layout.manifest)
    log.info(
        "preprocess: wrote %s with %d images in %d shards (%d skipped)",
        layout.manifest,
        len(entries),
        len(shards),
        len(skipped),
    )
    return manifest


def materialize_shard(manifest: Manifest, shard: str, target: Path, workers: int | None = None) -> Path:
    """Build `shard`'s inputs into `target` from the source images (for a manifest written with
    `write_inputs=False`): the same bytes preprocessing would have written. An image that changed
    since the manifest was written (sha256 or size) is an error, never silently used. The pixel
    budget is the one preprocessing used (recorded in the manifest; the default for older ones)."""
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
        opts = (
            manifest.policy,
            manifest.dtype,
            manifest.input_height,
            manifest.input_width,
            manifest.max_pixels,
            manifest.pixel_format,
        )
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
