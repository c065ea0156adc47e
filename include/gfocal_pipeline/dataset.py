"""Read a COCO-format detection set (images + instances annotation file) and check it is usable.

Layout expected by default (the COCO 2017 val download):

    <root>/val2017/<file_name>                      images named by the annotation file
    <root>/annotations/instances_val2017.json       {"images", "annotations", "categories", ...}

Both names are parameters, so any COCO-format set works. Problems are reported up front as
`DatasetError` naming the path and the fix, instead of surfacing later as a missing `.bin`, a crashed
evaluation or a silently wrong score. Every entry of the annotation file is checked in one pass
(table in docs/annotations.md): what would crash or skew COCO evaluation raises one error listing,
per problem, the first offending ids, their count and the fix; oddities COCO's own files have (boxes
a little outside the image, zero-size boxes) are logged once with a count. The categories must be
the model's classes: by default COCO's 80; for a model with `classes` (names in label order) the
categories of those names, and for one with another `num_classes` exactly that many categories (class
k = the k-th id); unless `category_map` maps file category ids to model class indices.
Images are ordered by image id, so `max_images=N` always picks the same N.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from gfocal_pipeline.coco_classes import COCO_CATEGORIES
from gfocal_pipeline.constants import DEFAULT_ANNOTATION_FILE, DEFAULT_IMAGE_DIR, NUM_CLASSES
from gfocal_pipeline.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")  # what COCO evaluation reads
CATEGORY_KEYS = ("id", "name")
OVERHANG_PX = 1.0  # a box may overhang its image this much without a warning (COCO's rounding)
_SHOW = 5  # how many offending entries a message lists
_ID_LIMIT = 2**63  # ids are held as int64
_FLOAT_LIMIT = 1e300  # and numbers as float64

ImageRow = tuple[int, str, int, int]  # (id, file_name, width, height)


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
    class_of: dict[int, int]  # file category id -> model class index 0..num_classes-1


@dataclass(frozen=True)
class Annotations:
    """A checked annotation file: image rows and categories ordered by id, category -> model class."""

    path: Path
    images: list[ImageRow]
    categories: list[tuple[int, str]]
    class_of: dict[int, int]
    annotations: int


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_int(value) and -_ID_LIMIT <= value < _ID_LIMIT


def _is_number(value: Any) -> bool:
    """A finite JSON number that float64 holds (not a bool)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value) and -_FLOAT_LIMIT < value < _FLOAT_LIMIT


def _json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ('an array', 'a string', ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class _Finding:
    """One problem: its fix (or consequence, for a warning), how often it occurred, the first few."""

    advice: str
    count: int = 0
    shown: list[str] = field(default_factory=list)

    def describe(self, problem: str) -> str:
        more = ", ..." if self.count > len(self.shown) else ""
        return f"{problem} ({self.count} in all: {', '.join(self.shown)}{more}); {self.advice}"


class _Findings:
    """Problems of one annotation file, collected in one pass and reported together afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: dict[str, _Finding] = {}
        self.warnings: dict[str, _Finding] = {}

    @staticmethod
    def _add(into: dict[str, _Finding], problem: str, advice: str, items: list[str], count: int) -> None:
        if count:
            finding = into.setdefault(problem, _Finding(advice))
            finding.count += count
            finding.shown.extend(items[: _SHOW - len(finding.shown)])

    def error(self, problem: str, fix: str, item: str) -> None:
        self._add(self.errors, problem, fix, [item], 1)

    def errors_in(self, problem: str, fix: str, items: list[str], count: int) -> None:
        self._add(self.errors, problem, fix, items, count)

    def warn(self, problem: str, consequence: str, items: list[str], count: int) -> None:
        self._add(self.warnings, problem, consequence, items, count)

    def raise_errors(self) -> None:
        lines = [finding.describe(problem) for problem, finding in self.errors.items()]
        where = f"annotation file {str(self.path)!r}"
        if len(lines) == 1:
            raise DatasetError(f"{where}: {lines[0]}")
        if lines:
            listed = "\n".join(f"  - {line}" for line in lines)
            raise DatasetError(f"{where} has {len(lines)} problems:\n{listed}")

    def log_warnings(self) -> None:
        for problem, finding in self.warnings.items():
            log.warning("annotation file %s: %s", self.path, finding.describe(problem))


# ---------------------------------------------------------------- the file and its top level


def _parse_json(path: Path) -> Any:
    """The file's JSON value; DatasetError for an unreadable, non-UTF-8, empty or malformed file."""
    where = f"annotation file {str(path)!r}"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{where} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}); "
            "re-download it or save it as UTF-8 (COCO files are)"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{where} cannot be read ({exc}); check its permissions") from exc
    if not text.strip():
        raise DatasetError(f"{where} is empty; re-download or regenerate it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # an unterminated string runs to the end of the text, so it is a cut file too
        if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            detail = "it ends before the JSON does: the file is truncated (an interrupted download or copy?)"
        else:
            detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise DatasetError(f"{where} is not valid JSON: {detail}; re-download or regenerate it") from exc
    except RecursionError as exc:
        raise DatasetError(f"{where} is nested too deeply to be COCO JSON; regenerate it") from exc


def read_annotations(annotation_file: str | Path) -> dict[str, Any]:
    """Parse a COCO instances file and check its top-level structure (the entries: `check_annotations`)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(
            f"annotation file {str(path)!r} does not exist; download the COCO annotations "
            "(annotations_trainval2017.zip) or pass the right annotation_file"
        )
    data = _parse_json(path)
    if not isinstance(data, dict):
        raise DatasetError(
            f"annotation file {str(path)!r} holds {_json_type(data)}, not a COCO object with "
            f"{', '.join(REQUIRED_KEYS)}; pass a COCO instances_*.json file"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(
            f"annotation file {str(path)!r} lacks the key(s) {', '.join(map(repr, missing))}; it is not a "
            "COCO instances file (for detection use annotations/instances_val2017.json)"
        )
    wrong = [
        f"{key!r} is {_json_type(data[key])}" for key in REQUIRED_KEYS if not isinstance(data[key], list)
    ]
    if wrong:
        raise DatasetError(
            f"annotation file {str(path)!r}: {', '.join(wrong)}; a COCO instances file holds "
            "lists of images, annotations and categories (regenerate it)"
        )
    return data


# ---------------------------------------------------------------- entries, one pass per list


def _entries(items: list[Any], section: str, findings: _Findings) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, entry) of every JSON object in `section`; any other entry is a finding."""
    for index, raw in enumerate(items):
        if isinstance(raw, dict):
            yield index, raw
        else:
            findings.error(
                f"{section} entries that are not objects",
                f"make every entry of {section!r} a JSON object",
                f"{section}[{index}] is {_json_type(raw)}",
            )


def _label(raw: dict[str, Any], section: str, index: int) -> str:
    value = raw.get("id")
    return f"id {value}" if _is_id(value) else f"{section}[{index}]"


def _lacks_keys(
    raw: dict[str, Any], keys: tuple[str, ...], section: str, index: int, findings: _Findings
) -> bool:
    missing = [key for key in keys if key not in raw]
    for key in missing:
        findings.error(
            f"{section} without the key {key!r}",
            f"add {key!r} to those entries (COCO {section} need {', '.join(keys)})",
            _label(raw, section, index),
        )
    return bool(missing)


def _pixels(value: Any) -> int | None:
    """`value` as a positive whole number of pixels (int, or a float such as 640.0), else None."""
    if _is_int(value):
        return value if value >= 1 else None
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    return None


def _unsafe_name(name: str) -> str | None:
    """Why `file_name` could name a file outside the image folder (lexically), or None."""
    if "\x00" in name:
        return "holds a NUL byte"
    if os.path.isabs(name):
        return "is absolute"
    if ".." in PurePosixPath(name).parts:
        return "holds '..'"
    return None


def _image_row(raw: dict[str, Any], index: int, findings: _Findings) -> ImageRow | None:
    if _lacks_keys(raw, IMAGE_KEYS, "images", index, findings):
        return None
    label = _label(raw, "images", index)
    image_id, name, width, height = (raw[key] for key in IMAGE_KEYS)
    ok = _is_id(image_id)
    if not ok:
        findings.error(
            "images whose id is not an integer",
            "use integer image ids",
            f"images[{index}]: {_short(image_id)}",
        )
    if not isinstance(name, str) or not name:
        ok = False
        findings.error(
            "images whose file_name is not a non-empty string",
            "fix their file_name",
            f"{label}: {_short(name)}",
        )
    elif reason := _unsafe_name(name):
        ok = False
        findings.error(
            "images whose file_name leaves the image folder",
            "use a path relative to the image folder, without '..' (e.g. '000000000139.jpg')",
            f"{label}: {name!r} {reason}",
        )
    width_px, height_px = _pixels(width), _pixels(height)
    if width_px is None or height_px is None:
        ok = False
        findings.error(
            "images whose width/height is not a positive integer",
            "set width and height to the image's size in pixels",
            f"{label}: {_short(width)}x{_short(height)}",
        )
    return (image_id, name, width_px, height_px) if ok else None


def _check_images(raw_images: list[Any], findings: _Findings) -> list[ImageRow]:
    """Usable image rows ordered by id; bad entries, repeated ids and file names are findings."""
    rows = [
        row
        for index, raw in _entries(raw_images, "images", findings)
        if (row := _image_row(raw, index, findings))
    ]
    repeated = [(image_id, n) for image_id, n in Counter(row[0] for row in rows).items() if n > 1]
    findings.errors_in(
        "image ids listed more than once",
        "give every image its own id (COCO tools keep only one entry per id, so ground truth lands on the "
        "wrong image)",
        [f"id {image_id} ({n} times)" for image_id, n in repeated],
        len(repeated),
    )
    shared = [(name, n) for name, n in Counter(row[1] for row in rows).items() if n > 1]
    findings.warn(
        "file names shared by several image ids",
        "each id is preprocessed and scored with its own ground truth",
        [f"{name!r} ({n} ids)" for name, n in shared],
        len(shared),
    )
    return sorted(rows)


def _check_categories(raw_categories: list[Any], findings: _Findings) -> list[tuple[int, str]]:
    """(id, name) of every usable category, ordered by id; bad entries and repeated ids are findings."""
    rows: list[tuple[int, str]] = []
    for index, raw in _entries(raw_categories, "categories", findings):
        if _lacks_keys(raw, CATEGORY_KEYS, "categories", index, findings):
            continue
        if _is_id(raw["id"]) and isinstance(raw["name"], str):
            rows.append((raw["id"], raw["name"]))
        else:
            findings.error(
                "categories without an integer id and a string name",
                "fix those entries of 'categories'",
                f"categories[{index}]: id {_short(raw['id'])}, name {_short(raw['name'])}",
            )
    repeated = [(cat_id, n) for cat_id, n in Counter(cat_id for cat_id, _ in rows).items() if n > 1]
    findings.errors_in(
        "category ids listed more than once",
        "give every category its own id",
        [f"id {cat_id} ({n} times)" for cat_id, n in repeated],
        len(repeated),
    )
    return sorted(rows)


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)


# (key, test, problem, fix) of each annotation field COCO evaluation reads
_ANNOTATION_FIELDS: tuple[tuple[str, Any, str, str], ...] = (
    (
        "id",
        lambda v: _is_id(v) and v >= 1,
        "an id that is not a positive integer",
        "number annotations from 1 (COCO evaluation reads id 0 as 'no match' and miscounts that box)",
    ),
    ("image_id", _is_id, "an image_id that is not an integer", "fix their image_id"),
    ("category_id", _is_id, "a category_id that is not an integer", "fix their category_id"),
    ("bbox", _is_box, "a bbox that is not 4 finite numbers", "write bbox as [x, y, width, height]"),
    (
        "area",
        lambda v: _is_number(v) and v >= 0,
        "an area that is not a finite number >= 0",
        "fix their area",
    ),
    (
        "iscrowd",
        lambda v: _is_int(v) and v in (0, 1),
        "an iscrowd other than 0 or 1",
        "set iscrowd to 0 or 1",
    ),
)
_FIELD_TEXT = {key: (problem, fix) for key, _, problem, fix in _ANNOTATION_FIELDS}
_ANNOTATION_KEY_SET = frozenset(ANNOTATION_KEYS)
_NUMBER = frozenset((int, float))  # type() of a JSON number; a bool is neither


def _typed(raw: dict[str, Any]) -> bool:
    """Whether an annotation's fields have COCO's JSON types (the fast test; values: `_columns`)."""
    box = raw["bbox"]
    return (
        type(raw["id"]) is type(raw["image_id"]) is type(raw["category_id"]) is type(raw["iscrowd"]) is int
        and raw["iscrowd"] in (0, 1)
        and type(box) is list
        and len(box) == 4
        and all(map(_NUMBER.__contains__, map(type, box)))
        and type(raw["area"]) in _NUMBER
    )


def _report_fields(raw: dict[str, Any], index: int, findings: _Findings) -> bool:
    """Record each bad field of one annotation (the slow, thorough test); whether it had any."""
    bad = [(key, problem, fix) for key, test, problem, fix in _ANNOTATION_FIELDS if not test(raw[key])]
    for key, problem, fix in bad:
        findings.error(
            f"annotations with {problem}", fix, f"{_label(raw, 'annotations', index)}: {_short(raw[key])}"
        )
    return bool(bad)


@dataclass(frozen=True)
class _Columns:
    """The usable annotations as arrays, one row each: ids (id, image_id, category_id) and xywh boxes."""

    ids: np.ndarray  # (n, 3) int64
    boxes: np.ndarray  # (n, 4) float64
    crowd: int


def _arrays(rows: list[tuple[int, dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.array([(r["id"], r["image_id"], r["category_id"]) for _, r in rows], dtype=np.int64)
    boxes = np.array([r["bbox"] for _, r in rows], dtype=np.float64)
    area = np.array([r["area"] for _, r in rows], dtype=np.float64)
    return ids.reshape(-1, 3), boxes.reshape(-1, 4), area


def _annotation_columns(raw_annotations: list[Any], findings: _Findings) -> _Columns:
    """One pass over the annotations: keys and types per entry, then values on the arrays."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for index, raw in _entries(raw_annotations, "annotations", findings):
        if not raw.keys() >= _ANNOTATION_KEY_SET:
            _lacks_keys(raw, ANNOTATION_KEYS, "annotations", index, findings)
        elif _typed(raw) or not _report_fields(raw, index, findings):
            rows.append((index, raw))
    try:
        ids, boxes, area = _arrays(rows)
    except OverflowError:  # a number beyond int64/float64 (rare): found again entry by entry
        rows = [(index, raw) for index, raw in rows if not _report_fields(raw, index, findings)]
        ids, boxes, area = _arrays(rows)
    bad = np.zeros(len(rows), dtype=bool)
    for key, mask in (
        ("id", ids[:, 0] < 1),
        ("bbox", ~np.isfinite(boxes).all(axis=1)),
        ("area", ~(np.isfinite(area) & (area >= 0))),
    ):
        _value_findings(rows, key, mask, findings)
        bad |= mask
    crowd = sum(raw["iscrowd"] for _, raw in rows)
    return _Columns(ids[~bad], boxes[~bad], crowd)


def _value_findings(
    rows: list[tuple[int, dict[str, Any]]], key: str, mask: np.ndarray, findings: _Findings
) -> None:
    def describe(i: int) -> str:
        index, raw = rows[i]
        return f"{_label(raw, 'annotations', index)}: {_short(raw[key])}"

    problem, fix = _FIELD_TEXT[key]
    findings.errors_in(f"annotations with {problem}", fix, *_flagged(mask, describe))


# ---------------------------------------------------------------- cross-checks, vectorized


def _flagged(mask: np.ndarray, describe: Any) -> tuple[list[str], int]:
    """(descriptions of the first flagged rows, how many rows are flagged)."""
    return [describe(int(i)) for i in np.flatnonzero(mask)[:_SHOW]], int(mask.sum())


def _check_references(columns: _Columns, image_ids: np.ndarray, findings: _Findings) -> None:
    """Flag repeated annotation ids and annotations of images that are not listed."""
    ann_ids, ann_images = columns.ids[:, 0], columns.ids[:, 1]
    unique, counts = np.unique(ann_ids, return_counts=True)
    repeated = counts > 1
    findings.errors_in(
        "annotation ids used more than once",
        "give every annotation its own id (COCO evaluation looks boxes up by id and would lose one)",
        [
            f"id {i} ({n} times)"
            for i, n in zip(unique[repeated][:_SHOW].tolist(), counts[repeated][:_SHOW].tolist(), strict=True)
        ],
        int(repeated.sum()),
    )
    known = np.isin(ann_images, image_ids)
    findings.errors_in(
        "annotations for image ids not in 'images'",
        "add those images to 'images' or remove their annotations",
        *_flagged(~known, lambda i: f"id {ann_ids[i]} (image_id {ann_images[i]})"),
    )


def _check_classes(
    columns: _Columns,
    categories: list[tuple[int, str]],
    class_of: dict[int, int],
    findings: _Findings,
    named: bool = False,
) -> None:
    """Flag annotations whose category is not listed, or has no model class (not in category_map);
    with `named` (the model names its classes) those of unnamed categories are only a warning: they
    are not scored, as evaluation scores the model's classes only."""
    ann_ids, ann_cats = columns.ids[:, 0], columns.ids[:, 2]

    def describe(i: int) -> str:
        return f"id {ann_ids[i]} (category_id {ann_cats[i]})"

    listed = np.isin(ann_cats, np.array([cat_id for cat_id, _ in categories], dtype=np.int64))
    findings.errors_in(
        "annotations whose category_id is not in 'categories'",
        "fix their category_id or add the category to 'categories' (COCO evaluation silently drops "
        "such boxes)",
        *_flagged(~listed, describe),
    )
    if not class_of:  # the categories are not the model's classes, which is an error already
        return
    mapped = np.isin(ann_cats, np.fromiter(class_of, dtype=np.int64, count=len(class_of)))
    if named:
        findings.warn(
            "annotations of categories that the model's classes do not name",
            "they are not scored (evaluation scores the model's classes only)",
            *_flagged(listed & ~mapped, describe),
        )
        return
    findings.errors_in(
        "annotations of categories that category_map leaves out",
        "add those category ids to category_map or remove their annotations",
        *_flagged(listed & ~mapped, describe),
    )


def _check_boxes(columns: _Columns, images: list[ImageRow], findings: _Findings) -> None:
    """Flag negative boxes and boxes off their image; warn of zero-size and overhanging ones."""
    table = np.array(
        [(image_id, width, height) for image_id, _, width, height in images], dtype=np.int64
    ).reshape(-1, 3)
    known = np.isin(columns.ids[:, 1], table[:, 0])
    ann_ids, ann_images = columns.ids[known, 0], columns.ids[known, 1]
    x, y, w, h = columns.boxes[known].T
    where = np.searchsorted(table[:, 0], ann_images)
    width, height = table[where, 1], table[where, 2]

    def describe(i: int) -> str:
        box = ", ".join(f"{v:g}" for v in (x[i], y[i], w[i], h[i]))
        return f"id {ann_ids[i]} (image {ann_images[i]}, {width[i]}x{height[i]}: bbox [{box}])"

    negative = (w < 0) | (h < 0)
    findings.errors_in(
        "annotations with a negative bbox width/height",
        "fix the box: bbox is [x, y, width, height]",
        *_flagged(negative, describe),
    )
    findings.warn(
        "annotations with a zero-size bbox",
        "no detection can match them, so they count as missed (as in COCO's own evaluation)",
        *_flagged(~negative & ((w == 0) | (h == 0)), describe),
    )
    sized = (w > 0) & (h > 0)
    off = sized & ((x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0))
    findings.errors_in(
        "annotations whose bbox lies entirely outside its image",
        "fix the box or the image's width/height (bbox is [x, y, width, height] in original pixels)",
        *_flagged(off, describe),
    )
    tol = OVERHANG_PX
    overhang = sized & ~off & ((x < -tol) | (y < -tol) | (x + w > width + tol) | (y + h > height + tol))
    findings.warn(
        f"annotations whose bbox overhangs its image by more than {tol:g} px",
        "they are scored as given, not clipped (COCO's own files have a few)",
        *_flagged(overhang, describe),
    )


# ---------------------------------------------------------------- categories -> model classes


@cache
def _coco_classes() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(ids, lower-case names) of COCO's 80 categories in model class order."""
    return tuple(cat[0] for cat in COCO_CATEGORIES), tuple(cat[1] for cat in COCO_CATEGORIES)


def _default_classes(categories: list[tuple[int, str]], findings: _Findings) -> dict[int, int]:
    """Class k is the k-th category by id (mmdet's `cat_ids`), which must be COCO's 80 (ids or names)."""
    coco_ids, coco_names = _coco_classes()
    ids = tuple(cat_id for cat_id, _ in categories)
    names = tuple(name.strip().lower() for _, name in categories)
    if ids == coco_ids:
        renamed = [
            f"id {i} {n!r} (COCO: {c!r})"
            for (i, n), c in zip(categories, coco_names, strict=True)
            if n.strip().lower() != c
        ]
        findings.warn(
            "categories named unlike COCO's",
            "they are scored as the COCO classes of their ids",
            renamed,
            len(renamed),
        )
    elif names == coco_names:
        log.info(
            "annotation file %s numbers COCO's 80 categories %d..%d: class k scores as its k-th id",
            findings.path,
            ids[0],
            ids[-1],
        )
    else:
        coco = dict(zip(coco_ids, coco_names, strict=True))
        extra = [f"id {i} {n!r} is not COCO's" for i, n in categories if i not in coco]
        listed = set(ids)
        absent = [f"COCO's id {i} {coco[i]!r} is missing" for i in coco_ids if i not in listed]
        findings.errors_in(
            f"categories are not COCO's {NUM_CLASSES}, the model's classes: {len(ids)} listed",
            "use a COCO instances file (e.g. instances_val2017.json) or pass category_map "
            f"{{file category id: model class index 0..{NUM_CLASSES - 1}}}",
            extra + absent,
            len(extra) + len(absent),
        )
        return {}
    return {cat_id: k for k, cat_id in enumerate(ids)}


def _check_category_map(category_map: Mapping[int, int] | None, num_classes: int = NUM_CLASSES) -> None:
    """ConfigError unless `category_map` is None or a non-empty one-to-one {category id: class index}
    with class indices 0..num_classes-1."""
    if category_map is None:
        return
    if not isinstance(category_map, Mapping) or not category_map:
        default = "COCO's 80 categories" if num_classes == NUM_CLASSES else "the model's classes"
        raise ConfigError(
            f"category_map={_short(category_map)} must be None ({default}) or a non-empty dict "
            f"{{file category id: model class index 0..{num_classes - 1}}}"
        )
    bad = [
        f"{k!r}: {v!r}"
        for k, v in category_map.items()
        if not (_is_id(k) and _is_int(v) and 0 <= v < num_classes)
    ]
    if bad:
        raise ConfigError(
            f"category_map entries {_names(bad)} are not integer category id -> model class index "
            f"0..{num_classes - 1}; fix category_map"
        )
    shared = sorted(v for v, n in Counter(category_map.values()).items() if n > 1)
    if shared:
        raise ConfigError(
            f"category_map maps several categories to model class(es) {_names([str(v) for v in shared])}; "
            "their detections could only be scored as one of them, so map each class from one category"
        )


def _mapped_classes(
    categories: list[tuple[int, str]], category_map: Mapping[int, int], findings: _Findings
) -> dict[int, int]:
    listed = {cat_id for cat_id, _ in categories}
    unknown = sorted(set(category_map) - listed)
    findings.errors_in(
        "category_map keys that are not category ids of the file",
        "map only ids listed in the file's 'categories'",
        [f"id {cat_id}" for cat_id in unknown],
        len(unknown),
    )
    return {cat_id: cls for cat_id, cls in category_map.items() if cat_id in listed}


def _class_key(name: str) -> str:
    """How class and category names compare: case-insensitively, without surrounding blanks."""
    return name.strip().casefold()


def _counted_classes(
    categories: list[tuple[int, str]], num_classes: int, findings: _Findings
) -> dict[int, int]:
    """Class k is the k-th category by id (mmdet's `cat_ids`): the file must have `num_classes`."""
    if len(categories) != num_classes:
        findings.errors_in(
            f"categories are not the model's {num_classes} classes: {len(categories)} listed",
            f"use an annotation file with exactly {num_classes} categories (class k = the k-th category "
            "id), name the model's classes in its spec's `classes`, or pass category_map "
            f"{{file category id: model class index 0..{num_classes - 1}}}",
            [f"id {cat_id} {name!r}" for cat_id, name in categories],
            len(categories),
        )
        return {}
    return {cat_id: k for k, (cat_id, _) in enumerate(categories)}


def _named_classes(
    categories: list[tuple[int, str]], classes: Sequence[str], findings: _Findings
) -> dict[int, int]:
    """Class k is the category named classes[k] (names compared case-insensitively, stripped); each
    name must match exactly one category, and no two names the same one."""
    by_name: dict[str, list[int]] = {}
    for cat_id, name in categories:
        by_name.setdefault(_class_key(name), []).append(cat_id)
    keys = [_class_key(name) for name in classes]
    missing = [repr(name) for name, key in zip(classes, keys, strict=True) if key not in by_name]
    findings.errors_in(
        "model classes that no category is named as",
        "use the annotation file of the model's classes, or fix the names in its spec's `classes` "
        "(compared case-insensitively)",
        missing,
        len(missing),
    )
    alike = [
        f"{name!r} (ids {', '.join(map(str, by_name[key]))})"
        for name, key in zip(classes, keys, strict=True)
        if len(by_name.get(key, ())) > 1
    ]
    findings.errors_in(
        "model classes that several categories are named as",
        "give each category its own name",
        alike,
        len(alike),
    )
    twice = [repr(name) for name, key in zip(classes, keys, strict=True) if keys.count(key) > 1]
    findings.errors_in(
        "model classes that name the same category (names compare case-insensitively)",
        "fix the spec's `classes`",
        twice,
        len(twice),
    )
    if missing or alike or twice:
        return {}
    return {by_name[key][0]: k for k, key in enumerate(keys)}


def _model_classes(
    categories: list[tuple[int, str]],
    findings: _Findings,
    category_map: Mapping[int, int] | None,
    num_classes: int,
    classes: Sequence[str] | None,
) -> dict[int, int]:
    """{file category id: model class index}: `category_map`'s, else by the model's class names, else
    COCO's 80 (`num_classes` 80) or the `num_classes` categories in id order."""
    if category_map is not None:
        return _mapped_classes(categories, category_map, findings)
    if classes is not None:
        return _named_classes(categories, classes, findings)
    if num_classes == NUM_CLASSES:
        return _default_classes(categories, findings)
    return _counted_classes(categories, num_classes, findings)


# ---------------------------------------------------------------- entry points


def check_annotations(
    data: dict[str, Any],
    annotation_file: str | Path,
    category_map: Mapping[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    classes: Sequence[str] | None = None,
) -> Annotations:
    """Check every entry of parsed annotations (`read_annotations`); DatasetError lists all problems.
    The categories must be the model's classes (`num_classes`, `classes`: its spec's; see the module
    docstring) unless `category_map` maps them."""
    _check_category_map(category_map, num_classes)
    findings = _Findings(Path(annotation_file))
    images = _check_images(data["images"], findings)
    before = len(findings.errors)
    categories = _check_categories(data["categories"], findings)
    class_of: dict[int, int] = {}
    categories_ok = len(findings.errors) == before  # bad entries give no category list to check against
    if categories_ok:
        class_of = _model_classes(categories, findings, category_map, num_classes, classes)
    columns = _annotation_columns(data["annotations"], findings)
    # ids of every image entry, usable or not: an image with a bad width is not also "unknown"
    listed = [raw["id"] for raw in data["images"] if isinstance(raw, dict) and _is_id(raw.get("id"))]
    _check_references(columns, np.array(listed, dtype=np.int64), findings)
    _check_boxes(columns, images, findings)
    if categories_ok:
        named = category_map is None and classes is not None
        _check_classes(columns, categories, class_of, findings, named)
    findings.raise_errors()
    if not images:
        raise DatasetError(
            f"annotation file {str(findings.path)!r} lists no images; point at a non-empty COCO set"
        )
    findings.log_warnings()
    if columns.crowd:
        log.info(
            "annotation file %s: %d crowd annotations (ignored when matching, as in COCO)",
            findings.path,
            columns.crowd,
        )
    return Annotations(findings.path, images, categories, class_of, len(columns.ids))


def load_annotations(
    annotation_file: str | Path,
    category_map: Mapping[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    classes: Sequence[str] | None = None,
) -> Annotations:
    """Read and check a COCO instances file (`read_annotations` then `check_annotations`)."""
    data = read_annotations(annotation_file)
    return check_annotations(data, annotation_file, category_map, num_classes, classes)


def _inside(path: Path, real_dir: Path) -> bool:
    try:
        return path.resolve().is_relative_to(real_dir)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _check_image_files(images: list[CocoImage], images_path: Path, ann_path: Path) -> None:
    """DatasetError unless every image resolves inside the image folder and exists."""
    real_dir = images_path.resolve()
    escaping = [
        f"{image.file_name!r} (id {image.image_id})" for image in images if not _inside(image.path, real_dir)
    ]
    if escaping:
        raise DatasetError(
            f"{len(escaping)} of {len(images)} images listed in {str(ann_path)!r} resolve outside the image "
            f"folder {str(real_dir)!r} (a symbolic link leads out, or loops): {_names(escaping)}; copy "
            "those images into the image folder"
        )
    missing = [image.file_name for image in images if not image.path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} images listed in {str(ann_path)!r} are missing from "
            f"{str(images_path)!r}: {_names(missing)}; complete the image download, pass the matching "
            "annotation file, or limit max_images"
        )


def load_coco(
    root: str | Path,
    image_dir: str = DEFAULT_IMAGE_DIR,
    annotation_file: str = DEFAULT_ANNOTATION_FILE,
    max_images: int | None = None,
    category_map: Mapping[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    classes: Sequence[str] | None = None,
) -> CocoDataset:
    """Validate a COCO root and return its images (first `max_images` by id) and categories.

    `image_dir` and `annotation_file` are relative to `root` (absolute paths are used as given).
    The whole annotation file is checked (`check_annotations`); every selected image file must exist
    inside the image folder. The categories must be the model's classes: `num_classes` and `classes`
    of its spec (default COCO's 80 by id); `category_map` maps the file's category ids to model class
    indices for a set whose categories are not the model's.
    """
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise DatasetError(f"max_images={max_images!r} must be a positive integer or None (all images)")
    _check_category_map(category_map, num_classes)
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
    checked = load_annotations(ann_path, category_map, num_classes, classes)
    images = [CocoImage(i, name, w, h, images_path / name) for i, name, w, h in checked.images]
    total = len(images)
    if max_images is not None:
        images = images[: int(max_images)]
    _check_image_files(images, images_path, ann_path)
    return CocoDataset(
        root=root_path,
        image_dir=images_path,
        annotation_file=ann_path,
        images=images,
        categories=checked.categories,
        total_images=total,
        class_of=checked.class_of,
    )
