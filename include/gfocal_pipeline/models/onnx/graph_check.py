"""A bring-your-own graph against its declaration and the run: refused before any inference, naming
the tensors, their shapes, the declaration and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.models.onnx.declaration import GraphDeclaration

Dims = list[int | str | None]
CONVENTIONS = {"dets": ("dets", "labels"), "candidates": ("boxes", "scores")}
ELEM_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8"}


@dataclass(frozen=True)
class GraphFacts:
    """What the graph is: its input (name, dims, dtype), its outputs by name, its opset."""

    input_name: str
    input_dims: Dims
    input_dtype: str
    outputs: dict[str, Dims]
    opset: int


def _dims(value: onnx.ValueInfoProto) -> Dims:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def graph_facts(graph: onnx.ModelProto, source: str) -> GraphFacts:
    """The facts of `graph` (shapes inferred where the file does not state them)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(graph)
    except Exception:  # custom ops (e.g. Ascend's NMS) stop the inference: use the stated shapes
        inferred = graph
    initializers = {init.name for init in inferred.graph.initializer}
    inputs = [value for value in inferred.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        names = [value.name for value in inputs]
        raise ExportError(f"ONNX graph {source} has {len(inputs)} inputs {names}; the pipeline feeds one")
    (value,) = inputs
    elem = value.type.tensor_type.elem_type
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphFacts(
        input_name=value.name,
        input_dims=_dims(value),
        input_dtype=ELEM_TYPES.get(elem, onnx.TensorProto.DataType.Name(elem).lower()),
        outputs={out.name: _dims(out) for out in inferred.graph.output},
        opset=opset,
    )


def _check_input(facts: GraphFacts, declared: GraphDeclaration, where: str, size: tuple[int, int]) -> None:
    wanted = declared.input
    name, dims = facts.input_name, facts.input_dims
    if wanted.name is not None and wanted.name != name:
        raise ExportError(f"the graph's input is {name!r}, but {where} declares input.name {wanted.name!r}")
    channels = 1 if wanted.layout == "NCHW" else 3
    if len(dims) != 4 or dims[channels] != 3:
        other = "NHWC" if wanted.layout == "NCHW" else "NCHW"
        raise ExportError(
            f"input {name!r} has shape {dims}, but {where} declares layout {wanted.layout} (3 channels at "
            f"axis {channels}); if the graph is {other}, set input.layout: {other} (and dtype to match), "
            f"else give a graph whose input is (N, 3, H, W)"
        )
    if facts.input_dtype != wanted.dtype:
        raise ExportError(
            f"input {name!r} is {facts.input_dtype}, but {where} declares input.dtype {wanted.dtype}; fix it"
        )
    spatial = dims[2:] if wanted.layout == "NCHW" else dims[1:3]
    if all(isinstance(d, int) for d in spatial) and tuple(spatial) != size:
        raise ExportError(
            f"input {name!r} has shape {dims}: {spatial[0]}x{spatial[1]}, but the run asks for "
            f"{size[0]}x{size[1]}; set the run's height/width (and preprocessing.height/width in {where}) "
            "to the graph's"
        )


def _check_outputs(facts: GraphFacts, declared: GraphDeclaration, where: str) -> None:
    expected = CONVENTIONS[declared.outputs]
    found = sorted(facts.outputs)
    if found != sorted(expected):
        hint = next((kind for kind, names in CONVENTIONS.items() if sorted(names) == found), None)
        fix = f"set outputs: {hint}" if hint else f"rename the graph's outputs to {list(expected)}"
        raise ExportError(
            f"the graph's outputs are {found} {[facts.outputs[n] for n in found]}, but {where} declares "
            f"outputs: {declared.outputs} ({' + '.join(expected)}); {fix}"
        )
    width = {"dets": 5, "labels": None, "boxes": 4, "scores": declared.class_count}
    rank = {"dets": 3, "labels": 2, "boxes": 3, "scores": 3}
    for name in expected:
        dims = facts.outputs[name]
        last = dims[-1] if dims else None
        wrong_width = bool(width[name]) and isinstance(last, int) and last != width[name]
        if (dims and len(dims) != rank[name]) or wrong_width:
            what = "num_classes" if name == "scores" else "the convention"
            raise ExportError(
                f"output {name!r} has shape {dims}, but {where} declares outputs: {declared.outputs} with "
                f"num_classes {declared.class_count} (expected rank {rank[name]}"
                + (f", last axis {width[name]}" if width[name] else "")
                + f"); fix {what} in the declaration or the graph"
            )


def check_graph(
    graph: onnx.ModelProto, declared: GraphDeclaration, declaration: Path, source: str, size: tuple[int, int]
) -> GraphFacts:
    """`graph` (read from `source`) checked against its declaration and the run's input `size` (h, w)."""
    facts = graph_facts(graph, source)
    where = f"the declaration {str(declaration)!r}"
    try:
        _check_input(facts, declared, where, size)
        _check_outputs(facts, declared, where)
    except ExportError as exc:
        raise ExportError(f"ONNX graph {source} refused before any inference: {exc}") from None
    return facts
