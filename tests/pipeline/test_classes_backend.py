"""The in-process host NMS follows the model spec recorded beside the graph: a 3-class portable graph
run by ONNX Runtime, with class-aware and class-agnostic NMS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from emulators.runs import SHARD, H, W, write_run
from onnx import helper, numpy_helper

from gfocal_pipeline.backends.onnxruntime import OnnxRuntimeBackend
from gfocal_pipeline.layout import read_shard_outputs
from gfocal_pipeline.model_spec import ModelSpec, Postprocess

# every image's candidates: box 1 overlaps box 0 (IoU 81/119 = 0.68 > 0.6), box 2 does not (0.16)
BOXES = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 4, 4]], np.float32)
SCORES = np.array([[0.0, 0.9, 0.0], [0.0, 0.0, 0.8], [0.3, 0.0, 0.0]], np.float32)


def constant_candidates_graph(path: Path) -> Path:
    """x (N,3,H,W) float32 -> boxes (N,3,4) = BOXES and scores (N,3,3) = SCORES for every image."""
    inits = [
        numpy_helper.from_array(np.asarray([-1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.asarray(0.0, np.float32), "zero"),
        numpy_helper.from_array(BOXES[None], "boxes_const"),
        numpy_helper.from_array(SCORES[None], "scores_const"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["per_image"]),
        helper.make_node("Mul", ["per_image", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "boxes_const"], ["boxes"]),
        helper.make_node("Add", ["nothing", "scores_const"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_candidates",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, H, W])],
        [
            helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, ["N", 3, 4]),
            helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 3, 3]),
        ],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("class_aware", "expected"),
    [
        (False, [(0, 1, 0.9), (2, 0, 0.3)]),  # box 1 (another class) suppressed by box 0
        (True, [(0, 1, 0.9), (1, 2, 0.8), (2, 0, 0.3)]),
    ],
)
def test_onnxruntime_host_nms_follows_the_recorded_spec(
    tmp_path: Path, class_aware: bool, expected: list[tuple[int, int, float]]
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    model = constant_candidates_graph(tmp_path / "tri_portable.onnx")
    spec = ModelSpec(
        name="tri",
        display_name="Three classes",
        history_name="tri",
        om_name="tri",
        num_classes=3,
        classes=("a", "b", "c"),
        postprocess=Postprocess(class_aware=class_aware),
    )
    model.with_suffix(".export.json").write_text(json.dumps({"model": spec.to_dict()}))
    backend = OnnxRuntimeBackend(model, batch_size=2, intra_op_num_threads=1, cache_optimized_graph=False)
    assert (backend.num_classes, backend.class_aware) == (3, class_aware)
    backend.infer_shard(layout, manifest, SHARD)
    marker, arrays = read_shard_outputs(layout.output_shard("onnxruntime", SHARD))
    assert marker["postprocess"].get("class_aware", True) is class_aware
    for image in range(len(manifest.shards[SHARD])):
        labels, dets = arrays["labels"][image], arrays["dets"][image]
        kept = int((labels >= 0).sum())
        assert labels[:kept].tolist() == [label for _, label, _ in expected]
        np.testing.assert_array_equal(dets[:kept, :4], BOXES[[box for box, _, _ in expected]])
        assert dets[:kept, 4].tolist() == pytest.approx([score for _, _, score in expected])
        assert (labels[kept:] == -1).all()
