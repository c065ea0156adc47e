"""ONNX export of GFocalV2, two variants from one code path, with an ONNX Runtime parity check.

- `portable`: standard ops only; outputs `boxes` (N,K,4) in input pixels and `scores` (N,K,80), the
  pre-NMS candidates (K = 3267 for 800x1216: per level min(H*W, 1000)); NMS runs on the host.
- `ascend`: NMS inside the graph as Ascend's `BatchMultiClassNMS` (outputs `dets` (N,100,5),
  `labels` (N,100)), the form `atc` converts. ONNX Runtime cannot run that op, so the parity check
  runs the graph cut just before the NMS (its float32 inputs) and compares that with PyTorch.

The file is written to a temporary name, checked, and renamed only when everything passed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from gfocal_pipeline.checkpoint import load_model
from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_INPUT_NAME,
    DEFAULT_WIDTH,
    MAX_PER_IMG,
    NUM_CLASSES,
    SIZE_DIVISOR,
)
from gfocal_pipeline.decode import candidates_per_image
from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file, write_json
from gfocal_pipeline.model.deploy import NMS_OP, VARIANTS, DeployModel
from gfocal_pipeline.parity import candidate_errors

log = logging.getLogger(__name__)

DEFAULT_OPSET = {"portable": 17, "ascend": 11}
DEFAULT_PARITY_THRESHOLD = 1e-3


@dataclass
class ExportResult:
    """What an export produced; `to_xcom()` is the small dict the Airflow operator pushes."""

    onnx_path: str
    onnx_sha256: str
    checkpoint_sha256: str
    variant: str
    input_name: str
    input_shape: list[Any]
    input_dtype: str
    output_names: list[str]
    opset: int
    parity_max_abs_err: float
    parity: dict[str, float] = field(default_factory=dict)
    candidates_per_image: int = 0
    export_seconds: float = 0.0
    torch_version: str = torch.__version__
    onnx_version: str = onnx.__version__

    def to_xcom(self) -> dict[str, Any]:
        keys = (
            "onnx_path",
            "onnx_sha256",
            "checkpoint_sha256",
            "variant",
            "input_name",
            "input_shape",
            "output_names",
            "opset",
            "parity_max_abs_err",
            "export_seconds",
            "torch_version",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_shape(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_DIVISOR:
            raise ExportError(
                f"input {name} {value!r} must be a positive multiple of {SIZE_DIVISOR} "
                f"(the network downsamples by {SIZE_DIVISOR}); e.g. {DEFAULT_HEIGHT}x{DEFAULT_WIDTH}"
            )


def sample_input(height: int, width: int, uint8: bool) -> np.ndarray:
    """A real preprocessed image (one generated demo picture, letterboxed) of shape (1, ...)."""
    from gfocal_pipeline.demo_data import demo_image
    from gfocal_pipeline.preprocess import preprocess_image

    array, _ = preprocess_image(demo_image(0), "letterbox", "uint8" if uint8 else "float32", height, width)
    return array[None]


def _nms_free_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph cut just before the NMS node: its float32 inputs become the outputs."""
    nms = [n for n in model.graph.node if n.op_type == NMS_OP]
    if len(nms) != 1:
        raise ExportError(f"ascend graph must contain exactly one {NMS_OP} node, found {len(nms)}")
    producers = {out: node for node in model.graph.node for out in node.output}
    cut = []
    for name in nms[0].input:
        node = producers.get(name)
        # the seed casts both NMS inputs to fp16; compare the float32 tensors before that cast
        cut.append(node.input[0] if node is not None and node.op_type == "Cast" else name)
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    cut_model = extractor.extract_model([i.name for i in model.graph.input], cut)
    # shape inference cannot see through the data-dependent gathers; give the cut outputs their rank
    for out, rank in zip(cut_model.graph.output, (4, 3), strict=True):
        _set_dims(out, [f"{out.name}_d{i}" for i in range(rank)])
    return cut_model, cut


def _set_dims(value: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for dim in dims:
        if isinstance(dim, int):
            shape.dim.add().dim_value = dim
        else:
            shape.dim.add().dim_param = dim


CHECK_DOMAIN = "com.huawei.ascend"


def check_graph(model: onnx.ModelProto, variant: str) -> None:
    """onnx.checker (full) on the portable graph; on the ascend graph on everything but the NMS op.

    The Ascend op lives in the default domain (as `atc` expects), where the checker knows no such op;
    a copy with only that node moved to a custom domain is checked instead, so every other node, the
    opset and the shapes are still validated.
    """
    candidate = model
    if variant == "ascend":
        candidate = copy.deepcopy(model)
        for node in candidate.graph.node:
            if node.op_type == NMS_OP:
                node.domain = CHECK_DOMAIN
        candidate.opset_import.add(domain=CHECK_DOMAIN, version=1)
    try:
        onnx.checker.check_model(candidate, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported {variant} graph is not valid ONNX: {exc}") from exc


def _run_ort(model: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})


def parity(deploy: DeployModel, model: onnx.ModelProto, feed: np.ndarray) -> dict[str, float]:
    """ONNX Runtime vs PyTorch on the candidates: max abs error of boxes and scores (matched per
    level, see `gfocal_pipeline.parity`); candidates only one side kept and that are not boundary
    ties count as `unexplained` and fail the export."""
    from gfocal_pipeline.decode import decode_candidates

    with torch.inference_mode():
        tensor = torch.from_numpy(feed)
        if deploy.normalize_in_graph:
            tensor = deploy.normalize(tensor)
        boxes, scores = decode_candidates(
            *deploy.model(tensor),
            deploy.height,
            deploy.width,
            project=deploy.model.bbox_head.integral.project,
        )
    if deploy.variant == "portable":
        expected = (boxes.numpy(), scores[..., :NUM_CLASSES].numpy())
        got = _run_ort(model, feed)
    else:  # the graph cut before the NMS: float32 boxes (B,K,1,4) and scores with the zero column
        expected = (boxes.numpy(), scores.numpy())
        got = _run_ort(_nms_free_copy(model)[0], feed)
    return candidate_errors(
        (got[0], got[1][..., : expected[1].shape[-1]]), expected, deploy.height, deploy.width
    )


def export_onnx(
    checkpoint: str | os.PathLike[str],
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
) -> ExportResult:
    """Export `checkpoint` to `output` (.onnx) and verify it; see the module docstring."""
    started = time.perf_counter()
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    validate_shape(height, width)
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch {batch!r} must be an integer >= 1")
    if not input_name or not isinstance(input_name, str):
        raise ExportError(f"input name {input_name!r} must be a non-empty string")
    opset = DEFAULT_OPSET[variant] if opset is None else int(opset)
    if not 11 <= opset <= 20:
        raise ExportError(f"opset {opset} is outside the supported range 11..20")
    output = Path(output)
    ensure_writable_dir(output.parent, "output directory")

    model = load_model(checkpoint)
    deploy = DeployModel(model, variant, height, width, normalize_in_graph=normalize_in_graph).eval()
    feed = np.repeat(sample_input(height, width, normalize_in_graph), batch, axis=0)
    output_names = list(deploy.output_names)
    dynamic_axes = {name: {0: "batch"} for name in [input_name, *output_names]} if dynamic_batch else None
    log.info(
        "exporting %s graph %dx%d batch %s opset %d -> %s",
        variant,
        height,
        width,
        "dynamic" if dynamic_batch else batch,
        opset,
        output,
    )

    with atomic_path(output) as tmp:
        try:
            with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    deploy,
                    (torch.from_numpy(feed),),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    custom_opsets=None,
                )
        except Exception as exc:  # torch raises many types; report them as one export failure
            raise ExportError(f"torch.onnx.export failed for variant {variant!r}: {exc}") from exc
        graph = onnx.load(str(tmp))
        if variant == "ascend":  # the custom op hides its output shapes from ONNX: state them
            batch_dim: int | str = "batch" if dynamic_batch else batch
            _set_dims(graph.graph.output[0], [batch_dim, MAX_PER_IMG, 5])
            _set_dims(graph.graph.output[1], [batch_dim, MAX_PER_IMG])
            onnx.save(graph, str(tmp))
        check_graph(graph, variant)
        errors = parity(deploy, graph, feed)
        worst = max(errors["boxes"], errors["scores"]) if not errors["unexplained"] else float("inf")
        log.info("parity ONNX Runtime vs PyTorch: %s", ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))
        if worst > parity_threshold:
            raise ExportError(
                f"ONNX Runtime output differs from PyTorch by {worst:.3g} (> threshold {parity_threshold:g}) "
                f"for {output}: {errors}. The file was not written; check the opset or raise parity_threshold"
            )
        onnx_sha = sha256_file(tmp)

    if normalize_in_graph:
        input_shape: list[Any] = ["batch" if dynamic_batch else batch, height, width, 3]
    else:
        input_shape = ["batch" if dynamic_batch else batch, 3, height, width]
    result = ExportResult(
        onnx_path=str(output),
        onnx_sha256=onnx_sha,
        checkpoint_sha256=sha256_file(checkpoint),
        variant=variant,
        input_name=input_name,
        input_shape=input_shape,
        input_dtype="uint8" if normalize_in_graph else "float32",
        output_names=output_names,
        opset=opset,
        parity_max_abs_err=max(errors["boxes"], errors["scores"]),
        parity=errors,
        candidates_per_image=candidates_per_image(height, width),
        export_seconds=round(time.perf_counter() - started, 3),
    )
    write_json(output.with_suffix(".export.json"), result.to_dict())
    return result
