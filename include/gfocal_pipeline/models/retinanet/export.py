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

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_INPUT_NAME,
    DEFAULT_MAX_UNEXPLAINED,
    DEFAULT_PARITY_THRESHOLD,
    DEFAULT_WIDTH,
)
from gfocal_pipeline.decode import level_sizes
from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.export import (
    ALL_ANCHORS,
    DEFAULT_OPSET,
    ExportResult,
    _check_arguments,
    _keep_rejected,
    _nms_free_copy,
    _session,
    _set_dims,
    _trace,
    _verdict,
    check_graph,
    rejected_path,
    sample_inputs,
)
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file, write_json
from gfocal_pipeline.model.deploy import ASCEND_OUTPUTS, PORTABLE_OUTPUTS, VARIANTS, BatchMultiClassNMS
from gfocal_pipeline.models.retinanet.anchors import AnchorGenerator
from gfocal_pipeline.models.retinanet.deploy import RetinaNetDeploy, decode_candidates
from gfocal_pipeline.models.retinanet.detector import RetinaNet
from gfocal_pipeline.models.retinanet.parity import candidates_per_image, compare_retinanet_candidates
from gfocal_pipeline.models.retinanet.spec import RetinaNetSpec
from gfocal_pipeline.parity import ParityReport

log = logging.getLogger(__name__)

# tracing warns about `decode_candidates`'s `if` on the anchor count of a level, a constant per size
TRACED_BRANCH = "Converting a tensor to a Python boolean"


def ascend_nms(
    boxes: torch.Tensor, scores: torch.Tensor, spec: RetinaNetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates -> Ascend's in-graph NMS: dets (N, max_per_img, 5) and labels (N, max_per_img).

    As the GFocalV2 ascend variant: a zero background column appended to the scores, boxes as
    (N, K, 1, 4), both cast to fp16 for `BatchMultiClassNMS`.
    """
    scores = torch.cat([scores, torch.zeros_like(scores[..., :1])], dim=-1)
    limit = spec.max_per_img
    nms = BatchMultiClassNMS.apply(
        boxes.unsqueeze(2).half(), scores.half(), spec.score_thr, spec.nms_iou, limit, limit
    )
    return torch.cat([nms[0].float(), nms[1].float().unsqueeze(-1)], dim=-1), nms[2].long()


class RetinaNetExport(nn.Module):
    """What goes into the ONNX file: `RetinaNetDeploy` with its anchors frozen for its input size."""

    def __init__(self, deploy: RetinaNetDeploy, variant: str = "portable") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.deploy = deploy
        self.variant = variant
        self.spec = deploy.spec
        sizes = level_sizes(deploy.height, deploy.width, self.spec.strides)
        for level, anchors in enumerate(AnchorGenerator(self.spec).grid_anchors(sizes)):
            self.register_buffer(f"anchors_{level}", anchors, persistent=False)

    @property
    def output_names(self) -> tuple[str, ...]:
        return PORTABLE_OUTPUTS if self.variant == "portable" else ASCEND_OUTPUTS

    def anchors(self) -> list[torch.Tensor]:
        """The (H*W*A, 4) anchors of each level for the exported input size."""
        return [getattr(self, f"anchors_{level}") for level in range(len(self.spec.strides))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deploy = self.deploy
        if deploy.normalize_in_graph:
            x = deploy.normalize(x)
        heads = deploy.model(x)
        boxes, scores = decode_candidates(*heads, deploy.height, deploy.width, self.spec, self.anchors())
        return (boxes, scores) if self.variant == "portable" else ascend_nms(boxes, scores, self.spec)


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
        graph = _trace(module, feed, path, input_name, opset, batch_dim)
    if module.variant == "ascend":  # the shared tracer states GFocalV2's count; state the spec's
        _set_dims(graph.graph.output[0], [batch_dim, module.spec.max_per_img, 5])
        _set_dims(graph.graph.output[1], [batch_dim, module.spec.max_per_img])
        onnx.save(graph, str(path))
    return graph


def reference_anchors(deploy: RetinaNetDeploy, feed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's decode of every anchor (no top-k): boxes (B,A,4) and scores (B,A,80)."""
    every = dataclasses.replace(deploy.spec, nms_pre=ALL_ANCHORS)
    with torch.inference_mode():
        x = torch.from_numpy(feed)
        if deploy.normalize_in_graph:
            x = deploy.normalize(x)
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
            f"ONNX Runtime and PyTorch disagree on the RetinaNet {module.variant} graph: {refusal}.\n"
            f"{report.describe()}\n{fix}"
        )
    if report.unexplained:
        log.warning("parity: %d unexplained candidate(s) let through by max_unexplained", report.unexplained)
    return report


def _verify(
    module: RetinaNetExport,
    graph: onnx.ModelProto,
    feeds: list[np.ndarray],
    paths: tuple[Path, Path],
    gate: tuple[float, int],
) -> ParityReport:
    """Checker and parity on the graph at `paths[0]`; a refused one is kept as `*.rejected.onnx`."""
    tmp, output = paths
    try:
        check_graph(graph, module.variant)
        return check_parity(module, graph, feeds, *gate)
    except ExportError as exc:
        rejected = _keep_rejected(tmp, output)
        raise ExportError(
            f"{exc}\nThe target {output} was not written; the refused graph is kept at {rejected}"
        ) from exc


def _input_facts(module: RetinaNetExport, input_name: str, batch_dim: int | str) -> dict[str, Any]:
    """The `ExportResult` fields that describe the graph's input and outputs."""
    deploy, uint8 = module.deploy, module.deploy.normalize_in_graph
    layout = [deploy.height, deploy.width, 3] if uint8 else [3, deploy.height, deploy.width]
    return {
        "variant": module.variant,
        "input_name": input_name,
        "input_shape": [batch_dim, *layout],
        "input_dtype": "uint8" if uint8 else "float32",
        "output_names": list(module.output_names),
        "candidates_per_image": candidates_per_image(deploy.height, deploy.width, module.spec),
    }


def _gate_facts(report: ParityReport, max_unexplained: int) -> dict[str, Any]:
    """The `ExportResult` fields that record the parity check."""
    return {
        "parity_max_abs_err": report.numeric_error,
        "parity": report.summary(),
        "parity_levels": report.per_level(),
        "max_unexplained": max_unexplained,
        "unexplained_allowed": report.unexplained > 0,
    }


def _target(output: str | os.PathLike[str]) -> Path:
    """The .onnx path to write; a directory or an unwritable folder is refused before any work."""
    path = Path(output)
    if path.is_dir():
        raise ExportError(f"output {str(path)!r} is a directory; give the path of the .onnx file to write")
    ensure_writable_dir(path.parent, "output directory")
    return path


def _record(result: ExportResult) -> ExportResult:
    """Write the sidecar `<name>.export.json` of a passed export; it supersedes a graph refused earlier."""
    target = Path(result.onnx_path)
    with contextlib.suppress(FileNotFoundError):
        rejected_path(target).unlink()
    write_json(target.with_suffix(".export.json"), result.to_dict())
    return result


def export_retinanet(
    model: RetinaNet,
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int | None = None,
    input_name: str = DEFAULT_INPUT_NAME,
    normalize_in_graph: bool = False,
    parity_threshold: float = DEFAULT_PARITY_THRESHOLD,
    max_unexplained: int = DEFAULT_MAX_UNEXPLAINED,
    checkpoint_sha256: str = "",
) -> ExportResult:
    """Export `model` to `output` (.onnx), check and parity-check it, write `<name>.export.json`.

    The arguments mean what they mean for `gfocal_pipeline.export.export_onnx`; `checkpoint_sha256`
    is only recorded (the model comes loaded). A refused graph is kept as `<name>.rejected.onnx`.
    """
    started = time.perf_counter()
    opset = _check_arguments(
        variant, height, width, batch, opset, input_name, parity_threshold, max_unexplained
    )
    output = _target(output)
    module = RetinaNetExport(RetinaNetDeploy(model, height, width, normalize_in_graph), variant).eval()
    feeds = [np.repeat(x, batch, axis=0) for x in sample_inputs(height, width, normalize_in_graph)]
    batch_dim: int | str = "batch" if dynamic_batch else batch
    with atomic_path(output) as tmp:
        graph = trace(module, feeds[0], tmp, input_name, opset, batch_dim)
        report = _verify(module, graph, feeds, (tmp, output), (parity_threshold, max_unexplained))
        onnx_sha = sha256_file(tmp)
    result = ExportResult(
        onnx_path=str(output),
        onnx_sha256=onnx_sha,
        checkpoint_sha256=checkpoint_sha256,
        opset=opset,
        export_seconds=round(time.perf_counter() - started, 3),
        **_input_facts(module, input_name, batch_dim),
        **_gate_facts(report, max_unexplained),
    )
    return _record(result)
