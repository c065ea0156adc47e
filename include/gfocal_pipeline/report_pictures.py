"""One report picture: an image with ground truth, reference and device boxes, as a small PNG.

Styles (told apart by line style as well as colour): ground truth green, thick and solid; the
reference blue and dashed, labelled under its box; the device red, thin and solid, labelled on a
filled tab above its box. Labels give class and score. The image is shrunk to `thumb_side` first
(boxes drawn at that scale, so text stays readable), then further until its PNG fits `picture_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from gfocal_pipeline.disagreement import Boxes
    from gfocal_pipeline.report import ReportOptions

# BGR colours, thickness, dashed
STYLES: dict[str, tuple[tuple[int, int, int], int, bool]] = {
    "gt": ((40, 160, 40), 3, False),
    "reference": ((220, 120, 0), 2, True),
    "device": ((30, 60, 230), 1, False),
}
LEGEND = (("ground truth", "gt"), ("reference", "reference"), ("device", "device"))
FONT = cv2.FONT_HERSHEY_SIMPLEX
DASH = 6
LEGEND_HEIGHT = 22
MIN_SIDE = 96


def _dashed_rect(img: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], color: Any, width: int) -> None:
    (x1, y1), (x2, y2) = p1, p2
    for a, b, fixed, horizontal in (
        (x1, x2, y1, True),
        (x1, x2, y2, True),
        (y1, y2, x1, False),
        (y1, y2, x2, False),
    ):
        for start in range(a, b, 2 * DASH):
            end = min(start + DASH, b)
            pts = ((start, fixed), (end, fixed)) if horizontal else ((fixed, start), (fixed, end))
            cv2.line(img, pts[0], pts[1], color, width, cv2.LINE_AA)


def _label(img: np.ndarray, text: str, x: int, y: int, color: Any, filled: bool) -> None:
    (w, h), base = cv2.getTextSize(text, FONT, 0.38, 1)
    y = max(y, h + base + 1)
    if filled:
        cv2.rectangle(img, (x, y - h - base - 1), (x + w + 2, y), color, -1)
        cv2.putText(img, text, (x + 1, y - base), FONT, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    else:
        cv2.putText(img, text, (x + 1, y - base), FONT, 0.38, color, 1, cv2.LINE_AA)


def _draw_side(
    img: np.ndarray, side: str, boxes: Boxes, rows: np.ndarray, scale: float, names: Mapping[int, str]
) -> None:
    color, width, dashed = STYLES[side]
    for row in rows:
        x, y, w, h = (boxes.boxes[row] * scale).tolist()
        p1, p2 = (round(x), round(y)), (round(x + w), round(y + h))
        if dashed:
            _dashed_rect(img, p1, p2, color, width)
        else:
            cv2.rectangle(img, p1, p2, color, width, cv2.LINE_AA)
        if side == "gt":
            continue  # the ground truth is told by its style; the labels are the detections'
        name = names.get(int(boxes.classes[row]), str(int(boxes.classes[row])))
        text = f"{name} {boxes.scores[row]:.2f}"
        if side == "device":
            _label(img, text, p1[0], p1[1], color, filled=True)
        else:
            _label(img, text, p1[0], p2[1] + 12, color, filled=False)


def _legend(width: int) -> np.ndarray:
    strip = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    x = 4
    for text, side in LEGEND:
        color, thick, dashed = STYLES[side]
        if dashed:
            _dashed_rect(strip, (x, 6), (x + 18, 15), color, thick)
        else:
            cv2.rectangle(strip, (x, 6), (x + 18, 15), color, thick)
        cv2.putText(strip, text, (x + 22, 15), FONT, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        x += 26 + cv2.getTextSize(text, FONT, 0.38, 1)[0][0] + 10
    return strip


def _render(
    image: np.ndarray,
    sides: Mapping[str, tuple[Boxes, np.ndarray | None]],
    names: Mapping[int, str],
    side_px: int,
) -> np.ndarray:
    height, width = image.shape[:2]
    scale = min(1.0, side_px / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image.copy()
    for side in ("gt", "reference", "device"):  # device last: on top
        if side in sides and sides[side][1] is not None:
            _draw_side(canvas, side, sides[side][0], sides[side][1], scale, names)
    return np.vstack([canvas, _legend(canvas.shape[1])])


def draw_picture(
    source: Path,
    sides: Mapping[str, tuple[Boxes, np.ndarray | None]],
    names: Mapping[int, str],
    options: ReportOptions,
) -> bytes:
    """PNG bytes of `source` with each side's boxes (`sides[name] = (boxes, rows of this image)`)."""
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {str(source)!r} cannot be read")
    side_px = options.thumb_side
    while True:
        ok, png = cv2.imencode(
            ".png", _render(image, sides, names, side_px), [cv2.IMWRITE_PNG_COMPRESSION, 9]
        )
        if not ok:
            raise ValueError(f"image {str(source)!r} could not be encoded as PNG")
        if png.nbytes <= options.picture_bytes or side_px <= MIN_SIDE:
            return png.tobytes()
        side_px = max(MIN_SIDE, int(side_px * 0.8))
