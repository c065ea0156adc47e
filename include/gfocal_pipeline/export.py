"""ONNX export of any model adapter, two variants from one code path, with an ONNX Runtime parity check.

- `portable`: standard ops only; outputs `boxes` (N,K,4) in input pixels and `scores` (N,K,C), the
  pre-NMS candidates; NMS runs on the host.
- `ascend`: NMS inside the graph as Ascend's `BatchMultiClassNMS` (outputs `dets` (N,max_per_img,5),
  `labels` (N,max_per_img)), the form `atc` converts. ONNX Runtime cannot run that op, so the parity
  check runs the graph cut just before the NMS (its float32 inputs) and compares that with PyTorch.

`export_onnx` picks the adapter by name (`gfocal_pipeline.adapters`); the adapter builds its export
module and parity check, and `export_graph` here traces, checks and records it. The file is written
to a temporary name, checked, and renamed only when everything passed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from gfocal_pipeline.adapters import DEFAULT_MODEL, load_adapter
from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_INPUT_NAME,
    DEFAULT_MAX_UNEXPLAINED,
    DEFAULT_PARITY_THRESHOLD,
    DEFAULT_WIDTH,
    SIZE_DIVISOR,
)
from gfocal_pipeline.errors import ExportError, os_error_fix
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir, sha256_file, write_json
from gfocal_pipeline.nets.ascend_nms import NMS_OP, VARIANTS
from gfocal_pipeline.parity import ParityReport
from gfocal_pipeline.pixels import DEFAULT_PIXELS, PixelFormat, pixels_of

log = logging.getLogger(__name__)

DEFAULT_OPSET = {"portable": 17, "ascend": 11}
ALL_ANCHORS = 1 << 30  # decode every anchor of a level (no top-k)


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
    parity_levels: list[dict[str, Any]] = field(default_factory=list)
    max_unexplained: int = DEFAULT_MAX_UNEXPLAINED
    unexplained_allowed: bool = False  # True when max_unexplained let unexplained candidates through
    candidates_per_image: int = 0
    export_seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)  # the adapter's ModelSpec
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
            "unexplained_allowed",
            "export_seconds",
            "torch_version",
        )
        small = {k: getattr(self, k) for k in keys}
        small["model"] = self.model.get("name", "")
        small["parity_ties"] = self.parity.get("boundary_ties", 0)
        small["parity_unexplained"] = self.parity.get("unexplained", 0)
        return small

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_shape(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_DIVISOR:
            raise ExportError(
                f"input {name} {value!r} must be a positive multiple of {SIZE_DIVISOR} "
                f"(the network downsamples by {SIZE_DIVISOR}); e.g. {DEFAULT_HEIGHT}x{DEFAULT_WIDTH}"
            )


# (width, height) of the generated pictures parity runs on: a landscape and a portrait one, so both
# leave constant letterbox padding (right of the picture) - where exact top-k ties come from
PARITY_PICTURES = ((640, 480), (360, 640))


def sample_inputs(
    height: int, width: int, uint8: bool, pixels: PixelFormat = DEFAULT_PIXELS
) -> list[np.ndarray]:
    """Real preprocessed images (generated demo pictures, letterboxed in the model's pixel format),
    each of shape (1, ...)."""
    from gfocal_pipeline.demo_data import demo_image
    from gfocal_pipeline.preprocess import preprocess_image

    dtype = "uint8" if uint8 else "float32"
    arrays = []
    for seed, (w, h) in enumerate(PARITY_PICTURES):
        picture = demo_image(seed, width=w, height=h)
        array, _ = preprocess_image(picture, "letterbox", dtype, height, width, pixels)
        arrays.append(array[None])
    return arrays


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


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _keep_rejected(tmp: Path, output: Path) -> Path:
    """Keep a graph that failed its checks beside the target, as `<name>.rejected.onnx`."""
    rejected = rejected_path(output)
    with atomic_path(rejected) as keep:
        os.replace(tmp, keep)
    return rejected


def rejected_path(output: str | os.PathLike[str]) -> Path:
    return Path(output).with_suffix(".rejected.onnx")


GRAPH_FIX = (
    "A correct graph has 0 unexplained candidates (ties at the top-k boundary are allowed): "
    "check the opset and the model code, or raise parity_threshold / max_unexplained "
    "knowingly (both are recorded in the export result)"
)
NONFINITE_FIX = (
    "No threshold lets NaN/Inf through. Non-finite PyTorch outputs mean the checkpoint's weights "
    "overflow on real images (the file is damaged or its training diverged: re-export it from a good "
    "training checkpoint, or re-train); non-finite ONNX Runtime outputs alone mean the graph is wrong "
    "(check the opset and the model code)"
)


def _verdict(report: ParityReport, parity_threshold: float, max_unexplained: int) -> tuple[str, str]:
    """Why the parity report refuses the graph and the fix, or ("", "") when it passes.

    Non-finite values are refused before any comparison: NaN compares false with every bound.
    """
    if not report.finite:
        return f"{sum(report.nonfinite.values())} output value(s) are NaN or Inf", NONFINITE_FIX
    if report.count_mismatch:
        return "the graph's output is malformed", GRAPH_FIX
    if not report.numeric_error <= parity_threshold:  # `not <=`: a NaN error is refused too
        return (
            f"matched candidates differ from PyTorch by {report.numeric_error:.3g} "
            f"(> parity_threshold {parity_threshold:g})",
            GRAPH_FIX,
        )
    if report.unexplained > max_unexplained:
        return (
            f"{report.unexplained} candidate(s) differ from PyTorch's and are no top-k tie "
            f"(> max_unexplained {max_unexplained})",
            GRAPH_FIX,
        )
    return "", ""


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def check_export_arguments(
    variant: str,
    height: int,
    width: int,
    batch: int,
    opset: int | None,
    input_name: str,
    parity_threshold: float,
    max_unexplained: int,
) -> int:
    """Refuse bad export arguments before any work; returns the opset to use."""
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    validate_shape(height, width)
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch {batch!r} must be an integer >= 1")
    if not input_name or not isinstance(input_name, str):
        raise ExportError(f"input name {input_name!r} must be a non-empty string")
    if not _positive_number(parity_threshold):  # inf would let every numeric error through
        raise ExportError(f"parity_threshold {parity_threshold!r} must be a finite number > 0, e.g. 1e-3")
    if isinstance(max_unexplained, bool) or not isinstance(max_unexplained, int) or max_unexplained < 0:
        raise ExportError(f"max_unexplained {max_unexplained!r} must be an integer >= 0 (default 0)")
    opset = DEFAULT_OPSET[variant] if opset is None else int(opset)
    if not 11 <= opset <= 20:
        raise ExportError(f"opset {opset} is outside the supported range 11..20")
    return opset


def _os_error_in(exc: BaseException) -> OSError | None:
    """The `OSError` (with an errno) that `exc` is or was raised from, if any."""
    seen: BaseException | None = exc
    for _ in range(5):
        if isinstance(seen, OSError) and seen.errno:
            return seen
        if seen is None:
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def _trace(
    deploy: nn.Module, feed: np.ndarray, path: Path, input_name: str, opset: int, batch_dim: int | str
) -> onnx.ModelProto:
    """`torch.onnx.export` of `deploy` to `path`; `batch_dim` "batch" makes the batch axis dynamic."""
    output_names = list(deploy.output_names)
    dynamic = isinstance(batch_dim, str)
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                deploy,
                (torch.from_numpy(feed),),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=output_names,
                dynamic_axes={n: {0: batch_dim} for n in [input_name, *output_names]} if dynamic else None,
                do_constant_folding=True,
                custom_opsets=None,
            )
    except Exception as exc:  # torch raises many types; report them as one export failure
        written = _os_error_in(exc)
        if written is not None:  # disk full, file size limit, ...: name the folder and the fix
            error = OSError(written.errno, written.strerror, str(path.parent))
            raise ExportError(
                f"cannot write the ONNX into {str(path.parent)!r}: {written.strerror or written}; "
                f"{os_error_fix(error)}"
            ) from exc
        raise ExportError(f"torch.onnx.export failed for variant {deploy.variant!r}: {exc}") from exc
    graph = onnx.load(str(path))
    if deploy.variant == "ascend":  # the custom op hides its output shapes from ONNX: state them
        _set_dims(graph.graph.output[0], [batch_dim, deploy.max_per_img, 5])
        _set_dims(graph.graph.output[1], [batch_dim, deploy.max_per_img])
        onnx.save(graph, str(path))
    return graph


@dataclass(frozen=True)
class ParityCheck:
    """How an export is verified: `compare(graph, *feeds)` -> `ParityReport`, and its bounds."""

    compare: Callable[..., ParityReport]
    threshold: float = DEFAULT_PARITY_THRESHOLD
    max_unexplained: int = DEFAULT_MAX_UNEXPLAINED
    model_name: str = "model"  # named in a refusal, e.g. "GFocalV2 R50-FPN 1x"


def _verify(
    module: nn.Module,
    graph: onnx.ModelProto,
    feeds: list[np.ndarray],
    tmp: Path,
    output: Path,
    check: ParityCheck,
) -> ParityReport:
    """The checker and the parity check; a refused graph is moved from `tmp` to `*.rejected.onnx`."""
    try:
        check_graph(graph, module.variant)
    except ExportError as exc:
        rejected = _keep_rejected(tmp, output)
        raise ExportError(f"{exc}\nThe graph was kept at {rejected} for inspection") from exc
    report = check.compare(graph, *feeds)
    log.info("parity ONNX Runtime vs PyTorch per level:\n%s", report.describe())
    refusal, fix = _verdict(report, check.threshold, check.max_unexplained)
    if refusal:
        rejected = _keep_rejected(tmp, output)
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree on the {check.model_name} {module.variant} graph: "
            f"{refusal}.\n{report.describe()}\n"
            f"The target {output} was not written; the refused graph is kept at {rejected} for inspection. "
            f"{fix}"
        )
    if report.unexplained:
        log.warning(
            "parity: %d unexplained candidate(s) let through by max_unexplained=%d",
            report.unexplained,
            check.max_unexplained,
        )
    return report


def export_target(output: str | os.PathLike[str]) -> Path:
    """The .onnx path to write; a directory or an unwritable folder is refused before any work."""
    path = Path(output)
    if path.is_dir():
        raise ExportError(f"output {str(path)!r} is a directory; give the path of the .onnx file to write")
    ensure_writable_dir(path.parent, "output directory")
    return path


@dataclass(frozen=True)
class GraphFacts:
    """What an export records beside the graph: where it came from and what it is."""

    checkpoint_sha256: str
    candidates_per_image: int
    model: dict[str, Any]  # the adapter's ModelSpec as data
    started: float  # time.perf_counter() when the export began (model loading included)


def export_graph(
    module: nn.Module,
    output: Path,
    check: ParityCheck,
    facts: GraphFacts,
    *,
    opset: int,
    batch: int = 1,
    dynamic_batch: bool = False,
    input_name: str = DEFAULT_INPUT_NAME,
) -> ExportResult:
    """Trace `module` (an adapter's export module: `variant`, `output_names`, `height`, `width`,
    `normalize_in_graph`, `max_per_img`) to `output`, check and parity-check it, write
    `<name>.export.json`. Arguments are checked first by `check_export_arguments`."""
    height, width, uint8 = module.height, module.width, module.normalize_in_graph
    pixels = pixels_of(facts.model)
    feeds = [np.repeat(x, batch, axis=0) for x in sample_inputs(height, width, uint8, pixels)]
    batch_dim: int | str = "batch" if dynamic_batch else batch
    log.info(
        "exporting %s %s graph %dx%d batch %s opset %d -> %s",
        facts.model.get("name", "?"),
        module.variant,
        height,
        width,
        batch_dim,
        opset,
        output,
    )
    with atomic_path(output) as tmp:
        graph = _trace(module, feeds[0], tmp, input_name, opset, batch_dim)
        report = _verify(module, graph, feeds, tmp, output, check)
        onnx_sha = sha256_file(tmp)
    layout = [height, width, 3] if uint8 else [3, height, width]
    result = ExportResult(
        onnx_path=str(output),
        onnx_sha256=onnx_sha,
        checkpoint_sha256=facts.checkpoint_sha256,
        variant=module.variant,
        input_name=input_name,
        input_shape=[batch_dim, *layout],
        input_dtype="uint8" if uint8 else "float32",
        output_names=list(module.output_names),
        opset=opset,
        parity_max_abs_err=report.numeric_error,
        parity=report.summary(),
        parity_levels=report.per_level(),
        max_unexplained=check.max_unexplained,
        unexplained_allowed=report.unexplained > 0,
        candidates_per_image=facts.candidates_per_image,
        export_seconds=round(time.perf_counter() - facts.started, 3),
        model=facts.model,
    )
    with contextlib.suppress(FileNotFoundError):  # a graph refused earlier is superseded by this one
        rejected_path(output).unlink()
    write_json(output.with_suffix(".export.json"), result.to_dict())
    return result


@dataclass(frozen=True)
class ExportOptions:
    """The arguments of one export (see `export_onnx`); `check_export_arguments` bounds them."""

    variant: str = "portable"
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    batch: int = 1
    dynamic_batch: bool = False
    opset: int | None = None
    input_name: str = DEFAULT_INPUT_NAME
    normalize_in_graph: bool = False
    parity_threshold: float = DEFAULT_PARITY_THRESHOLD
    max_unexplained: int = DEFAULT_MAX_UNEXPLAINED


@dataclass(frozen=True)
class ExportPlan:
    """What a model adapter brings to an export: its module, parity comparison and facts."""

    build: Callable[[ExportOptions], nn.Module]  # the export module (loads the checkpoint)
    compare: Callable[..., ParityReport]  # (module, graph, *feeds) -> report
    candidates: Callable[[nn.Module], int]  # candidates per image of the portable outputs
    spec: dict[str, Any]  # the adapter's ModelSpec as data
    checkpoint_sha256: Callable[[], str]  # read after the checkpoint loaded (a bad file is named first)


def export_model(plan: ExportPlan, output: str | os.PathLike[str], options: ExportOptions) -> ExportResult:
    """Check the arguments and the target, build the adapter's module, then `export_graph` it."""
    started = time.perf_counter()
    opset = check_export_arguments(
        options.variant,
        options.height,
        options.width,
        options.batch,
        options.opset,
        options.input_name,
        options.parity_threshold,
        options.max_unexplained,
    )
    target = export_target(output)
    module = plan.build(options).eval()
    name = plan.spec.get("display_name", "model")
    check = ParityCheck(
        partial(plan.compare, module), options.parity_threshold, options.max_unexplained, name
    )
    facts = GraphFacts(plan.checkpoint_sha256(), plan.candidates(module), plan.spec, started)
    return export_graph(
        module,
        target,
        check,
        facts,
        opset=opset,
        batch=options.batch,
        dynamic_batch=options.dynamic_batch,
        input_name=options.input_name,
    )


def export_onnx(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    variant: str = "portable",
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    *,
    model: str = DEFAULT_MODEL,
    **options: Any,
) -> ExportResult:
    """Export `checkpoint` of adapter `model` to `output` (.onnx) and verify it; see the module
    docstring. `options`: batch, dynamic_batch, opset, input_name, normalize_in_graph,
    parity_threshold (bound on the numeric error of matched candidates, px / score), max_unexplained
    (default 0: candidates that are no top-k tie but may still differ - only for diagnosing a graph,
    recorded in the result when used). A refused graph is kept as `<name>.rejected.onnx`."""
    return load_adapter(model).export(
        checkpoint, output, variant=variant, height=height, width=width, **options
    )
