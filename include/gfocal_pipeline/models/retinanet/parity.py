"""Tie-aware parity of RetinaNet candidates: `gfocal_pipeline.parity` with the spec's 9 anchors per
location (a level holds H*W*A anchors and keeps min(nms_pre, H*W*A) of them)."""

from __future__ import annotations

import numpy as np

from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec
from gfocal_pipeline.parity import ParityReport, compare_candidates, level_blocks

Blocks = list[tuple[int, int, int]]


def retinanet_level_blocks(height: int, width: int, spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> Blocks:
    """Per level: (number of anchors H*W*A, number kept, offset of the level's first kept candidate)."""
    return level_blocks(height, width, spec.nms_pre, spec.anchors_per_location, spec.strides)


def candidates_per_image(height: int, width: int, spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> int:
    """K, the candidates per image of the deploy graph: the sum over levels of min(nms_pre, H*W*A)."""
    return sum(kept for _, kept, _ in retinanet_level_blocks(height, width, spec))


def compare_retinanet_candidates(
    got: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    height: int,
    width: int,
    spec: RetinaNetSpec = RETINANET_R50_FPN_1X,
    **tolerances: float,
) -> ParityReport:
    """The graph's candidates `got` = (boxes, scores (B,K,80)) against PyTorch's decode of every
    anchor `reference` = (boxes (B,A,4), scores (B,A,80)), level by level (`compare_candidates`)."""
    return compare_candidates(
        got, reference, height, width, spec.nms_pre, spec.anchors_per_location, spec.strides, **tolerances
    )
