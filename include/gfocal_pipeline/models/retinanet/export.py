"""ONNX export of RetinaNet in the project's two variants, verified like GFocalV2's export.

- `portable`: boxes (N,K,4) in input pixels and sigmoid scores (N,K,80), K = sum over levels of
  min(nms_pre, H*W*9); NMS runs on the host.
- `ascend`: the same candidates followed by Ascend's `BatchMultiClassNMS`, emitted as the GFocalV2
  ascend variant emits it (zero background column, fp16 inputs), with the spec's score_thr, IoU and
  max_per_img; outputs `dets` (N,100,5) and `labels` (N,100).

The anchors of the exported size are computed once and traced as constants of the graph. Everything
that is not RetinaNet's own comes from `gfocal_pipeline.export`: argument checks, the tracer (input and
output names, opsets, dynamic batch), the checker, the graph cut before the NMS, the ONNX Runtime
session, the parity verdict and `ExportResult`. Parity itself is `models.retinanet.parity`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_INPUT_NAME,
    DEFAULT_MAX_UNEXPLAINED,
    DEFAULT_PARITY_THRESHOLD,
    DEFAULT_WIDTH,
)
from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.export import (
    ALL_ANCHORS,
    DEFAULT_OPSET,
    ExportOptions,
    ExportPlan,
    ExportResult,
    _nms_free_copy,
    _session,
    _trace,
    _verdict,
    export_model,
)
from gfocal_pipeline.models.retinanet.anchors import AnchorGenerator
from gfocal_pipeline.models.retinanet.deploy import RetinaNetDeploy, decode_candidates
from gfocal_pipeline.models.retinanet.detector import RetinaNet
from gfocal_pipeline.models.retinanet.parity import candidates_per_image, compare_retinanet_candidates
from gfocal_pipeline.models.retinanet.spec import SPEC
from gfocal_pipeline.nets.ascend_nms import CandidatesExport
from gfocal_pipeline.nets.levels import level_sizes
from gfocal_pipeline.parity import ParityReport

log = logging.getLogger(__name__)

# tracing warns about `decode_candidates`'s `if` on the anchor count of a level, a constant per size
TRACED_BRANCH = "Converting a tensor to a Python boolean"


class RetinaNetExport(CandidatesExport):
    """What goes into the ONNX file: `RetinaNetDeploy` with its anchors frozen for its input size."""

    def __init__(self, deploy: RetinaNetDeploy, variant: str = "portable") -> None:
        super().__init__(deploy, variant)
        sizes = level_sizes(deploy.height, deploy.width, self.spec.strides)
        self.freeze_levels("anchors", AnchorGenerator(self.spec).grid_anchors(sizes))

    def anchors(self) -> list[torch.Tensor]:
        """The (H*W*A, 4) anchors of each level for the exported input size."""
        return self.levels("anchors")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deploy = self.deploy
        heads = deploy.model(deploy.network_input(x))
        return self.finish(*decode_candidates(*heads, deploy.height, deploy.width, self.spec, self.anchors()))


def trace(
    module: RetinaNetExport,
    feed: np.ndarray,
    path: Path,
    input_name: str = DEFAULT_INPUT_NAME,
    opset: int | None = None,
    batch_dim: int | str = 1,
) -> onnx.ModelProto:
    """`torch.onnx.export` of `module` to `path` by the project's tracer (names, opset, batch axis)."""
    opset = DEFAULT_OPSET[module.variant] if opset is None else opset
    with warnings.catch_warnings():  # the per-level top-k branch is static for the exported size
        warnings.filterwarnings(
            "ignore", TRACED_BRANCH, torch.jit.TracerWarning, decode_candidates.__module__
        )
        return _trace(module, feed, path, input_name, opset, batch_dim)


def reference_anchors(deploy: RetinaNetDeploy, feed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's decode of every anchor (no top-k): boxes (B,A,4) and scores (B,A,80)."""
    every = dataclasses.replace(deploy.spec, nms_pre=ALL_ANCHORS)
    with torch.inference_mode():
        x = torch.from_numpy(feed)
        x = deploy.network_input(x)
        boxes, scores = decode_candidates(*deploy.model(x), deploy.height, deploy.width, every)
    return boxes.numpy(), scores.numpy()


def parity(module: RetinaNetExport, graph: onnx.ModelProto, *feeds: np.ndarray) -> ParityReport:
    """ONNX Runtime's candidates of `graph` against `module`'s PyTorch decode of every anchor.

    An ascend graph is run cut just before its NMS (float32 inputs, the background column dropped).
    """
    runnable = graph if module.variant == "portable" else _nms_free_copy(graph)[0]
    session = _session(runnable)
    deploy = module.deploy
    report = ParityReport()
    for feed in feeds:
        boxes, scores = session.run(None, {session.get_inputs()[0].name: feed})
        got = (boxes, scores[..., : module.spec.num_classes])
        reference = reference_anchors(deploy, feed)
        report.merge(compare_retinanet_candidates(got, reference, deploy.height, deploy.width, module.spec))
    return report


def check_parity(
    module: RetinaNetExport,
    graph: onnx.ModelProto,
    feeds: list[np.ndarray],
    parity_threshold: float = DEFAULT_PARITY_THRESHOLD,
    max_unexplained: int = DEFAULT_MAX_UNEXPLAINED,
) -> ParityReport:
    """`parity`, refused with an `ExportError` (the reason, every level, the fix) like GFocalV2's."""
    report = parity(module, graph, *feeds)
    log.info("parity ONNX Runtime vs PyTorch per level:\n%s", report.describe())
    refusal, fix = _verdict(report, parity_threshold, max_unexplained)
    if refusal:
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree on the {module.spec.display_name} {module.variant} graph: "
            f"{refusal}.\n{report.describe()}\n{fix}"
        )
    if report.unexplained:
        log.warning("parity: %d unexplained candidate(s) let through by max_unexplained", report.unexplained)
    return report


def export_retinanet(
    model: RetinaNet,
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    *,
    checkpoint_sha256: str = "",
    **options: Any,
) -> ExportResult:
    """Export `model` to `output` (.onnx), check and parity-check it, write `<name>.export.json`.

    `options` are `export.ExportOptions`' (see `gfocal_pipeline.export.export_onnx`);
    `checkpoint_sha256` is only recorded (the model comes loaded). A refused graph is kept as
    `<name>.rejected.onnx`.
    """

    def build(o: ExportOptions) -> RetinaNetExport:
        return RetinaNetExport(RetinaNetDeploy(model, o.height, o.width, o.normalize_in_graph), o.variant)

    plan = ExportPlan(
        build=build,
        compare=parity,
        candidates=lambda module: candidates_per_image(module.height, module.width, module.spec),
        spec=SPEC.to_dict(),
        checkpoint_sha256=lambda: checkpoint_sha256,
    )
    with warnings.catch_warnings():  # the per-level top-k branch is static for the exported size
        warnings.filterwarnings(
            "ignore", TRACED_BRANCH, torch.jit.TracerWarning, decode_candidates.__module__
        )
        return export_model(plan, output, ExportOptions(variant, height, width, **options))
