"""ONNX export of YOLOX in the project's two variants, through `gfocal_pipeline.export`.

- `portable`: boxes (N,K,4) in input pixels and one-label scores (N,K,80) (`deploy`), K = every prior
  of the three levels; NMS runs on the host.
- `ascend`: the same candidates followed by Ascend's `BatchMultiClassNMS` (zero background column,
  fp16 inputs, as the other adapters emit it) with the spec's score_thr, IoU and max_per_img; outputs
  `dets` (N,100,5) and `labels` (N,100).

The priors of the exported size are computed once and traced as constants of the graph. Tracing, the
checker, the graph cut before the NMS, the parity verdict and `ExportResult` are the generic ones.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch

from gfocal_pipeline.export import (
    ExportOptions,
    ExportPlan,
    ExportResult,
    _nms_free_copy,
    _session,
    export_model,
)
from gfocal_pipeline.models.yolox.deploy import YoloxDeploy, decode_candidates, grid_priors
from gfocal_pipeline.models.yolox.detector import YOLOX
from gfocal_pipeline.models.yolox.parity import candidates_per_image, compare_yolox_candidates
from gfocal_pipeline.models.yolox.spec import SPEC
from gfocal_pipeline.nets.ascend_nms import CandidatesExport
from gfocal_pipeline.nets.levels import level_sizes
from gfocal_pipeline.parity import ParityReport

DEFAULT_HEIGHT, DEFAULT_WIDTH = SPEC.preprocessing.height, SPEC.preprocessing.width  # 640 x 640


class YoloxExport(CandidatesExport):
    """What goes into the ONNX file: `YoloxDeploy` with its priors frozen for its input size."""

    def __init__(self, deploy: YoloxDeploy, variant: str = "portable") -> None:
        super().__init__(deploy, variant)
        sizes = level_sizes(deploy.height, deploy.width, self.spec.strides)
        self.freeze_levels("priors", grid_priors(sizes, self.spec))

    def priors(self) -> list[torch.Tensor]:
        """The (H*W, 2) prior points of each level for the exported input size."""
        return self.levels("priors")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deploy = self.deploy
        heads = deploy.model(deploy.network_input(x))
        return self.finish(*decode_candidates(*heads, self.spec, self.priors()))


def reference_priors(deploy: YoloxDeploy, feed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's decode of every prior: boxes (B,K,4) and every class's score (B,K,80), which the
    graph's one label per prior is compared with (`compare_yolox_candidates`)."""
    with torch.inference_mode():
        heads = deploy.model(deploy.network_input(torch.from_numpy(feed)))
        boxes, scores = decode_candidates(*heads, deploy.spec, one_label=False)
    return boxes.numpy(), scores.numpy()


def parity(module: YoloxExport, graph: onnx.ModelProto, *feeds: np.ndarray) -> ParityReport:
    """ONNX Runtime's candidates of `graph` against `module`'s PyTorch decode of every prior.

    An ascend graph is run cut just before its NMS (float32 inputs, the background column dropped).
    """
    runnable = graph if module.variant == "portable" else _nms_free_copy(graph)[0]
    session = _session(runnable)
    report = ParityReport()
    for feed in feeds:
        boxes, scores = session.run(None, {session.get_inputs()[0].name: feed})
        got = (boxes, scores[..., : module.spec.num_classes])
        reference = reference_priors(module.deploy, feed)
        report.merge(compare_yolox_candidates(got, reference, module.height, module.width, module.spec))
    return report


def export_yolox(
    model: YOLOX,
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    *,
    checkpoint_sha256: str = "",
    **options: Any,
) -> ExportResult:
    """Export `model` to `output` (.onnx), check and parity-check it, write `<name>.export.json`.

    `options` are `export.ExportOptions`' (batch, dynamic_batch, opset, input_name,
    normalize_in_graph, parity_threshold, max_unexplained); `checkpoint_sha256` is only recorded.
    A refused graph is kept as `<name>.rejected.onnx`.
    """

    def build(o: ExportOptions) -> YoloxExport:
        return YoloxExport(YoloxDeploy(model, o.height, o.width, o.normalize_in_graph), o.variant)

    plan = ExportPlan(
        build=build,
        compare=parity,
        candidates=lambda module: candidates_per_image(module.height, module.width, module.spec),
        spec=SPEC.to_dict(),
        checkpoint_sha256=lambda: checkpoint_sha256,
    )
    return export_model(plan, output, ExportOptions(variant, height, width, **options))
