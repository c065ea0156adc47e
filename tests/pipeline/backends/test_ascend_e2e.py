"""End to end at a tiny size: export (ascend graph) -> atc -> msame / ais_bench -> shared layout,
compared with the portable graph in ONNX Runtime + host NMS on the same preprocessed inputs.

Random weights give almost no score above 0.05, so the classifier of a copied state dict is made
confident for three classes (and its box regression less uniform); the network stays random.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from emulators.checkpoints import confident_checkpoint
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline.backends.ais_bench import AisBenchBackend
from gfocal_pipeline.backends.atc import convert_onnx
from gfocal_pipeline.backends.base import read_input
from gfocal_pipeline.backends.msame import MsameBackend
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.export import export_onnx
from gfocal_pipeline.layout import RunLayout, input_file_name, read_shard_outputs
from gfocal_pipeline.manifest import Manifest
from gfocal_pipeline.postprocess import Detections, from_dets, multiclass_nms
from gfocal_pipeline.preprocess import preprocess

pytestmark = pytest.mark.slow
H, W = 128, 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ascend_e2e")
    checkpoint = confident_checkpoint(root / "confident.pth")
    portable = export_onnx(checkpoint, root / "portable.onnx", "portable", H, W)
    ascend = export_onnx(checkpoint, root / "ascend.onnx", "ascend", H, W)
    coco = make_demo_coco(root / "coco", num_images=3)
    runs = {}
    for dtype in ("float32", "uint8"):
        manifest = preprocess(
            coco, root / f"run_{dtype}", dtype=dtype, height=H, width=W, shard_size=2, workers=1
        )
        runs[dtype] = (RunLayout.at(root / f"run_{dtype}"), manifest)
    kit = make_toolkit(root / "cann")
    return {
        "root": root,
        "portable": portable.onnx_path,
        "ascend": ascend.onnx_path,
        "runs": runs,
        "kit": kit,
    }


def host_detections(session: ort.InferenceSession, x: np.ndarray, fp16: bool) -> Detections:
    boxes, scores = session.run(None, {"input.1": x[None]})
    if fp16:  # the seed casts NMS inputs to fp16
        boxes, scores = (a.astype(np.float16).astype(np.float32) for a in (boxes, scores))
    return multiclass_nms(boxes[0], scores[0])


def matched(a: Detections, b: Detections, iou_min: float, score_tol: float) -> tuple[float, float]:
    """Fractions of a's and b's detections that have a same-class partner in the other set."""
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b)), float(len(a) == len(b))
    lt = np.maximum(a.boxes[:, None, :2], b.boxes[None, :, :2])
    rb = np.minimum(a.boxes[:, None, 2:], b.boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a.boxes[:, 2:] - a.boxes[:, :2], axis=-1)
    area_b = np.prod(b.boxes[:, 2:] - b.boxes[:, :2], axis=-1)
    iou = inter / (area_a[:, None] + area_b[None] - inter)
    ok = (
        (iou >= iou_min)
        & (a.labels[:, None] == b.labels[None])
        & (np.abs(a.scores[:, None] - b.scores[None]) <= score_tol)
    )
    return float(ok.any(axis=1).mean()), float(ok.any(axis=0).mean())


def run_all_shards(backend: MsameBackend, layout: RunLayout, manifest: Manifest) -> dict[int, Detections]:
    found = {}
    for shard in manifest.shards:
        result = backend.infer_shard(layout, manifest, shard)
        assert result.images == len(manifest.shards[shard])
        _, arrays = read_shard_outputs(layout.output_shard(backend.name, shard))
        for row, image_id in enumerate(arrays["image_ids"].tolist()):
            found[image_id] = from_dets(arrays["dets"][row], arrays["labels"][row])
    return found


def test_msame_matches_portable_graph_with_host_nms(setup: dict) -> None:
    kit: Toolkit = setup["kit"]
    layout, manifest = setup["runs"]["float32"]
    converted = convert_onnx(
        setup["ascend"], setup["root"] / "cache", output_dir=layout.model_dir, set_env=kit.set_env
    )
    device = run_all_shards(
        MsameBackend(converted["om_path"], outfmt="TXT", set_env=kit.set_env), layout, manifest
    )
    assert sorted(device) == sorted(e.image_id for e in manifest.images)
    session = ort.InferenceSession(setup["portable"], providers=["CPUExecutionProvider"])
    total = 0
    for image_id, dets in device.items():
        x = read_input(
            layout.input_shard(manifest.by_id()[image_id].shard) / input_file_name(image_id), manifest
        )
        same_casts = host_detections(session, x, fp16=True)
        assert len(dets) == len(same_casts) > 0
        assert len(set(dets.labels.tolist())) >= 2
        # with the seed's fp16 casts on both sides the detections agree one to one
        assert matched(dets, same_casts, iou_min=0.99, score_tol=1e-3) == (1.0, 1.0)
        # against a float32 host NMS, fp16 boxes may flip a few borderline suppressions
        plain = host_detections(session, x, fp16=False)
        assert min(matched(dets, plain, iou_min=0.9, score_tol=2e-3)) >= 0.8
        total += len(dets)
    assert total > 50


def test_ais_bench_gives_the_same_outputs_as_msame(setup: dict) -> None:
    kit: Toolkit = setup["kit"]
    layout, manifest = setup["runs"]["float32"]
    converted = convert_onnx(setup["ascend"], setup["root"] / "cache", set_env=kit.set_env)
    shard = next(iter(manifest.shards))
    shutil.rmtree(layout.outputs_dir("msame"), ignore_errors=True)  # written as TXT by another test
    MsameBackend(converted["om_path"], set_env=kit.set_env).infer_shard(layout, manifest, shard)
    AisBenchBackend(converted["om_path"], set_env=kit.set_env).infer_shard(layout, manifest, shard)
    _, by_msame = read_shard_outputs(layout.output_shard("msame", shard))
    _, by_ais = read_shard_outputs(layout.output_shard("ais_bench", shard))
    for name in ("image_ids", "dets", "labels"):
        np.testing.assert_array_equal(by_msame[name], by_ais[name])


def test_uint8_inputs_with_aipp_match_float32_inputs(setup: dict) -> None:
    kit: Toolkit = setup["kit"]
    f32_layout, f32_manifest = setup["runs"]["float32"]
    u8_layout, u8_manifest = setup["runs"]["uint8"]
    plain = convert_onnx(setup["ascend"], setup["root"] / "cache", set_env=kit.set_env)
    aipp = convert_onnx(setup["ascend"], setup["root"] / "cache", set_env=kit.set_env, input_dtype="uint8")
    assert aipp["cache_key"] != plain["cache_key"]
    float_dets = run_all_shards(MsameBackend(plain["om_path"], set_env=kit.set_env), f32_layout, f32_manifest)
    byte_dets = run_all_shards(MsameBackend(aipp["om_path"], set_env=kit.set_env), u8_layout, u8_manifest)
    assert sorted(float_dets) == sorted(byte_dets)
    for image_id, dets in byte_dets.items():
        assert len(dets) > 0
        # padding (mean colour rounded to uint8) and fp16 AIPP parameters shift scores slightly
        assert min(matched(dets, float_dets[image_id], iou_min=0.9, score_tol=5e-3)) >= 0.8
