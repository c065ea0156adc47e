"""Read a COCO-format detection set (images + instances annotation file) and check it is usable.

Layout expected by default (the COCO 2017 val download):

    <root>/val2017/<file_name>                      images named by the annotation file
    <root>/annotations/instances_val2017.json       {"images", "annotations", "categories", ...}

Both names are parameters, so any COCO-format set works. Problems are reported up front as
`DatasetError` naming the path and the fix, instead of surfacing later as a missing `.bin` or a
crashed evaluation. Images are ordered by image id, so `max_images=N` always picks the same N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfocal_pipeline.errors import DatasetError

DEFAULT_IMAGE_DIR = "val2017"
DEFAULT_ANNOTATION_FILE = "annotations/instances_val2017.json"
REQUIRED_KEYS = ("images", "annotations", "categories")
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_SHOW = 5  # how many offending names an error message lists


@dataclass(frozen=True)
class CocoImage:
    """One image of the set, as the annotation file describes it."""

    image_id: int
    file_name: str
    width: int
    height: int
    path: Path


@dataclass(frozen=True)
class CocoDataset:
    """A validated COCO set: resolved paths, images ordered by id, categories ordered by id."""

    root: Path
    image_dir: Path
    annotation_file: Path
    images: list[CocoImage]
    categories: list[tuple[int, str]]
    total_images: int  # images in the annotation file, before `max_images`


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def read_annotations(annotation_file: str | Path) -> dict[str, Any]:
    """Parse a COCO instances file and check its top-level structure."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(
            f"annotation file {str(path)!r} does not exist; download the COCO annotations "
            "(annotations_trainval2017.zip) or pass the right annotation_file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"annotation file {str(path)!r} is not valid JSON ({exc}); re-download or regenerate it"
        ) from exc
    if not isinstance(data, dict):
        raise DatasetError(
            f"annotation file {str(path)!r} holds a {type(data).__name__}, not a COCO object with "
            f"{', '.join(REQUIRED_KEYS)}; pass a COCO instances_*.json file"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError(
            f"annotation file {str(path)!r} lacks the list(s) {', '.join(missing)}; it is not a COCO "
            "instances file (for detection use annotations/instances_val2017.json)"
        )
    return data


def _parse_categories(data: dict[str, Any], path: Path) -> list[tuple[int, str]]:
    try:
        categories = sorted((int(cat["id"]), str(cat.get("name", cat["id"]))) for cat in data["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"annotation file {str(path)!r} has a category without an integer 'id' ({exc!r}); "
            "fix the 'categories' list"
        ) from exc
    ids = [cat_id for cat_id, _ in categories]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"annotation file {str(path)!r} repeats category ids; fix the 'categories' list")
    return categories


def _parse_images(data: dict[str, Any], path: Path, image_dir: Path) -> list[CocoImage]:
    images: list[CocoImage] = []
    seen: set[int] = set()
    for index, raw in enumerate(data["images"]):
        try:
            image = CocoImage(
                image_id=int(raw["id"]),
                file_name=str(raw["file_name"]),
                width=int(raw["width"]),
                height=int(raw["height"]),
                path=image_dir / str(raw["file_name"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"annotation file {str(path)!r}: images[{index}] lacks a valid {'/'.join(_IMAGE_FIELDS)} "
                f"({exc!r}); fix or regenerate the annotation file"
            ) from exc
        if image.width < 1 or image.height < 1:
            raise DatasetError(
                f"annotation file {str(path)!r}: image {image.file_name!r} has size "
                f"{image.width}x{image.height}; fix its width/height in the 'images' list"
            )
        if image.image_id in seen:
            raise DatasetError(
                f"annotation file {str(path)!r} lists image id {image.image_id} twice; fix the 'images' list"
            )
        seen.add(image.image_id)
        images.append(image)
    images.sort(key=lambda image: image.image_id)
    return images


def load_coco(
    root: str | Path,
    image_dir: str = DEFAULT_IMAGE_DIR,
    annotation_file: str = DEFAULT_ANNOTATION_FILE,
    max_images: int | None = None,
) -> CocoDataset:
    """Validate a COCO root and return its images (first `max_images` by id) and categories.

    `image_dir` and `annotation_file` are relative to `root` (absolute paths are used as given).
    Every selected image file must exist; the error lists the first missing names and their count.
    """
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise DatasetError(f"max_images={max_images!r} must be a positive integer or None (all images)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(
            f"COCO root {str(root_path)!r} does not exist or is not a directory; pass the directory "
            f"holding {image_dir}/ and {annotation_file} (or generate the demo set with make_demo_coco)"
        )
    root_path = root_path.resolve()
    images_path = root_path / image_dir
    if not images_path.is_dir():
        raise DatasetError(
            f"image directory {str(images_path)!r} does not exist; unpack the COCO images "
            f"(val2017.zip) into {str(root_path)!r} or pass the right image_dir"
        )
    ann_path = root_path / annotation_file
    data = read_annotations(ann_path)
    images = _parse_images(data, ann_path, images_path)
    categories = _parse_categories(data, ann_path)
    if not images:
        raise DatasetError(
            f"annotation file {str(ann_path)!r} lists no images; point at a non-empty COCO set"
        )
    total = len(images)
    if max_images is not None:
        images = images[: int(max_images)]
    missing = [image.file_name for image in images if not image.path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} images listed in {str(ann_path)!r} are missing from "
            f"{str(images_path)!r}: {_names(missing)}; complete the image download, pass the matching "
            "annotation file, or limit max_images"
        )
    return CocoDataset(
        root=root_path,
        image_dir=images_path,
        annotation_file=ann_path,
        images=images,
        categories=categories,
        total_images=total,
    )
