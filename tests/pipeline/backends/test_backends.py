"""In-process backends (onnxruntime, torch) on a tiny run directory built by hand.

The model is GFocalV2 with random weights at 64x96 input (fast on 2 busy cores); the ONNX graphs are
exported here with torch.onnx.export, independent of the library's export step.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from gfocal_pipeline.backends.base import CANDIDATES_FILE
from gfocal_pipeline.backends.onnxruntime import OnnxRuntimeBackend, resolve_providers
from gfocal_pipeline.backends.registry import get_backend
from gfocal_pipeline.backends.torch_backend import HalfPrecisionNetwork, TorchBackend
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.layout import RunLayout, input_file_name, read_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest, load_manifest
from gfocal_pipeline.models.gfocalv2 import DeployModel, GFocalV2
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, write_random_checkpoint
from gfocal_pipeline.models.gfocalv2.decode import candidates_per_image

H, W = 64, 96
K = candidates_per_image(H, W)


# ---------------------------------------------------------------------------------------------- fixtures


def export(network: GFocalV2, path: Path, uint8: bool, dynamic: bool) -> Path:
    deploy = DeployModel(network, "portable", H, W, normalize_in_graph=uint8).eval()
    shape = (1, H, W, 3) if uint8 else (1, 3, H, W)
    sample = torch.randint(0, 256, shape, dtype=torch.uint8) if uint8 else torch.randn(shape)
    names = ["input.1", "boxes", "scores"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python ifs are expected
        torch.onnx.export(
            deploy,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names[:1],
            output_names=names[1:],
            dynamic_axes={n: {0: "batch"} for n in names} if dynamic else None,
        )
    return path


def with_static_batch(source: Path, target: Path, batch: int) -> Path:
    """The same graph with its batch axis declared static (what a fixed-batch export gives)."""
    model = onnx.load(str(source))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(target))
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    checkpoint = write_random_checkpoint(root / "random.pth", seed=3)
    network = load_model(checkpoint)
    dynamic = export(network, root / "dynamic.onnx", uint8=False, dynamic=True)
    return {
        "checkpoint": checkpoint,
        "dynamic": dynamic,
        "static2": with_static_batch(dynamic, root / "static2.onnx", 2),
        "uint8_static1": export(network, root / "uint8_static1.onnx", uint8=True, dynamic=False),
    }


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Torch's thread pool spins badly on 2 busy cores; restore the process setting afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_run(
    root: Path,
    shards: dict[str, list[int]],
    dtype: str = "float32",
    height: int = H,
    width: int = W,
    seed: int = 0,
    coco_root: str = "/data/coco",
) -> tuple[RunLayout, Manifest]:
    """Random preprocessed inputs for `shards` plus a manifest, in a run directory."""
    layout = RunLayout.at(root)
    rng = np.random.default_rng(seed)
    images = []
    for shard, ids in shards.items():
        layout.input_shard(shard).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            if dtype == "float32":
                array = rng.standard_normal((3, height, width)).astype(np.float32)
            else:
                array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            array.tofile(layout.input_shard(shard) / input_file_name(image_id))
            images.append(
                ImageEntry(
                    image_id,
                    f"{image_id:012d}.jpg",
                    shard,
                    Geometry(width, height, 1.0, 1.0, width, height, (0, 0, 0, 0)),
                )
            )
    manifest = Manifest(
        policy="letterbox",
        dtype=dtype,
        input_height=height,
        input_width=width,
        shard_size=max(len(ids) for ids in shards.values()),
        coco_root=coco_root,
        annotation_file=f"{coco_root}/annotations/instances_val2017.json",
        image_dir=f"{coco_root}/val2017",
        images=images,
        shards=shards,
    )
    manifest.write(layout.manifest)
    return layout, load_manifest(layout.manifest)


def run_all(backend, layout: RunLayout, manifest: Manifest) -> dict[str, np.ndarray]:
    """Infer every shard, then read back the raw candidates it kept (`keep_candidates=True`) beside
    the final detections of the shared layout, concatenated over shards."""
    parts: dict[str, list[np.ndarray]] = {}
    for shard in manifest.shards:
        backend.infer_shard(layout, manifest, shard)
        out_dir = layout.output_shard(backend.name, shard)
        marker, arrays = read_shard_outputs(out_dir)
        assert marker["kind"] == "dets" and marker["images"] == len(manifest.shards[shard])
        with np.load(out_dir / CANDIDATES_FILE) as kept:
            assert kept["image_ids"].tolist() == arrays["image_ids"].tolist() == manifest.shards[shard]
            arrays.update({name: kept[name] for name in ("boxes", "scores")})
        for name, array in arrays.items():
            parts.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


SHARDS = {"00000": [139, 285, 632], "00001": [724, 776]}


def ort_backend(model: Path, **options) -> OnnxRuntimeBackend:
    """One intra-op thread: ORT's spinning pool is slower than that on 2 cores shared with other work."""
    return OnnxRuntimeBackend(model, intra_op_num_threads=1, **options)


# ---------------------------------------------------------------------------------------------- parity


def test_onnxruntime_matches_torch_through_the_shared_layout(tmp_path: Path, models: dict[str, Path]) -> None:
    layout, manifest = make_run(tmp_path, SHARDS)
    onnx_backend = get_backend(
        "onnxruntime", model=models["dynamic"], batch_size=2, intra_op_num_threads=1, keep_candidates=True
    )
    ort_out = run_all(onnx_backend, layout, manifest)
    torch_backend = get_backend(
        "torch", model=models["checkpoint"], device="cpu", num_threads=1, keep_candidates=True
    )
    torch_out = run_all(torch_backend, layout, manifest)
    expected_ids = [i for ids in SHARDS.values() for i in ids]
    for out in (ort_out, torch_out):
        assert out["image_ids"].tolist() == expected_ids
        assert out["boxes"].shape == (5, K, 4) and out["boxes"].dtype == np.float32
        assert out["scores"].shape == (5, K, 80) and out["scores"].dtype == np.float32
    # random weights still give a spread of boxes and scores, so agreement is not trivially zero == zero
    assert torch_out["boxes"].std() > 1.0 and torch_out["scores"].max() > 1e-3
    np.testing.assert_allclose(ort_out["boxes"], torch_out["boxes"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(ort_out["scores"], torch_out["scores"], atol=1e-3, rtol=0)
    assert not np.allclose(ort_out["scores"][0], ort_out["scores"][1])  # each image got its own input


def test_uint8_nhwc_graph_matches_torch_with_normalization_in_graph(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": [1, 2]}, dtype="uint8")
    ort_out = run_all(
        ort_backend(models["uint8_static1"], batch_size=1, keep_candidates=True), layout, manifest
    )
    torch = TorchBackend(models["checkpoint"], device="cpu", num_threads=1, keep_candidates=True)
    torch_out = run_all(torch, layout, manifest)
    np.testing.assert_allclose(ort_out["boxes"], torch_out["boxes"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(ort_out["scores"], torch_out["scores"], atol=1e-3, rtol=0)


def test_batch_two_and_a_padded_static_batch_equal_batch_one(tmp_path: Path, models: dict[str, Path]) -> None:
    """Shards of 3 and 2 images: batches 2+1 and 2; the static-batch-2 graph pads the lone last image."""
    results = {}
    for label, model, batch in (("one", "dynamic", 1), ("two", "dynamic", 2), ("static", "static2", 2)):
        layout, manifest = make_run(tmp_path / label, SHARDS)
        backend = ort_backend(models[model], batch_size=batch, keep_candidates=True)
        results[label] = run_all(backend, layout, manifest)
    one = results["one"]
    for other in (results["two"], results["static"]):
        assert other["image_ids"].tolist() == one["image_ids"].tolist()
        np.testing.assert_allclose(other["boxes"], one["boxes"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(other["scores"], one["scores"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- timing


def test_timing_file_and_summary_are_consistent(tmp_path: Path, models: dict[str, Path]) -> None:
    layout, manifest = make_run(tmp_path, SHARDS)
    result = ort_backend(models["dynamic"], batch_size=2, warmup=1).infer_shard(layout, manifest, "00000")
    assert (result.backend, result.shard, result.images, result.reused) == ("onnxruntime", "00000", 3, False)
    outputs = layout.output_shard("onnxruntime", "00000") / "outputs.npz"
    assert (result.kind, result.output_bytes) == ("dets", outputs.stat().st_size)
    assert Path(result.output_dir) == layout.output_shard("onnxruntime", "00000")
    timing = json.loads(layout.timing_file("onnxruntime", "00000").read_text())
    latencies = timing["latencies_ms"]
    assert len(latencies) == 2 and all(0 < value < 60_000 for value in latencies)  # batches of 2 + 1
    summary = timing["summary"]
    assert summary == result.timing
    assert summary["images"] == 3 and summary["batch_size"] == 2 == timing["batch_size"]
    assert summary["fps"] == pytest.approx(3 / (sum(latencies) / 1000.0), rel=1e-9)
    stats = summary["latency_ms"]
    assert stats["min"] == min(latencies) and stats["max"] == max(latencies)
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert stats["mean"] == pytest.approx(sum(latencies) / 2)
    assert summary["host_nms_ms_per_image"] >= 0  # the NMS is timed apart from the model


# ---------------------------------------------------------------------------------------------- reuse


def test_retry_reuses_outputs_and_changed_inputs_or_model_recompute(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    layout, manifest = make_run(tmp_path, SHARDS)
    backend = ort_backend(models["dynamic"], batch_size=2)
    first = backend.infer_shard(layout, manifest, "00001")
    first_sha = manifest.sha256
    outputs = layout.output_shard("onnxruntime", "00001") / "outputs.npz"
    stamp = outputs.stat().st_mtime_ns
    retry = backend.infer_shard(layout, manifest, "00001")
    assert first.reused is False and retry.reused is True
    assert retry.images == 2 and retry.timing == first.timing and outputs.stat().st_mtime_ns == stamp
    assert (
        (retry.kind, retry.output_bytes)
        == (first.kind, first.output_bytes)
        == ("dets", outputs.stat().st_size)
    )

    # another manifest with the same shard (same images, geometry, preprocessing): still reused
    same_layout, same = make_run(tmp_path, SHARDS, coco_root="/data/other-coco")
    assert same.sha256 != first_sha and same.shard_digest("00001") == manifest.shard_digest("00001")
    assert backend.infer_shard(same_layout, same, "00001").reused is True
    # (a changed image of the shard recomputes it: see test_compact_outputs.py)
    # another model file (same graph, static batch) must not pick up outputs made by the first one
    other_model = ort_backend(models["static2"], batch_size=2)
    assert other_model.infer_shard(same_layout, same, "00001").reused is False
    (layout.output_shard("onnxruntime", "00001") / "done.json").unlink()  # e.g. killed before the marker
    assert other_model.infer_shard(same_layout, same, "00001").reused is False


# ---------------------------------------------------------------------------------------------- errors


def test_static_batch_smaller_than_batch_size_is_refused(models: dict[str, Path]) -> None:
    refusal = r"static batch 1.*re-export with dynamic batch or use batch_size 1$"
    with pytest.raises(BackendError, match=refusal):
        ort_backend(models["uint8_static1"], batch_size=2)


def test_manifest_and_model_input_mismatch_is_refused_before_anything_is_written(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    backend = ort_backend(models["dynamic"])
    layout, manifest = make_run(tmp_path / "u8", {"00000": [1]}, dtype="uint8")
    with pytest.raises(BackendError, match="normalize_in_graph=True") as info:
        backend.infer_shard(layout, manifest, "00000")
    assert str(models["dynamic"]) in str(info.value) and str(layout.manifest) in str(info.value)
    assert not layout.outputs_dir("onnxruntime").exists()

    layout, manifest = make_run(tmp_path / "size", {"00000": [1]}, height=160, width=192)
    with pytest.raises(BackendError, match=r"Export the model at 160x192"):
        backend.infer_shard(layout, manifest, "00000")
    assert not layout.outputs_dir("onnxruntime").exists()

    float_layout, float_manifest = make_run(tmp_path / "f32", {"00000": [1]})
    with pytest.raises(BackendError, match="uint8"):
        ort_backend(models["uint8_static1"]).infer_shard(float_layout, float_manifest, "00000")


def tiny_graph(path: Path, outputs: dict[str, tuple[int, list[int]]]) -> Path:
    """A small valid graph on a (N,3,H,W) float input whose outputs are x-dependent constants."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1, axes=[1, 2, 3])]  # (N,1,1,1)
    outs, inits = [], []
    for name, (elem, tail) in outputs.items():
        dims = [-1] + [1] * len(tail)
        shape = helper.make_tensor(f"{name}_shape", onnx.TensorProto.INT64, [len(dims)], dims)
        ones = np.ones([1, *tail], dtype=np.float32)
        inits += [shape, onnx.numpy_helper.from_array(ones, f"{name}_ones")]
        nodes += [
            helper.make_node("Reshape", ["m", f"{name}_shape"], [f"{name}_m"]),
            helper.make_node("Mul", [f"{name}_m", f"{name}_ones"], [f"{name}_f"]),
            helper.make_node("Cast", [f"{name}_f"], [name], to=elem),
        ]
        outs.append(helper.make_tensor_value_info(name, elem, ["N", *tail]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, H, W])],
        outs,
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_unknown_output_names_are_refused(tmp_path: Path) -> None:
    graph = tiny_graph(
        tmp_path / "odd.onnx",
        {"bbox": (onnx.TensorProto.FLOAT, [7, 4]), "logits": (onnx.TensorProto.FLOAT, [7, 80])},
    )
    with pytest.raises(BackendError, match=r"outputs \['bbox', 'logits'\].*portable"):
        ort_backend(graph)
    three = tiny_graph(
        tmp_path / "three.onnx",
        {
            "boxes": (onnx.TensorProto.FLOAT, [7, 4]),
            "scores": (onnx.TensorProto.FLOAT, [7, 80]),
            "extra": (onnx.TensorProto.FLOAT, [7]),
        },
    )
    with pytest.raises(BackendError, match="expected exactly"):
        ort_backend(three)
    classes = tiny_graph(
        tmp_path / "81.onnx",
        {"boxes": (onnx.TensorProto.FLOAT, [7, 4]), "scores": (onnx.TensorProto.FLOAT, [7, 81])},
    )
    with pytest.raises(BackendError, match="81 classes"):
        ort_backend(classes)


def test_dets_graph_writes_the_dets_kind(tmp_path: Path) -> None:
    graph = tiny_graph(
        tmp_path / "dets.onnx",
        {"dets": (onnx.TensorProto.FLOAT, [100, 5]), "labels": (onnx.TensorProto.INT64, [100])},
    )
    backend = ort_backend(graph, batch_size=2)
    assert backend.kind == "dets" == backend.model_kind
    layout, manifest = make_run(tmp_path / "run", {"00000": [5, 6, 7]})
    assert backend.infer_shard(layout, manifest, "00000").kind == "dets"
    marker, arrays = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))
    assert marker["kind"] == "dets" and marker["output_names"] == ["dets", "labels"]
    assert marker["postprocess"] == {"nms": "graph"}  # passed through: no host NMS, no thresholds
    assert arrays["dets"].shape == (3, 100, 5) and arrays["labels"].dtype == np.int64
    # the graph outputs the mean of each input image: check rows line up with the image ids
    for row, image_id in enumerate([5, 6, 7]):
        raw = np.fromfile(layout.input_shard("00000") / input_file_name(image_id), dtype=np.float32)
        assert arrays["dets"][row, 0, 0] == pytest.approx(raw.mean(), abs=1e-5)


def test_unavailable_provider_lists_what_is_available(models: dict[str, Path]) -> None:
    assert "CANNExecutionProvider" not in ort.get_available_providers()  # the pip wheel has no CANN
    listed = r"'cann'.*CANNExecutionProvider.*available: .*CPUExecutionProvider"
    with pytest.raises(BackendError, match=listed):
        get_backend("onnxruntime", model=models["dynamic"], providers=["cann"])
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CUDAExecutionProvider"], available=both) == both
    assert resolve_providers("cuda", available=both) == both


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP is installed")
def test_cuda_provider_without_the_gpu_build_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        ort_backend(models["dynamic"], providers="cuda")


def test_missing_model_and_bad_options(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(BackendError, match="does not exist; run the export step"):
        OnnxRuntimeBackend(tmp_path / "nope.onnx")
    with pytest.raises(BackendError, match=r"unknown backend 'tensorflow'.*onnxruntime"):
        get_backend("tensorflow")
    with pytest.raises(BackendError, match="bad options for backend 'onnxruntime'"):
        get_backend("onnxruntime", model=models["dynamic"], batchsize=2)
    with pytest.raises(BackendError, match="batch_size must be an integer >= 1"):
        ort_backend(models["dynamic"], batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_torch_cuda_request_without_cuda_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(BackendError, match="CUDA is not available"):
        TorchBackend(models["checkpoint"], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_fp16_agrees_with_cpu_reference(tmp_path: Path, models: dict[str, Path]) -> None:
    layout, manifest = make_run(tmp_path, {"00000": [1, 2, 3]})
    cpu = run_all(TorchBackend(models["checkpoint"], device="cpu", keep_candidates=True), layout, manifest)
    cuda_backend = TorchBackend(models["checkpoint"], device="auto", batch_size=2, keep_candidates=True)
    assert cuda_backend.device.type == "cuda" and cuda_backend.amp
    cuda = run_all(cuda_backend, layout, manifest)
    assert cuda["boxes"].dtype == np.float32 == cuda["scores"].dtype
    np.testing.assert_allclose(cuda["scores"], cpu["scores"], atol=2e-2, rtol=0)
    np.testing.assert_allclose(cuda["boxes"], cpu["boxes"], atol=2.0, rtol=0)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_half_precision_wrapper_feeds_the_decode_like_the_plain_network(models: dict[str, Path]) -> None:
    """The CUDA fp16 wiring (wrapper + DeployModel) on CPU, where autocast for CUDA changes nothing."""
    torch.set_num_threads(1)
    network = load_model(models["checkpoint"])
    x = torch.randn(1, 3, H, W)
    with torch.inference_mode():
        plain = DeployModel(network, "portable", H, W)(x)
        wrapped = DeployModel(HalfPrecisionNetwork(network), "portable", H, W)(x)  # type: ignore[arg-type]
    for a, b in zip(plain, wrapped, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
