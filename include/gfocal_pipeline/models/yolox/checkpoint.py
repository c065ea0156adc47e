"""Loading YOLOX checkpoints in mmdet's layout with the project's safe, strict loader."""

from __future__ import annotations

import os
from typing import cast

from gfocal_pipeline.checkpoint import CheckpointLayout, load_with_layout
from gfocal_pipeline.models.yolox.detector import YOLOX, build_yolox
from gfocal_pipeline.models.yolox.spec import YOLOX_S, YoloxSpec


def checkpoint_layout(spec: YoloxSpec = YOLOX_S) -> CheckpointLayout:
    """The layout a YOLOX of `spec` loads: its state_dict keys and shapes, named in errors."""
    return CheckpointLayout(spec.display_name, spec.official_checkpoint, lambda: build_yolox(spec))


def load_yolox(path: str | os.PathLike[str], strict: bool = True, spec: YoloxSpec = YOLOX_S) -> YOLOX:
    """YOLOX of `spec` in eval mode with `path`'s weights; strict by default, mismatches by key."""
    return cast(YOLOX, load_with_layout(path, checkpoint_layout(spec), strict))
