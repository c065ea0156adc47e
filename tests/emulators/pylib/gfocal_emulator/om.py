"""The emulated `.om` file: a zip holding the ONNX graph split at `BatchMultiClassNMS` + metadata.

A real OM is a compiled NPU program; ours keeps what is needed to compute the same function on a CPU:
    om.json    soc_version, input (name, shape, format, dtype), AIPP config, precision mode, dynamic
               batch sizes, NMS attributes, the output names and how the pieces connect
    pre.onnx   graph input -> the NMS inputs (and any tensor the tail still needs)
    post.onnx  the NMS outputs (+ those tensors) -> the graph outputs        (only with NMS)
    model.onnx the whole graph                                               (only without NMS)
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import onnx
from onnx import TensorProto, helper

NMS_OP = "BatchMultiClassNMS"
MAGIC = "gfocal-emulated-om"
# dtypes the emulated NMS produces: boxes, scores, classes in fp16, num in int32
NMS_OUTPUT_TYPES = (TensorProto.FLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT16, TensorProto.INT32)


class OmError(Exception):
    pass


def nms_attributes(node: onnx.NodeProto) -> dict[str, float | int]:
    """Attributes with torch's `_f`/`_i` suffixes removed (the file may carry either form)."""
    attrs = {}
    for attr in node.attribute:
        name = attr.name.removesuffix("_f").removesuffix("_i")
        attrs[name] = helper.get_attribute_value(attr)
    required = ("score_threshold", "iou_threshold", "max_size_per_class", "max_total_size")
    missing = [name for name in required if name not in attrs]
    if missing:
        raise OmError(f"{NMS_OP} node {node.name!r} lacks attributes {missing}")
    return attrs


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    infos = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.type.tensor_type.elem_type:
            infos[value.name] = value
    return infos


def _typed(
    name: str, infos: dict[str, onnx.ValueInfoProto], fallback: int | None = None
) -> onnx.ValueInfoProto:
    if name in infos:
        info = onnx.ValueInfoProto()
        info.CopyFrom(infos[name])
        return info
    if fallback is None:
        raise OmError(f"cannot determine the type of tensor {name!r}")
    return helper.make_tensor_value_info(name, fallback, None)


def _submodel(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    name: str,
) -> onnx.ModelProto:
    used = {i for node in nodes for i in node.input}
    initializers = [init for init in model.graph.initializer if init.name in used]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def split_at_nms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto | None, dict[str, Any]]:
    """(pre, post, links) for a graph with one NMS node; (model, None, {}) for a graph without."""
    nodes = list(model.graph.node)
    nms_nodes = [n for n in nodes if n.op_type == NMS_OP]
    if not nms_nodes:
        return model, None, {}
    if len(nms_nodes) > 1:
        raise OmError(f"the graph has {len(nms_nodes)} {NMS_OP} nodes; the emulator supports one")
    nms = nms_nodes[0]
    if len(nms.input) != 2 or len(nms.output) != 4:
        raise OmError(f"{NMS_OP} needs 2 inputs and 4 outputs, node has {len(nms.input)}/{len(nms.output)}")
    tainted = set(nms.output)
    post_nodes, pre_nodes = [], []
    for node in nodes:
        if node is nms:
            continue
        if any(i in tainted for i in node.input):
            post_nodes.append(node)
            tainted.update(node.output)
        else:
            pre_nodes.append(node)
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    post_made = {o for node in post_nodes for o in node.output}
    bridges = sorted(
        {
            i
            for node in post_nodes
            for i in node.input
            if i and i not in tainted and i not in initializers and i not in post_made
        }
    )
    infos = _value_types(model)
    out_names = [v.name for v in model.graph.output]
    pre_out_names = list(nms.input) + bridges + [n for n in out_names if n not in tainted]
    pre = _submodel(
        model,
        pre_nodes,
        list(graph_inputs),
        [_typed(n, infos) for n in dict.fromkeys(pre_out_names)],
        "pre_nms",
    )
    nms_used = [o for o in nms.output if any(o in node.input for node in post_nodes)]
    post_inputs = [
        helper.make_tensor_value_info(o, NMS_OUTPUT_TYPES[list(nms.output).index(o)], None) for o in nms_used
    ] + [_typed(n, infos) for n in bridges]
    post_outputs = [v for v in model.graph.output if v.name in tainted]
    post = _submodel(model, post_nodes, post_inputs, list(post_outputs), "post_nms")
    links = {
        "nms_inputs": list(nms.input),
        "nms_outputs": list(nms.output),
        "bridges": bridges,
        "post_inputs": [v.name for v in post_inputs],
        "attributes": nms_attributes(nms),
    }
    return pre, post, links


def write_om(path: str, meta: dict[str, Any], parts: dict[str, onnx.ModelProto]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("om.json", json.dumps({"format": MAGIC, **meta}, indent=2))
        for name, part in parts.items():
            archive.writestr(name, part.SerializeToString())


def read_om(path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read("om.json"))
            parts = {name: archive.read(name) for name in archive.namelist() if name.endswith(".onnx")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise OmError(f"{path} is not an OM written by the emulated atc ({exc})") from exc
    if meta.get("format") != MAGIC:
        raise OmError(f"{path} is not an OM written by the emulated atc")
    return meta, parts


def load_part(data: bytes) -> onnx.ModelProto:
    return onnx.load(io.BytesIO(data))
