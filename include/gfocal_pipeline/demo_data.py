"""A small, real COCO-format data set generated on the fly, for demos, tests and CI without downloads.

`make_demo_coco(root)` writes `<root>/val2017/<id:012d>.jpg` (JPEGs of filled rectangles and
ellipses in distinct colours on textured backgrounds; landscape, portrait and square sizes, one in
seven grayscale like some COCO images) and `<root>/annotations/instances_val2017.json` with the 80
standard COCO categories (ids 1..90 with gaps) and one annotation per drawn object whose bbox
(xywh), area (pixel count) and polygon come from the drawn pixels. Image ids are sparse and the
`images` list is unordered, as in COCO.

Deterministic: the same `(num_images, seed)` gives the same bytes. Idempotent: images are written
atomically and the annotation file last, so a complete set is recognised (its `info.gfocal_demo`)
and kept as is; an interrupted one is regenerated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gfocal_pipeline.coco_classes import COCO_CATEGORIES
from gfocal_pipeline.constants import DEFAULT_ANNOTATION_FILE, DEFAULT_IMAGE_DIR
from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

DEMO_VERSION = 1
MAX_DEMO_IMAGES = 1000
# (width, height): COCO-typical sizes, landscape, portrait and square
DEMO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (480, 640),
    (500, 375),
    (375, 500),
    (800, 600),
    (333, 500),
    (640, 427),
    (427, 640),
    (612, 612),
    (500, 333),
    (640, 360),
    (360, 640),
)
GRAYSCALE_EVERY = 7  # image index % 7 == 5 is stored as a one-channel JPEG
JPEG_QUALITY = 90
_MIN_GAP = 6  # pixels between objects, so boxes never overlap


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured BGR background: two-colour gradient + stripes + noise (objects are flat fills)."""
    start, end = rng.uniform(40, 215, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    period = rng.uniform(9, 25)
    angle = rng.uniform(0, np.pi)
    phase_x = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle) * 2 * np.pi / period)
    phase_y = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle) * 2 * np.pi / period)
    stripes = np.float32(14.0) * np.sin(phase_y[:, None] + phase_x[None, :])
    img = rng.standard_normal((height, width, 3), dtype=np.float32)
    img *= np.float32(16.0)
    img += stripes[..., None]
    img += start + (end - start) * ramp
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(
    rng: np.random.Generator, width: int, height: int, blocked: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """A rectangle or ellipse outside `blocked` (earlier objects plus a gap): (mask, polygon) or None."""
    short = min(width, height)
    for _ in range(30):
        # sizes from COCO "small" (< 32x32) to "large" (> 96x96)
        bw, bh = (int(v) for v in rng.integers(max(12, short // 20), max(13, short // 2), size=2))
        x0 = int(rng.integers(0, width - bw))
        y0 = int(rng.integers(0, height - bh))
        mask = np.zeros((height, width), dtype=np.uint8)
        if rng.random() < 0.5:
            polygon = np.array([[x0, y0], [x0 + bw - 1, y0], [x0 + bw - 1, y0 + bh - 1], [x0, y0 + bh - 1]])
            cv2.rectangle(mask, (x0, y0), (x0 + bw - 1, y0 + bh - 1), 255, thickness=-1)
        else:
            center, axes = (x0 + bw // 2, y0 + bh // 2), ((bw - 1) // 2, (bh - 1) // 2)
            polygon = cv2.ellipse2Poly(center, axes, 0, 0, 360, 10)
            cv2.ellipse(mask, center, axes, 0, 0, 360, 255, thickness=-1)
        if not np.any(mask & blocked):
            return mask, polygon
    return None


def _draw_image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One BGR image and its objects (bbox/area/segmentation/category from the drawn pixels)."""
    img = _background(rng, width, height)
    blocked = np.zeros((height, width), dtype=np.uint8)
    gap = np.ones((2 * _MIN_GAP + 1, 2 * _MIN_GAP + 1), np.uint8)
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 6))):
        found = _shape_mask(rng, width, height, blocked)
        if found is None:
            continue
        mask, polygon = found
        blocked |= cv2.dilate(mask, gap)
        hue = int(rng.integers(0, 180))
        colour = cv2.cvtColor(np.array([[[hue, 230, 235]]], dtype=np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
        img[mask > 0] = colour
        x_min, y_min, box_w, box_h = (int(v) for v in cv2.boundingRect(mask))
        category = COCO_CATEGORIES[int(rng.integers(0, len(COCO_CATEGORIES)))][0]
        objects.append(
            {
                "category_id": category,
                "bbox": [x_min, y_min, box_w, box_h],
                "area": float(cv2.countNonZero(mask)),
                "segmentation": [[float(v) for v in np.asarray(polygon).reshape(-1)]],
                "iscrowd": 0,
            }
        )
    return img, objects


def _demo_info(num_images: int, seed: int) -> dict[str, Any]:
    return {"num_images": num_images, "seed": seed, "version": DEMO_VERSION}


def _existing(annotation: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listed_files(data: dict[str, Any] | None) -> list[str]:
    """Plain file names listed by an earlier demo annotation file (nothing outside the image dir)."""
    images = (data or {}).get("images")
    names = [im.get("file_name") for im in images if isinstance(im, dict)] if isinstance(images, list) else []
    return [name for name in names if isinstance(name, str) and name and Path(name).name == name]


def make_demo_coco(root: str | Path, num_images: int = 24, seed: int = 0) -> Path:
    """Write (or reuse) a demo COCO set under `root` and return `root`; see the module docstring."""
    _check_num_images(num_images)
    root = Path(root).expanduser().resolve()
    image_dir = root / DEFAULT_IMAGE_DIR
    annotation = root / DEFAULT_ANNOTATION_FILE
    wanted = _demo_info(num_images, int(seed))
    previous, complete = _previous_set(annotation, image_dir, wanted, num_images)
    if complete:
        log.info("demo data: reusing complete set at %s (%d images, seed %d)", root, num_images, seed)
        return root

    image_dir.mkdir(parents=True, exist_ok=True)
    annotation.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), DEMO_VERSION])
    ids = sorted(int(i) for i in rng.choice(np.arange(1, 600_000), size=num_images, replace=False))
    images, annotations = _write_images(image_dir, ids, int(seed))
    order = rng.permutation(len(images))  # COCO's `images` list is not sorted by id
    _remove_stale(image_dir, previous, {im["file_name"] for im in images})
    write_json(annotation, _coco_document(wanted, [images[i] for i in order], annotations))
    log.info("demo data: wrote %d images with %d objects to %s", len(images), len(annotations), root)
    return root


def _check_num_images(num_images: int) -> None:
    """Raise DatasetError unless `num_images` is an int (not a bool) in 1..MAX_DEMO_IMAGES."""
    if (
        isinstance(num_images, bool)
        or not isinstance(num_images, int)
        or not 1 <= num_images <= MAX_DEMO_IMAGES
    ):
        raise DatasetError(f"num_images={num_images!r} must be an integer in 1..{MAX_DEMO_IMAGES}")


def _previous_set(
    annotation: Path, image_dir: Path, wanted: dict[str, Any], num_images: int
) -> tuple[dict[str, Any] | None, bool]:
    """(the earlier demo annotation data or None, whether it is a complete set made as `wanted`).

    Raises DatasetError when `annotation` exists but is not a generated demo set.
    """
    previous = _existing(annotation) if annotation.exists() else None
    if not annotation.exists():
        return previous, False
    info = (previous or {}).get("info")
    marker = info.get("gfocal_demo") if isinstance(info, dict) else None
    if marker is None:
        raise DatasetError(
            f"{str(annotation)!r} exists and is not a generated demo set; refusing to overwrite it, "
            "choose an empty directory for the demo data"
        )
    listed = _listed_files(previous)
    complete = (
        marker == wanted and len(listed) == num_images and all((image_dir / n).is_file() for n in listed)
    )
    return previous, complete


def _write_images(
    image_dir: Path, ids: list[int], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw and write one JPEG per image id; return the COCO `images` and `annotations` records."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, image_id in enumerate(ids):
        width, height = DEMO_SIZES[index % len(DEMO_SIZES)]
        img, objects = _draw_image(np.random.default_rng([seed, DEMO_VERSION, index]), width, height)
        if index % GRAYSCALE_EVERY == 5:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        file_name = f"{image_id:012d}.jpg"
        _write_jpeg(image_dir / file_name, img)
        images.append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
        )
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    return images, annotations


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    """Encode `img` as a JPEG of JPEG_QUALITY and write it to `path` atomically."""
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DatasetError(f"OpenCV could not encode demo image {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def _remove_stale(image_dir: Path, previous: dict[str, Any] | None, keep: set[str]) -> None:
    """Delete the images an earlier demo set (other parameters) listed that the new set does not have."""
    for name in _listed_files(previous):
        if name not in keep:
            (image_dir / name).unlink(missing_ok=True)


def _coco_document(
    wanted: dict[str, Any], images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    """The annotation file's content: info (with the demo marker), licence, images, objects, categories."""
    return {
        "info": {
            "description": "gfocal-airflow demo set: synthetic shapes on textured backgrounds",
            "version": str(DEMO_VERSION),
            "gfocal_demo": wanted,
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES],
    }


def demo_image(seed: int = 0, width: int = 640, height: int = 480) -> np.ndarray:
    """One generated BGR picture with drawn objects (the export parity check's 'real image')."""
    img, _ = _draw_image(np.random.default_rng(seed), width, height)
    return img
