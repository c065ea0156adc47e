"""The in-process inference loop: read-ahead of the next batch, timing without a warm-up pass,
non-finite outputs, and reuse of a shard whose files do not read back.

Small hand-made graphs (`tiny_graph`: outputs are the mean of each input image) keep these fast; the
read-ahead is checked against the plain sequential loop bit for bit.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_backends import make_run, ort_backend, tiny_graph

from gfocal_pipeline.backends.base import ReadAhead, ShardDetections, read_input, read_input_into
from gfocal_pipeline.backends.onnxruntime import OnnxRuntimeBackend, resolve_providers
from gfocal_pipeline.errors import BackendError, DatasetError
from gfocal_pipeline.layout import DONE_FILE, OUTPUTS_FILE, RunLayout, input_file_name, read_shard_outputs
from gfocal_pipeline.manifest import Manifest

FLOAT = onnx.TensorProto.FLOAT
IDS = [3, 5, 8, 13, 21]  # batches of 2: [3, 5], [8, 13], [21]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    return {
        "candidates": tiny_graph(
            root / "candidates.onnx", {"boxes": (FLOAT, [7, 4]), "scores": (FLOAT, [7, 80])}
        ),
        "dets": tiny_graph(
            root / "dets.onnx", {"dets": (FLOAT, [100, 5]), "labels": (onnx.TensorProto.INT64, [100])}
        ),
    }


def read_ahead_threads() -> list[threading.Thread]:
    """Live threads of the loop (read-ahead, host NMS): none may outlive a shard."""
    prefixes = ("gfocal-read-ahead", "gfocal-host-nms")
    return [t for t in threading.enumerate() if t.name.startswith(prefixes) and t.is_alive()]


def sequential_outputs(backend: OnnxRuntimeBackend, manifest: Manifest, shard: str) -> dict[str, np.ndarray]:
    """The loop as it was: np.fromfile per image, np.stack, run, host NMS; no thread."""
    post = backend.postprocess()
    found = ShardDetections(len(manifest.shards[shard]), post if post["nms"] == "host" else None, False)
    ids = manifest.shards[shard]
    for start in range(0, len(ids), backend.batch_size):
        chunk = ids[start : start + backend.batch_size]
        files = [manifest.input_dir(shard) / input_file_name(i) for i in chunk]
        batch = np.stack([np.fromfile(f, np.float32).reshape(manifest.input_shape()[1:]) for f in files])
        found.add(chunk, backend.run_batch(batch))
    return {"image_ids": found.image_ids, **found.arrays()}


# ---------------------------------------------------------------------------------------------- read-ahead


@pytest.mark.parametrize("overlap", [True, False], ids=["nms-overlapped", "nms-inline"])
@pytest.mark.parametrize("kind", ["candidates", "dets"])
def test_read_ahead_loop_writes_what_the_sequential_loop_computes(
    tmp_path: Path, graphs: dict[str, Path], kind: str, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OnnxRuntimeBackend, "overlap_postprocess", overlap)
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    for offset, image_id in enumerate(IDS):  # image means 0.1 .. 0.5: scores above score_thr, kept by NMS
        path = manifest.input_dir("00000") / input_file_name(image_id)
        (np.fromfile(path, np.float32) + np.float32(0.1 * (offset + 1))).tofile(path)
    backend = ort_backend(graphs[kind], batch_size=2)
    backend.infer_shard(layout, manifest, "00000")
    _, written = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))
    expected = sequential_outputs(backend, manifest, "00000")
    assert sorted(written) == sorted(expected)
    for name, array in expected.items():
        assert written[name].dtype == array.dtype and np.array_equal(written[name], array), name
    assert (written["dets"][:, :, 4] > 0).sum() >= 5  # detections were kept: not zeros == zeros
    assert not read_ahead_threads()


def test_batches_are_the_files_bytes_read_straight_into_each_batch(
    tmp_path: Path, graphs: dict[str, Path]
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    backend = ort_backend(graphs["dets"], batch_size=2)
    plain = list(backend.batches(layout, manifest, "00000"))
    with ReadAhead(backend.batches(layout, manifest, "00000")) as ahead:
        prefetched = list(ahead)
    assert [ids for ids, _ in plain] == [ids for ids, _ in prefetched] == [[3, 5], [8, 13], [21]]
    for (ids, batch), (_, other) in zip(plain, prefetched, strict=True):
        assert batch.flags.c_contiguous and batch.dtype == np.float32 and batch.shape[0] == len(ids)
        assert np.array_equal(batch, other)
        for row, image_id in enumerate(ids):
            raw = (manifest.input_dir("00000") / input_file_name(image_id)).read_bytes()
            assert batch[row].tobytes() == raw
    one = read_input(manifest.input_dir("00000") / input_file_name(3), manifest)
    assert np.array_equal(one, plain[0][1][0])
    with pytest.raises(ValueError, match="C-contiguous with"):
        read_input_into(manifest.input_dir("00000") / input_file_name(3), manifest, np.empty(3, np.float32))


def test_read_ahead_is_never_more_than_one_item_ahead() -> None:
    made: list[int] = []

    def source():
        for index in range(6):
            made.append(index)
            yield index

    seen = []
    with ReadAhead(source()) as ahead:
        for item in ahead:
            time.sleep(0.02)  # room for a worker that would run further ahead
            assert len(made) - len(seen) <= 2  # the item in hand plus at most one made ahead
            assert made[-1] <= item + 1
            seen.append(item)
    assert seen == list(range(6))
    assert not read_ahead_threads()


def test_read_ahead_joins_its_thread_and_closes_the_source_on_early_exit_and_on_errors() -> None:
    closed = []

    def source():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    with ReadAhead(source()) as ahead:
        for item in ahead:
            if item == 2:
                break
    assert closed == [True] and not read_ahead_threads()

    with pytest.raises(RuntimeError, match="consumer failed"), ReadAhead(source()) as ahead:
        for _ in ahead:
            raise RuntimeError("consumer failed")
    assert closed == [True, True] and not read_ahead_threads()

    def failing():
        yield 1
        raise DatasetError("input 2 is missing")

    with ReadAhead(failing()) as ahead:
        assert next(ahead) == 1
        with pytest.raises(DatasetError, match="input 2 is missing"):
            next(ahead)
        with pytest.raises(StopIteration):
            next(ahead)
    assert not read_ahead_threads()


@pytest.mark.parametrize("damage", ["missing", "short", "long"])
def test_a_bad_input_file_fails_the_shard_with_the_same_message_and_no_thread_left(
    tmp_path: Path, graphs: dict[str, Path], damage: str
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    path = manifest.input_dir("00000") / input_file_name(13)  # in the second batch: read ahead
    if damage == "missing":
        path.unlink()
        message = rf"preprocessed input '{path}' is missing; re-run preprocessing"
    else:
        data = path.read_bytes()
        path.write_bytes(data[:-4] if damage == "short" else data + b"\0")
        size = len(data) - 4 if damage == "short" else len(data) + 1
        message = rf"'{path}' has {size} bytes, expected {manifest.bytes_per_image} for float32"
    with pytest.raises(DatasetError, match=message):
        ort_backend(graphs["dets"], batch_size=2).infer_shard(layout, manifest, "00000")
    assert not read_ahead_threads()
    assert not (layout.output_shard("onnxruntime", "00000") / DONE_FILE).exists()
    assert not layout.timing_file("onnxruntime", "00000").exists()


# ---------------------------------------------------------------------------------------------- timing


class CountingBackend(OnnxRuntimeBackend):
    """Records each run's batch size and how many batches had been read by then."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []
        self.read_by_call: list[int] = []
        self.read = 0

    def batches(self, layout, manifest, shard):
        for item in super().batches(layout, manifest, shard):
            self.read += 1
            yield item

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(0.02)  # room for a reader that would run further ahead
        self.calls.append(len(batch))
        self.read_by_call.append(self.read)
        return super().run_batch(batch)


def test_the_loop_reads_at_most_one_batch_ahead(tmp_path: Path, graphs: dict[str, Path]) -> None:
    layout, manifest = make_run(tmp_path, {"00000": list(range(1, 8))})
    backend = CountingBackend(graphs["candidates"], batch_size=1, intra_op_num_threads=1)
    backend.infer_shard(layout, manifest, "00000")
    assert len(backend.calls) == 7
    assert all(read <= index + 2 for index, read in enumerate(backend.read_by_call)), backend.read_by_call


def test_a_host_nms_error_fails_the_shard_and_joins_the_threads(
    tmp_path: Path, graphs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    original = ShardDetections.add
    calls = []

    def add(self, ids, outputs):
        calls.append(ids)
        if len(calls) == 2:
            raise ValueError("102 detections do not fit in 100 rows")
        return original(self, ids, outputs)

    monkeypatch.setattr(ShardDetections, "add", add)
    with pytest.raises(ValueError, match="do not fit"):
        ort_backend(graphs["candidates"], batch_size=2).infer_shard(layout, manifest, "00000")
    assert not read_ahead_threads()
    assert not (layout.output_shard("onnxruntime", "00000") / DONE_FILE).exists()


def test_every_batch_runs_once_and_is_timed_unless_a_warmup_is_asked_for(
    tmp_path: Path, graphs: dict[str, Path]
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    default = CountingBackend(graphs["dets"], batch_size=2, intra_op_num_threads=1)
    result = default.infer_shard(layout, manifest, "00000")
    assert default.calls == [2, 2, 1]  # no untimed warm-up pass: the first batch counts
    timing = json.loads(layout.timing_file("onnxruntime", "00000").read_text())
    assert len(timing["latencies_ms"]) == 3 and result.timing["images"] == 5

    warmed = CountingBackend(graphs["dets"], batch_size=2, intra_op_num_threads=1, warmup=2)
    warmed.infer_shard(*make_run(tmp_path / "warm", {"00000": IDS}), "00000")
    assert warmed.calls == [2, 2, 2, 2, 1]
    for bad in (-1, 1.5, True):
        with pytest.raises(BackendError, match="warmup must be an integer >= 0"):
            ort_backend(graphs["dets"], warmup=bad)


def test_the_session_runs_with_the_shared_session_options(graphs: dict[str, Path]) -> None:
    backend = ort_backend(graphs["dets"], cache_optimized_graph=False)
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.log_severity_level == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    kept = ort_backend(graphs["dets"]).session.get_session_options()  # the kept, optimized graph
    assert kept.intra_op_num_threads == 1 and kept.log_severity_level == 3
    assert ort_backend(graphs["dets"]).session.get_session_options().graph_optimization_level == (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    assert len(backend.identity()["model_sha256"]) == 64  # hashed while the session was created
    with pytest.raises(BackendError, match="intra_op_num_threads must be an integer >= 0"):
        OnnxRuntimeBackend(graphs["dets"], intra_op_num_threads=-1)


# ---------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("kind", ["candidates", "dets"])
def test_non_finite_outputs_fail_the_shard_naming_the_images(
    tmp_path: Path, graphs: dict[str, Path], kind: str
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    for image_id, value in ((5, np.nan), (21, np.inf)):  # the graphs output each image's mean
        path = manifest.input_dir("00000") / input_file_name(image_id)
        data = np.fromfile(path, np.float32)
        data[7] = value
        data.tofile(path)
    with pytest.raises(
        BackendError, match=r"NaN or infinite outputs for 2 image\(s\) of shard '00000' \(ids 5, 21\)"
    ):
        ort_backend(graphs[kind], batch_size=2).infer_shard(layout, manifest, "00000")
    out_dir = layout.output_shard("onnxruntime", "00000")
    assert not (out_dir / DONE_FILE).exists() and not (out_dir / OUTPUTS_FILE).exists()
    assert not layout.timing_file("onnxruntime", "00000").exists()
    assert not read_ahead_threads()


# ---------------------------------------------------------------------------------------------- reuse


def corrupt(layout: RunLayout, damage: str) -> None:
    out_dir = layout.output_shard("onnxruntime", "00000")
    outputs, done = out_dir / OUTPUTS_FILE, out_dir / DONE_FILE
    if damage == "done-not-json":
        done.write_text('{"shard": "00000", "kind": ')
    elif damage == "done-not-utf8":
        done.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "done-not-a-dict":
        done.write_text("[1, 2]")
    elif damage == "done-wrong-images":
        done.write_text(json.dumps({**json.loads(done.read_text()), "images": 2}))
    elif damage == "outputs-truncated":
        outputs.write_bytes(outputs.read_bytes()[:100])
    elif damage == "outputs-garbage":
        outputs.write_bytes(b"not a zip at all" * 10)
    elif damage == "outputs-bit-flip":
        data = bytearray(outputs.read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside an array's stored bytes: only the CRC sees it
        outputs.write_bytes(bytes(data))
    elif damage == "outputs-other-ids":
        with np.load(outputs) as kept:
            arrays = {name: kept[name] for name in kept.files}
        arrays["image_ids"] = arrays["image_ids"][::-1].copy()
        with open(outputs, "wb") as handle:
            np.savez(handle, **arrays)
    elif damage == "timing-not-json":
        layout.timing_file("onnxruntime", "00000").write_text("{")


@pytest.mark.parametrize(
    "damage",
    [
        "done-not-json",
        "done-not-utf8",
        "done-not-a-dict",
        "done-wrong-images",
        "outputs-truncated",
        "outputs-garbage",
        "outputs-bit-flip",
        "outputs-other-ids",
        "timing-not-json",
    ],
)
def test_a_shard_whose_files_do_not_read_back_is_recomputed(
    tmp_path: Path, graphs: dict[str, Path], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    layout, manifest = make_run(tmp_path, {"00000": IDS})
    backend = ort_backend(graphs["dets"], batch_size=2)
    first = backend.infer_shard(layout, manifest, "00000")
    _, expected = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))
    corrupt(layout, damage)
    with caplog.at_level(logging.WARNING):
        again = backend.infer_shard(layout, manifest, "00000")
    assert first.reused is False and again.reused is False
    if damage != "done-not-a-dict":  # a marker of the wrong type is simply "not done"
        assert re.search(r"is (corrupt|unreadable|not a marker)|are damaged", caplog.text), caplog.text
    _, written = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))
    for name, array in expected.items():
        assert np.array_equal(written[name], array)
    assert backend.infer_shard(layout, manifest, "00000").reused is True  # whole again


# ---------------------------------------------------------------------------------------------- providers


def test_cuda_without_its_execution_provider_is_a_clear_error() -> None:
    with pytest.raises(
        BackendError, match=r"'cuda' \(CUDAExecutionProvider\) is not available.*onnxruntime-gpu"
    ):
        resolve_providers("cuda", available=["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="no onnxruntime provider given"):
        resolve_providers(" , ", available=["CPUExecutionProvider"])
    assert resolve_providers("gpu,cpu", available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    spec = [("CUDAExecutionProvider", {"device_id": 0})]
    assert resolve_providers(spec, available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider",
    ]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU; CI has neither",
)
def test_cuda_provider_writes_what_the_cpu_provider_writes(tmp_path: Path, graphs: dict[str, Path]) -> None:
    outputs = {}
    for providers in ("cpu", "cuda"):
        layout, manifest = make_run(tmp_path / providers, {"00000": IDS})
        backend = OnnxRuntimeBackend(graphs["candidates"], batch_size=2, providers=providers)
        assert backend.session.get_providers()[0] == resolve_providers(providers)[0]
        backend.infer_shard(layout, manifest, "00000")
        outputs[providers] = read_shard_outputs(layout.output_shard("onnxruntime", "00000"))[1]
    assert np.array_equal(outputs["cpu"]["labels"], outputs["cuda"]["labels"])
    np.testing.assert_allclose(outputs["cpu"]["dets"], outputs["cuda"]["dets"], atol=1e-4, rtol=0)
