"""TorchBackend's GPU options (precision, channels_last, compile, cuda_graphs) and batching.

CPU tests run random-weight GFocalV2 at 64x96 (fast on 2 busy cores); the GPU tests skip without
CUDA. The fp16 check compares COCO AP of fp16 and fp32 on the same preprocessed demo images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gfocal_pipeline import steps
from gfocal_pipeline.backends.base import CANDIDATES_FILE
from gfocal_pipeline.backends.registry import get_backend
from gfocal_pipeline.backends.torch_backend import (
    NetworkRunner,
    NormalizedInput,
    TorchBackend,
    TorchOptions,
    pad_batch,
    resolve_options,
)
from gfocal_pipeline.cli import build_parser
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import BackendError, GfocalError
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import RunLayout, input_file_name, read_shard_outputs
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest, load_manifest
from gfocal_pipeline.models.gfocalv2 import DeployModel
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, write_random_checkpoint

H, W = 64, 96
SHARDS = {"00000": [139, 285, 632], "00001": [724, 776]}
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("models") / "random.pth", seed=3)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Torch's thread pool spins badly on 2 busy cores; restore the process setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_run(root: Path, shards: dict[str, list[int]] = SHARDS) -> tuple[RunLayout, Manifest]:
    """Random float32 preprocessed inputs for `shards` plus a manifest, in a run directory."""
    layout = RunLayout.at(root)
    rng = np.random.default_rng(0)
    images = []
    for shard, ids in shards.items():
        layout.input_shard(shard).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            array = rng.standard_normal((3, H, W)).astype(np.float32)
            array.tofile(layout.input_shard(shard) / input_file_name(image_id))
            geometry = Geometry(W, H, 1.0, 1.0, W, H, (0, 0, 0, 0))
            images.append(ImageEntry(image_id, f"{image_id:012d}.jpg", shard, geometry))
    manifest = Manifest(
        policy="letterbox",
        dtype="float32",
        input_height=H,
        input_width=W,
        shard_size=max(len(ids) for ids in shards.values()),
        coco_root="/data/coco",
        annotation_file="/data/coco/annotations/instances_val2017.json",
        image_dir="/data/coco/val2017",
        images=images,
        shards=shards,
    )
    manifest.write(layout.manifest)
    return layout, load_manifest(layout.manifest)


def run_all(backend: TorchBackend, layout: RunLayout, manifest: Manifest) -> dict[str, np.ndarray]:
    """Every shard's final detections and kept candidates, concatenated over shards."""
    parts: dict[str, list[np.ndarray]] = {}
    for shard in manifest.shards:
        backend.infer_shard(layout, manifest, shard)
        out_dir = layout.output_shard(backend.name, shard)
        _, arrays = read_shard_outputs(out_dir)
        with np.load(out_dir / CANDIDATES_FILE) as kept:
            arrays.update({name: kept[name] for name in ("boxes", "scores")})
        for name, array in arrays.items():
            parts.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def assert_same_detections(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert a["image_ids"].tolist() == b["image_ids"].tolist()
    np.testing.assert_allclose(a["scores"], b["scores"], atol=atol, rtol=0)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=atol * 100, rtol=0)
    np.testing.assert_allclose(a["dets"], b["dets"], atol=atol * 100, rtol=0)
    assert np.array_equal(a["labels"], b["labels"])


# ---------------------------------------------------------------------------------------------- options


def test_defaults_are_fp32_on_cpu_and_fp16_channels_last_on_cuda() -> None:
    assert resolve_options(CPU) == TorchOptions("fp32", False, "off", False)
    assert resolve_options(torch.device("cuda")) == TorchOptions("fp16", True, "off", False)
    assert resolve_options(CPU, channels_last=True, compile=True).compile == "default"
    assert resolve_options(CPU, compile="max-autotune").static_shapes
    assert not resolve_options(CPU, compile=False).static_shapes
    assert resolve_options(torch.device("cuda"), cuda_graphs=True).static_shapes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "bf16"}, r"precision must be one of fp32, fp16, got 'bf16'"),
        ({"compile": "reduce-overhead"}, r"compile must be true, false or one of off, default, max-autotune"),
        ({"channels_last": "yes"}, r"channels_last must be true or false, got 'yes'"),
        ({"cuda_graphs": 1}, r"cuda_graphs must be true or false, got 1"),
        ({"precision": "fp16"}, r"precision='fp16' needs a CUDA device \(device is cpu\)"),
        ({"cuda_graphs": True}, r"cuda_graphs=True needs a CUDA device \(device is cpu\)"),
    ],
)
def test_bad_options_and_cpu_refusals_name_the_option(options: dict, message: str, checkpoint: Path) -> None:
    with pytest.raises(BackendError, match=message):
        resolve_options(CPU, **options)
    with pytest.raises(BackendError, match=message):  # the constructor refuses before loading the model
        get_backend("torch", model=checkpoint, device="cpu", **options)


def test_num_threads_and_old_amp_keyword_are_refused(checkpoint: Path) -> None:
    with pytest.raises(BackendError, match="num_threads must be an integer >= 1, got 0"):
        TorchBackend(checkpoint, device="cpu", num_threads=0)
    with pytest.raises(BackendError, match=r"bad options for backend 'torch'.*precision"):
        get_backend("torch", model=checkpoint, device="cpu", amp=False)


def test_identity_and_timing_facts_name_every_option(checkpoint: Path, tmp_path: Path) -> None:
    plain = TorchBackend(checkpoint, device="cpu")
    others = [
        TorchBackend(checkpoint, device="cpu", channels_last=True),
        TorchBackend(checkpoint, device="cpu", compile="default"),  # compiles only in prepare()
        TorchBackend(checkpoint, device="cpu", compile="max-autotune"),
    ]
    identities = [plain.identity(), *(b.identity() for b in others)]
    assert all(i["torch_options"]["precision"] == "fp32" for i in identities)
    assert len({repr(i) for i in identities}) == len(identities)
    assert not plain.amp
    layout, manifest = make_run(tmp_path, {"00000": [1]})
    timing = plain.infer_shard(layout, manifest, "00000").timing
    assert timing["precision"] == "fp32" and timing["device"] == "cpu"
    assert (timing["channels_last"], timing["compile"], timing["cuda_graphs"]) == (False, "off", False)
    # a shard made with other options is recomputed, with the same ones reused
    assert TorchBackend(checkpoint, device="cpu").infer_shard(layout, manifest, "00000").reused
    assert not others[0].infer_shard(layout, manifest, "00000").reused


def test_cli_flags_reach_the_backend_options() -> None:
    from gfocal_pipeline.cli import _backend_options

    base = ["infer", "--run-dir", "r", "--backend", "torch", "--model", "m.pth"]
    args = build_parser().parse_args(base)
    assert _backend_options(args) == {"device": "auto"}
    flags = ["--precision", "fp32", "--channels-last", "--compile", "max-autotune", "--cuda-graphs"]
    args = build_parser().parse_args([*base, *flags])
    assert _backend_options(args) == {
        "device": "auto",
        "precision": "fp32",
        "channels_last": True,
        "compile": "max-autotune",
        "cuda_graphs": True,
    }
    args = build_parser().parse_args([*base, "--no-channels-last"])
    assert _backend_options(args)["channels_last"] is False
    args = build_parser().parse_args(["infer", "--run-dir", "r", "--precision", "fp16", "--cuda-graphs"])
    with pytest.raises(GfocalError, match=r"--precision, --cuda-graphs only apply to --backend torch"):
        _backend_options(args)


# ---------------------------------------------------------------------------------------------- batching


def test_pad_batch_appends_zero_images_up_to_the_batch_size() -> None:
    batch = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2) + 1
    padded = pad_batch(batch, 4)
    assert padded.shape == (4, 3, 2, 2) and padded.dtype == batch.dtype
    assert np.array_equal(padded[:2], batch) and not padded[2:].any()
    assert pad_batch(batch, 2) is batch
    with pytest.raises(BackendError, match="larger than batch_size 1"):
        pad_batch(batch, 1)


def test_channels_last_batch_two_and_padded_static_batches_match_batch_one(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Shards of 3 and 2 images. The static run pads the lone last image of shard 00000 to a batch of
    2 (the path compile and CUDA graphs take), with the eager forward standing in for theirs."""
    results = {}
    for label, options in (
        ("one", {}),
        ("channels_last", {"channels_last": True}),
        ("two", {"batch_size": 2}),
    ):
        layout, manifest = make_run(tmp_path / label)
        backend = TorchBackend(checkpoint, device="cpu", keep_candidates=True, **options)
        results[label] = run_all(backend, layout, manifest)

    layout, manifest = make_run(tmp_path / "static")
    backend = TorchBackend(checkpoint, device="cpu", keep_candidates=True, batch_size=2)
    eager = backend.prepare(manifest)
    seen: list[tuple[int, ...]] = []

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(tuple(x.shape))
        return eager(x)

    backend._forward = forward
    backend.options = dataclasses.replace(backend.options, compile="default")  # static shapes, no compiling
    results["static"] = run_all(backend, layout, manifest)
    # batches of 2+1 and 2 images (plus any warm-up run per shard), each padded to 2
    assert seen == [(2, 3, H, W)] * (3 + 2 * backend.warmup)

    one = results["one"]
    assert one["scores"].max() > 1e-3 and one["boxes"].std() > 1.0  # something to compare
    for label in ("channels_last", "two", "static"):
        assert_same_detections(results[label], one, atol=1e-5)


def test_run_batch_before_prepare_is_refused(checkpoint: Path) -> None:
    with pytest.raises(BackendError, match="before prepare"):
        TorchBackend(checkpoint, device="cpu").run_batch(np.zeros((1, 3, H, W), np.float32))


def test_fp16_wiring_keeps_the_decode_in_float32_and_traces_as_one_graph(checkpoint: Path) -> None:
    """The CUDA fp16 path's wiring run under CPU fp16 autocast: float32 head outputs close to fp32,
    and torch.compile's tracer takes network + decode whole (no graph break)."""
    network = load_model(checkpoint).to(memory_format=torch.channels_last)
    runner = NetworkRunner(network, half=True, channels_last=True, device_type="cpu", autocast_cache=False)
    x = torch.randn(2, 3, H, W)
    with torch.inference_mode():
        cls_scores, bbox_preds = runner(x)
        assert {t.dtype for t in (*cls_scores, *bbox_preds)} == {torch.float32}
        full = DeployModel(network, "portable", H, W)(x)
        half = DeployModel(runner, "portable", H, W)(x)  # type: ignore[arg-type]
        np.testing.assert_allclose(half[1].numpy(), full[1].numpy(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(half[0].numpy(), full[0].numpy(), atol=0.5, rtol=0)
        traced = torch.compile(DeployModel(runner, "portable", H, W), backend="eager", fullgraph=True)
        for a, b in zip(traced(x), half, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_fp16_ap_is_within_1e_3_of_fp32_on_the_same_inputs(checkpoint: Path, tmp_path: Path) -> None:
    coco = make_demo_coco(tmp_path / "coco", num_images=8, seed=1)
    run = tmp_path / "run"
    steps.preprocess_step(coco, run, policy="letterbox", dtype="float32", height=320, width=480, shard_size=8)
    manifest = load_manifest(RunLayout.at(run).manifest)
    stats = {}
    for precision in ("fp32", "fp16"):
        backend = TorchBackend(checkpoint, device="cuda", precision=precision, batch_size=4)
        for shard in manifest.shards:
            assert not backend.infer_shard(RunLayout.at(run), manifest, shard).reused
        stats[precision] = evaluate_outputs(run, "torch")["stats"]
    assert abs(stats["fp16"]["AP"] - stats["fp32"]["AP"]) <= 1e-3
    assert abs(stats["fp16"]["AP50"] - stats["fp32"]["AP50"]) <= 1e-3


@needs_cuda
@pytest.mark.parametrize(
    "options",
    [{"cuda_graphs": True}, {"compile": "default"}, {"compile": "default", "cuda_graphs": True}],
    ids=["cuda-graphs", "compile", "compile+cuda-graphs"],
)
def test_compile_and_cuda_graphs_match_eager_fp16(checkpoint: Path, tmp_path: Path, options: dict) -> None:
    layout, manifest = make_run(tmp_path / "eager")
    eager = run_all(
        TorchBackend(checkpoint, device="cuda", batch_size=2, keep_candidates=True), layout, manifest
    )
    layout, manifest = make_run(tmp_path / "fast")
    backend = TorchBackend(checkpoint, device="cuda", batch_size=2, keep_candidates=True, **options)
    fast = run_all(backend, layout, manifest)  # shard 00000's last batch is padded
    assert backend.options.static_shapes and backend.prepare_s > 0
    assert fast["scores"].dtype == np.float32 == fast["boxes"].dtype
    # fp16 convolutions fused or tiled differently; the bounds of the fp16-vs-fp32 check below
    np.testing.assert_allclose(fast["scores"], eager["scores"], atol=2e-2, rtol=0)
    np.testing.assert_allclose(fast["boxes"], eager["boxes"], atol=2.0, rtol=0)


@needs_cuda
def test_fp16_candidates_agree_with_fp32_and_decode_in_float32(checkpoint: Path, tmp_path: Path) -> None:
    layout, manifest = make_run(tmp_path / "fp32")
    full = run_all(
        TorchBackend(checkpoint, device="cuda", precision="fp32", keep_candidates=True), layout, manifest
    )
    layout, manifest = make_run(tmp_path / "fp16")
    backend = TorchBackend(checkpoint, device="cuda", keep_candidates=True)
    assert backend.amp and backend.options.channels_last
    half = run_all(backend, layout, manifest)
    assert half["scores"].dtype == np.float32
    np.testing.assert_allclose(half["scores"], full["scores"], atol=2e-2, rtol=0)
    np.testing.assert_allclose(half["boxes"], full["boxes"], atol=2.0, rtol=0)  # P7: stride 128


def test_uint8_inputs_are_normalized_like_the_graph_does(checkpoint: Path) -> None:
    """The flip-based normalization (capturable in a CUDA graph) gives the export's exact numbers."""
    network = load_model(checkpoint)
    x = torch.randint(0, 256, (1, H, W, 3), dtype=torch.uint8)
    with torch.inference_mode():
        graph = DeployModel(network, "portable", H, W, normalize_in_graph=True)(x)
        ours = NormalizedInput(DeployModel(network, "portable", H, W))(x)
    for a, b in zip(graph, ours, strict=True):
        assert torch.equal(a, b)
