"""Tiny ONNX models with the Ascend graph's interface, for fast tests of the tool plumbing.

`tiny_dets_model`: input `input.1` (B,3,H,W) float32 -> `dets` (B,100,5) = the first 500 input
values, `labels` (B,100) int64 = floor(|next 100 values| * 10). Easy to predict with numpy, so
the tests can check every value that travels through atc -> msame/ais_bench -> shared layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_dets_model(
    path: Path, height: int = 16, width: int = 16, batch: int | str = 1, uint8_nhwc: bool = False
) -> Path:
    """With `uint8_nhwc` the input is (B,H,W,3) uint8 (like a graph exported with normalize_in_graph)."""
    assert 3 * height * width >= 600
    ints = {
        "flat_shape": [0, -1],
        "s0": [0],
        "e0": [500],
        "s1": [500],
        "e1": [600],
        "axis": [1],
        "dets_shape": [0, 100, 5],
    }
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    inits.append(numpy_helper.from_array(np.asarray(10.0, np.float32), "ten"))
    source = "as_float" if uint8_nhwc else "input.1"
    nodes = [helper.make_node("Cast", ["input.1"], ["as_float"], to=TensorProto.FLOAT)] if uint8_nhwc else []
    nodes += [
        helper.make_node("Reshape", [source, "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "s0", "e0", "axis"], ["first"]),
        helper.make_node("Reshape", ["first", "dets_shape"], ["dets"]),
        helper.make_node("Slice", ["flat", "s1", "e1", "axis"], ["second"]),
        helper.make_node("Abs", ["second"], ["abs"]),
        helper.make_node("Mul", ["abs", "ten"], ["scaled"]),
        helper.make_node("Floor", ["scaled"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["labels"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_dets",
        [
            helper.make_tensor_value_info("input.1", TensorProto.UINT8, [batch, height, width, 3])
            if uint8_nhwc
            else helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, height, width])
        ],
        [
            helper.make_tensor_value_info("dets", TensorProto.FLOAT, [batch, 100, 5]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [batch, 100]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy version of `tiny_dets_model` for one image -> dets (100,5), labels (100,)."""
    flat = np.asarray(x, np.float32).reshape(-1)
    return flat[:500].reshape(100, 5), np.floor(np.abs(flat[500:600]) * np.float32(10)).astype(np.int64)
