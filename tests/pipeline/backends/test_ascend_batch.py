"""Batch N with ais_bench (files mode): N one-image files per inference on a dynamic-batch OM.

The tiny graph copies its input into `dets`/`labels`, so every value that went through a batched
inference (and the padding of the last group) can be checked exactly against numpy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from emulators.checkpoints import confident_checkpoint
from emulators.models import tiny_dets_model, tiny_reference
from emulators.runs import SHARD, H, W, write_run
from emulators.toolkit import Toolkit

from gfocal_pipeline.backends.ais_bench import AisBenchBackend
from gfocal_pipeline.backends.atc import convert_onnx
from gfocal_pipeline.backends.msame import MsameBackend, om_batch
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.export import export_onnx
from gfocal_pipeline.layout import RunLayout, read_shard_outputs
from gfocal_pipeline.preprocess import preprocess

FIVE = [139, 285, 632, 724, 10139]


@pytest.fixture
def dynamic_om(kit: Toolkit, tmp_path: Path) -> Path:
    onnx_file = tiny_dets_model(tmp_path / "dyn.onnx", H, W, batch="N")
    result = convert_onnx(
        onnx_file,
        tmp_path / "cache",
        output_dir=tmp_path / "model",
        set_env=kit.set_env,
        dynamic_batch_sizes=(1, 2, 4),
    )
    assert "--dynamic_batch_size=1,2,4" in result["atc_args"]
    return Path(result["om_path"])


def without_metadata(om: Path, tmp_path: Path) -> Path:
    """The same OM file with no convert.json beside it (its batch is unknown to the backend)."""
    bare = tmp_path / "bare" / om.name
    bare.parent.mkdir()
    shutil.copy(om, bare)
    return bare


def test_om_batch_from_convert_json(dynamic_om: Path, tmp_path: Path) -> None:
    sha = AisBenchBackend(dynamic_om).model_sha256
    known = om_batch(dynamic_om, sha)
    assert known is not None and (known.static, known.dynamic) == (-1, (1, 2, 4))
    assert om_batch(dynamic_om, "0" * 64) is None  # convert.json of another OM
    assert om_batch(without_metadata(dynamic_om, tmp_path), sha) is None


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_ais_bench_batch_gives_batch_1_outputs(
    kit: Toolkit, dynamic_om: Path, tmp_path: Path, batch: int
) -> None:
    layout, manifest, inputs = write_run(tmp_path / "run", ids=FIVE)
    result = AisBenchBackend(dynamic_om, batch_size=batch, set_env=kit.set_env).infer_shard(
        layout, manifest, SHARD
    )
    assert result.images == 5
    argv = kit.calls("ais_bench")[0]["argv"]
    assert argv[argv.index("--dymBatch") + 1] == str(batch)
    _, arrays = read_shard_outputs(layout.output_shard("ais_bench", SHARD))
    assert arrays["image_ids"].tolist() == FIVE
    for row, image_id in enumerate(FIVE):  # exact: the same computation per image, padding dropped
        dets, labels = tiny_reference(inputs[image_id])
        np.testing.assert_array_equal(arrays["dets"][row], dets)
        np.testing.assert_array_equal(arrays["labels"][row], labels)
    timing = result.timing
    inferences = math.ceil(5 / batch)  # 5, 3, 2: the last batch is padded
    assert timing["batch_size"] == batch and timing["inferences"] == inferences
    assert timing["fps"] == pytest.approx(1000.0 * batch / timing["latency_ms"]["mean"])
    assert timing["tool_reported_fps"] == pytest.approx(timing["fps"])
    saved = json.loads(layout.timing_file("ais_bench", SHARD).read_text())
    assert saved["batch_size"] == batch and len(saved["latencies_ms"]) == inferences
    assert np.mean(saved["latencies_ms"]) == pytest.approx(timing["latency_ms"]["mean"])


def test_batch_not_in_the_om_sizes_is_refused_before_running(
    kit: Toolkit, dynamic_om: Path, tmp_path: Path
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run", ids=FIVE)
    with pytest.raises(
        BackendError,
        match=r"batch_size 3 is not one of the OM .*'s dynamic batch sizes \[1, 2, 4\]; use one of them or "
        r"re-convert with dynamic_batch_sizes including 3",
    ):
        AisBenchBackend(dynamic_om, batch_size=3, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert kit.calls("ais_bench") == []


def test_ais_bench_rejects_dym_batch_not_in_the_om(kit: Toolkit, dynamic_om: Path, tmp_path: Path) -> None:
    """Without convert.json the backend cannot know; ais_bench's own error is reported."""
    layout, manifest, _ = write_run(tmp_path / "run", ids=FIVE)
    bare = without_metadata(dynamic_om, tmp_path)
    with pytest.raises(BackendError) as caught:
        AisBenchBackend(bare, batch_size=3, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    message = str(caught.value)
    assert "ais_bench rejected the batch for OM" in message and "(batch_size 3, exit 1)" in message
    assert "[ERROR] the dymBatch parameter is not correct" in message
    assert "model has dynamic batch size:{[1][2][4]}, please set correct dynamic batch size" in message
    assert kit.calls("ais_bench")[0]["argv"][-2:] == ["--dymBatch", "3"]
    assert not (layout.output_shard("ais_bench", SHARD) / "done.json").exists()


def test_static_batch_1_om_with_batch_2(kit: Toolkit, tmp_path: Path) -> None:
    layout, manifest, _ = write_run(tmp_path / "run", ids=FIVE)
    static = Path(
        convert_onnx(
            tiny_dets_model(tmp_path / "s.onnx", H, W),
            tmp_path / "cache",
            output_dir=tmp_path / "model",
            set_env=kit.set_env,
        )["om_path"]
    )
    with pytest.raises(
        BackendError,
        match=r"batch_size 2 does not match the OM .*'s static batch 1 \(no "
        r"dynamic batch sizes\); re-convert with dynamic_batch_sizes including 2",
    ):
        AisBenchBackend(static, batch_size=2, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert kit.calls("ais_bench") == []
    with pytest.raises(
        BackendError,
        match=r"(?s)ais_bench rejected the batch .*the dynamic_batch_size "
        r"parameter is not specified for model conversion",
    ):
        AisBenchBackend(without_metadata(static, tmp_path), batch_size=2, set_env=kit.set_env).infer_shard(
            layout, manifest, SHARD
        )


def test_static_batch_2_om(kit: Toolkit, tmp_path: Path) -> None:
    """ais_bench groups files by the input size alone: a static batch-2 OM takes 2 files per run."""
    layout, manifest, inputs = write_run(tmp_path / "run", ids=FIVE)
    onnx_file = tiny_dets_model(tmp_path / "b2.onnx", H, W, batch=2)
    converted = convert_onnx(onnx_file, tmp_path / "cache", output_dir=tmp_path / "m", set_env=kit.set_env)
    om = Path(converted["om_path"])
    result = AisBenchBackend(om, batch_size=2, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert "--dymBatch" not in kit.calls("ais_bench")[0]["argv"]
    assert result.timing["inferences"] == 3
    _, arrays = read_shard_outputs(layout.output_shard("ais_bench", SHARD))
    for row, image_id in enumerate(FIVE):
        np.testing.assert_array_equal(arrays["dets"][row], tiny_reference(inputs[image_id])[0])
    # batch_size 1 on that OM (batch unknown without convert.json): ais_bench still runs 2 per
    # inference, so 1000 * 1 / mean would understate fps by half; the inference count catches it
    other, other_manifest, _ = write_run(tmp_path / "run2", ids=FIVE)
    with pytest.raises(
        BackendError,
        match=r"ais_bench ran 3 inferences for 5 inputs, expected 5 at "
        r"batch_size 1; the OM .* takes another batch than batch_size",
    ):
        AisBenchBackend(without_metadata(om, tmp_path), set_env=kit.set_env).infer_shard(
            other, other_manifest, SHARD
        )


def test_msame_batch_2_is_refused(dynamic_om: Path) -> None:
    with pytest.raises(
        BackendError,
        match=r"msame batch_size must be 1 \(got 2\): msame feeds each input file as one whole inference "
        r"and has no file batching, .* use tool 'ais_bench' for batch N",
    ):
        MsameBackend(dynamic_om, batch_size=2)


def test_msame_dynamic_om_at_batch_1(kit: Toolkit, dynamic_om: Path, tmp_path: Path) -> None:
    """A dynamic-batch OM needs --dymBatch even at batch 1; it is added from convert.json."""
    layout, manifest, inputs = write_run(tmp_path / "run", ids=FIVE)
    MsameBackend(dynamic_om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    argv = kit.calls("msame")[0]["argv"]
    assert argv[argv.index("--dymBatch") + 1] == "1"
    _, arrays = read_shard_outputs(layout.output_shard("msame", SHARD))
    np.testing.assert_array_equal(arrays["dets"][4], tiny_reference(inputs[FIVE[4]])[0])


def test_forced_dym_batch_against_the_om(kit: Toolkit, dynamic_om: Path, tmp_path: Path) -> None:
    layout, manifest, _ = write_run(tmp_path / "run", ids=FIVE)
    with pytest.raises(
        BackendError,
        match=r"has dynamic batch sizes \[1, 2, 4\], so ais_bench needs "
        r"--dymBatch; leave dym_batch unset",
    ):
        AisBenchBackend(dynamic_om, batch_size=2, dym_batch=False, set_env=kit.set_env).infer_shard(
            layout, manifest, SHARD
        )
    static = convert_onnx(tiny_dets_model(tmp_path / "s.onnx", H, W), tmp_path / "cache", set_env=kit.set_env)
    with pytest.raises(BackendError, match=r"dym_batch is set but the OM .* has static batch 1"):
        MsameBackend(static["om_path"], dym_batch=True, set_env=kit.set_env).infer_shard(
            layout, manifest, SHARD
        )
    assert kit.calls("ais_bench") == [] and kit.calls("msame") == []


@pytest.mark.parametrize("batch", [0, -2, True, 1.5])
def test_bad_batch_size(dynamic_om: Path, batch: object) -> None:
    with pytest.raises(BackendError, match="batch_size must be an integer >= 1"):
        AisBenchBackend(dynamic_om, batch_size=batch)  # type: ignore[arg-type]


@pytest.mark.slow
def test_ascend_graph_with_nms_batches_like_batch_1(tmp_path: Path, kit: Toolkit) -> None:
    """The exported Ascend graph (NMS in the OM) with a dynamic batch: batch 2 and 4 over a shard of
    5 images give the batch-1 detections."""
    checkpoint = confident_checkpoint(tmp_path / "confident.pth")
    onnx_file = export_onnx(checkpoint, tmp_path / "ascend.onnx", "ascend", 128, 160, dynamic_batch=True)
    converted = convert_onnx(
        onnx_file.onnx_path,
        tmp_path / "cache",
        output_dir=tmp_path / "model",
        set_env=kit.set_env,
        dynamic_batch_sizes=(1, 2, 4),
    )
    coco = make_demo_coco(tmp_path / "coco", num_images=5)
    found = {}
    for batch in (1, 2, 4):
        root = tmp_path / f"run_bs{batch}"
        manifest = preprocess(coco, root, height=128, width=160, shard_size=5, workers=1)
        (shard,) = manifest.shards
        layout = RunLayout.at(root)
        result = AisBenchBackend(converted["om_path"], batch_size=batch, set_env=kit.set_env).infer_shard(
            layout, manifest, shard
        )
        assert result.images == 5 and result.timing["inferences"] == math.ceil(5 / batch)
        found[batch] = read_shard_outputs(layout.output_shard("ais_bench", shard))[1]
    assert (found[1]["dets"][..., 4] > 0).sum() > 20  # real detections, not only empty rows
    for batch in (2, 4):
        np.testing.assert_array_equal(found[batch]["image_ids"], found[1]["image_ids"])
        np.testing.assert_array_equal(found[batch]["labels"], found[1]["labels"])
        np.testing.assert_allclose(found[batch]["dets"], found[1]["dets"], rtol=1e-5, atol=1e-3)
