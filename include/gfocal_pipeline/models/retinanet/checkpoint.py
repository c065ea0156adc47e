"""Loading RetinaNet checkpoints in mmdet's layout with the project's safe, strict loader."""

from __future__ import annotations

import os
from typing import cast

from gfocal_pipeline.checkpoint import CheckpointLayout, load_with_layout
from gfocal_pipeline.models.retinanet.detector import RetinaNet, build_retinanet
from gfocal_pipeline.models.retinanet.spec import RETINANET_R50_FPN_1X, RetinaNetSpec


def checkpoint_layout(spec: RetinaNetSpec = RETINANET_R50_FPN_1X) -> CheckpointLayout:
    """The layout a RetinaNet of `spec` loads: its state_dict keys and shapes, named in errors."""
    return CheckpointLayout(spec.display_name, spec.official_checkpoint, lambda: build_retinanet(spec))


def load_retinanet(
    path: str | os.PathLike[str], strict: bool = True, spec: RetinaNetSpec = RETINANET_R50_FPN_1X
) -> RetinaNet:
    """RetinaNet of `spec` in eval mode with `path`'s weights; strict by default, mismatches by key."""
    return cast(RetinaNet, load_with_layout(path, checkpoint_layout(spec), strict))
