"""GFocalV2's export: its deploy module and parity check handed to the generic `export_graph`.

- `portable`: `boxes` (N,K,4) and `scores` (N,K,80), K = 3267 for 800x1216 (per level min(H*W, 1000)).
- `ascend`: the seed's `BatchMultiClassNMS` (82 score columns with the zero background, fp16 inputs):
  `dets` (N,100,5), `labels` (N,100). Parity runs the graph cut before the NMS (81 classifier columns).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch

from gfocal_pipeline.constants import (
    CLS_OUT_CHANNELS,
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    NUM_CLASSES,
)
from gfocal_pipeline.export import (
    ALL_ANCHORS,
    ExportOptions,
    ExportPlan,
    ExportResult,
    _nms_free_copy,
    _session,
    export_model,
)
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model
from gfocal_pipeline.models.gfocalv2.decode import candidates_per_image, decode_candidates
from gfocal_pipeline.models.gfocalv2.deploy import DeployModel
from gfocal_pipeline.models.gfocalv2.spec import SPEC
from gfocal_pipeline.parity import ParityReport, compare_candidates


def reference_anchors(deploy: DeployModel, feed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's decode of every anchor (no top-k): boxes (B,A,4) and all 81 scores (B,A,81)."""
    with torch.inference_mode():
        tensor = torch.from_numpy(feed)
        tensor = deploy.network_input(tensor)
        boxes, scores = decode_candidates(
            *deploy.model(tensor),
            deploy.height,
            deploy.width,
            nms_pre=ALL_ANCHORS,
            project=deploy.model.bbox_head.integral.project,
        )
    return boxes.numpy(), scores.numpy()


def parity(deploy: DeployModel, model: onnx.ModelProto, *feeds: np.ndarray) -> ParityReport:
    """ONNX Runtime's candidates of `model` against PyTorch's anchors on each feed (see
    `gfocal_pipeline.parity`).

    The portable graph is compared on its 80 output scores; the ascend graph is run cut just before
    its NMS (float32 boxes and the 81 classifier channels, the appended zero column dropped).
    """
    graph = model if deploy.variant == "portable" else _nms_free_copy(model)[0]
    columns = NUM_CLASSES if deploy.variant == "portable" else CLS_OUT_CHANNELS
    session = _session(graph)
    report = ParityReport()
    for feed in feeds:
        boxes, scores = session.run(None, {session.get_inputs()[0].name: feed})
        reference = reference_anchors(deploy, feed)
        got = (boxes, scores[..., :columns])
        report.merge(compare_candidates(got, reference, deploy.height, deploy.width))
    return report


def export_gfocalv2(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    **options: Any,
) -> ExportResult:
    """Export a GFocalV2 checkpoint (official layout, strict) and verify it; `options` are
    `export.ExportOptions`' (see `export.export_onnx`)."""

    def build(o: ExportOptions) -> DeployModel:
        return DeployModel(load_model(checkpoint), o.variant, o.height, o.width, o.normalize_in_graph)

    plan = ExportPlan(
        build=build,
        compare=parity,
        candidates=lambda deploy: candidates_per_image(deploy.height, deploy.width),
        spec=SPEC.to_dict(),
        checkpoint_sha256=lambda: sha256_file(checkpoint),
    )
    return export_model(plan, output, ExportOptions(variant, height, width, **options))
