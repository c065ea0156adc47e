"""Parity of YOLOX candidates: `gfocal_pipeline.parity.compare_candidates` with one prior per
location, three levels (strides 8/16/32), every prior kept (nms_pre covers every level), box
differences relative to stride + box size and one label per candidate (the spec's parity facts)."""

from __future__ import annotations

import numpy as np

from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec
from gfocal_pipeline.parity import ParityReport, compare_candidates, level_blocks

Blocks = list[tuple[int, int, int]]


def yolox_level_blocks(height: int, width: int, spec: YoloxSpec = YOLOX_S) -> Blocks:
    """Per level: (number of priors H*W, number kept (all), offset of the level's first candidate)."""
    return level_blocks(height, width, spec.nms_pre, spec.anchors_per_location, spec.strides)


def candidates_per_image(height: int, width: int, spec: YoloxSpec = YOLOX_S) -> int:
    """K, the candidates per image of the portable graph: every prior of the three levels."""
    return sum(kept for _, kept, _ in yolox_level_blocks(height, width, spec))


def compare_yolox_candidates(
    got: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    height: int,
    width: int,
    spec: YoloxSpec = YOLOX_S,
    **tolerances: float,
) -> ParityReport:
    """The graph's candidates `got` = (boxes (B,K,4) or (B,K,1,4), one-label scores (B,K,80)) against
    PyTorch's decode of every prior `reference` = (boxes (B,K,4), scores of every class (B,K,80)),
    level by level (the generic comparison with one prior per location, YOLOX's three strides and the
    spec's parity facts: box unit, match tolerance, one label per box)."""
    return compare_candidates(
        got,
        reference,
        height,
        width,
        spec.nms_pre,
        spec.anchors_per_location,
        spec.strides,
        box_unit=spec.parity_box_unit,
        one_label=spec.one_label_per_box,
        **{"match_px": spec.parity_match_box, **tolerances},
    )
