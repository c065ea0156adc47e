"""ONNX export: both variants, checker, ONNX Runtime parity, dynamic batch, in-graph normalization, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gfocal_pipeline.errors import CheckpointError, ExportError, GfocalError
from gfocal_pipeline.export import export_onnx
from gfocal_pipeline.models.gfocalv2 import DeployModel
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, random_state_dict
from gfocal_pipeline.models.gfocalv2.decode import candidates_per_image

H, W = 256, 320  # small but with a level above nms_pre (32x40 = 1280 anchors)


@pytest.fixture(scope="module")
def exports(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("export")
    return {
        "portable": export_onnx(random_checkpoint, out / "p.onnx", "portable", H, W),
        "dynamic": export_onnx(
            random_checkpoint, out / "d.onnx", "portable", H, W, dynamic_batch=True, normalize_in_graph=True
        ),
        "ascend": export_onnx(random_checkpoint, out / "a.onnx", "ascend", H, W),
    }


def test_candidate_count_for_default_shape() -> None:
    # 100x152, 50x76, 25x38, 13x19, 7x10 -> 1000 + 1000 + 950 + 247 + 70
    assert candidates_per_image(800, 1216) == 3267


def test_portable_graph_is_standard_and_matches_pytorch(exports: dict, random_checkpoint: Path) -> None:
    result = exports["portable"]
    model = onnx.load(result.onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert result.opset == 17 and model.opset_import[0].version == 17
    assert result.input_name == "input.1" and result.input_shape == [1, 3, H, W]
    assert result.output_names == ["boxes", "scores"]
    assert result.parity_max_abs_err <= 1e-3
    assert result.parity["unexplained"] == 0 and not result.unexplained_allowed
    # independent parity on another input than the exporter's own
    x = np.random.default_rng(5).standard_normal((1, 3, H, W)).astype(np.float32)
    boxes, scores = ort.InferenceSession(result.onnx_path).run(None, {"input.1": x})
    with torch.inference_mode():
        tb, ts = DeployModel(load_model(random_checkpoint), "portable", H, W)(torch.from_numpy(x))
    k = candidates_per_image(H, W)
    assert boxes.shape == (1, k, 4) and scores.shape == (1, k, 80)
    assert np.abs(boxes - tb.numpy()).max() < 1e-3 and np.abs(scores - ts.numpy()).max() < 1e-5
    assert boxes[..., [0, 2]].max() <= W and boxes[..., [1, 3]].max() <= H and boxes.min() >= 0


def test_dynamic_batch_uint8_graph(exports: dict) -> None:
    result = exports["dynamic"]
    assert result.input_shape == ["batch", H, W, 3]
    session = ort.InferenceSession(result.onnx_path)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    x = np.random.default_rng(1).integers(0, 255, (3, H, W, 3), dtype=np.uint8)
    batched = session.run(None, {"input.1": x})
    single = session.run(None, {"input.1": x[1:2]})
    assert batched[0].shape[0] == 3
    assert np.abs(batched[1][1:2] - single[1]).max() < 1e-6


def test_ascend_graph_has_one_nms_node_with_seed_attributes(exports: dict) -> None:
    result = exports["ascend"]
    model = onnx.load(result.onnx_path)
    nms = [n for n in model.graph.node if n.op_type == "BatchMultiClassNMS"]
    assert len(nms) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attrs["max_size_per_class"] == 100 and attrs["max_total_size"] == 100
    assert attrs["score_threshold"] == pytest.approx(0.05) and attrs["iou_threshold"] == pytest.approx(0.6)
    assert len(nms[0].output) == 4
    assert result.opset == 11 and result.output_names == ["dets", "labels"]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    assert dims == [[1, 100, 5], [1, 100]]
    # NMS inputs are fp16 as in the seed
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in nms[0].input:
        cast = producers[name]
        assert cast.op_type == "Cast"
        assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT16
    assert result.parity_max_abs_err <= 1e-3  # measured on the graph cut before the NMS


def test_sidecar_and_checkpoint_hash(exports: dict, random_checkpoint: Path) -> None:
    import hashlib
    import json

    result = exports["portable"]
    sidecar = json.loads(Path(result.onnx_path).with_suffix(".export.json").read_text())
    assert sidecar["onnx_sha256"] == hashlib.sha256(Path(result.onnx_path).read_bytes()).hexdigest()
    assert result.checkpoint_sha256 == hashlib.sha256(random_checkpoint.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"height": 250}, ExportError, r"height 250 .* multiple of 32"),
        ({"width": 0}, ExportError, r"width 0"),
        ({"variant": "tensorrt"}, ExportError, r"unknown variant 'tensorrt'"),
        ({"batch": 0}, ExportError, r"batch 0"),
    ],
)
def test_bad_arguments(
    tmp_path: Path, random_checkpoint: Path, kwargs: dict, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        export_onnx(random_checkpoint, tmp_path / "x.onnx", **{"height": H, "width": W, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.pth"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "x.onnx", height=H, width=W)
    state = random_state_dict(0)
    del state["bbox_head.scales.4.scale"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"missing: bbox_head.scales.4.scale"):
        export_onnx(tmp_path / "short.pth", tmp_path / "x.onnx", height=H, width=W)
    assert not (tmp_path / "x.onnx").exists()


def test_output_dir_not_writable(tmp_path: Path, random_checkpoint: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(GfocalError, match=r"output directory .*file/sub.* not writable"):
        export_onnx(random_checkpoint, blocker / "sub" / "x.onnx", height=H, width=W)


def test_parity_over_threshold_writes_only_the_rejected_graph(
    tmp_path: Path, random_checkpoint: Path
) -> None:
    with pytest.raises(ExportError, match=r"differ from PyTorch by .*parity_threshold 1e-12"):
        export_onnx(random_checkpoint, tmp_path / "x.onnx", height=H, width=W, parity_threshold=1e-12)
    assert [p.name for p in tmp_path.iterdir()] == ["x.rejected.onnx"]
