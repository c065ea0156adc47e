"""Peak memory of the inference task does not grow with the number of images (streaming by shard).

The onnxruntime backend runs over every shard of a run with N and then 4N images, each in a fresh
Python process that reports its peak RSS. A peak that is independent of the run size needs the
backend to hold only one shard's inputs and outputs at a time.

The peak is read from `VmHWM` in /proc/self/status, not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux
carries the pre-exec high-water mark into ru_maxrss, so a child forked from a pytest process that
has torch loaded would report the parent's size (the same number for both runs, a test that passes
whatever the backend does).

The graph is a small hand-built ONNX model with the portable outputs at their real size (K=3267
candidates, 80 classes) on a 480x640 float32 input. This keeps the run fast while each image is
large (3.7 MB of input, 1.1 MB of outputs): keeping all of them would show as tens of MB. A control
run that simply loads all inputs at once proves the measurement sees such growth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from gfocal_pipeline.layout import RunLayout, input_file_name, shard_name
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest

H, W = 480, 640
K = 3267
SHARD_SIZE = 4
SMALL, LARGE = 8, 32
BYTES_PER_IMAGE = 3 * H * W * 4

MEASURE = r"""
import json, sys
from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import load_manifest

layout, model, mode = RunLayout.at(sys.argv[1]), sys.argv[2], sys.argv[3]
manifest = load_manifest(layout.manifest)
if mode == "backend":
    from gfocal_pipeline.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(model, batch_size=2, intra_op_num_threads=1)
    images = sum(backend.infer_shard(layout, manifest, shard).images for shard in manifest.shards)
else:  # control: what a non-streaming implementation holds, every input at once
    import numpy as np
    import onnxruntime  # same imports as the backend run, so only the held inputs differ

    held = [np.fromfile(layout.input_shard(s) / input_file_name(i), dtype=np.float32)
            for s, ids in manifest.shards.items() for i in ids]
    images = len(held)
# VmHWM is this process image's own peak; ru_maxrss would also count the forking parent (see docstring)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"images": images, "maxrss_kb": peak}))
"""


def candidates_graph(path: Path) -> Path:
    """(N,3,H,W) float32 -> boxes (N,K,4) and scores (N,K,80) that depend on each image's mean."""
    init = [
        helper.make_tensor("shape", onnx.TensorProto.INT64, [3], [-1, 1, 1]),
        onnx.numpy_helper.from_array(np.ones((1, K, 4), np.float32), "box_ones"),
        onnx.numpy_helper.from_array(np.linspace(-1, 1, K * 80, dtype=np.float32).reshape(1, K, 80), "ramp"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m4"], keepdims=1, axes=[1, 2, 3]),
        helper.make_node("Reshape", ["m4", "shape"], ["m"]),
        helper.make_node("Mul", ["m", "box_ones"], ["boxes"]),
        helper.make_node("Add", ["m", "ramp"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "candidates",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, H, W])],
        [
            helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, ["N", K, 4]),
            helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", K, 80]),
        ],
        init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def make_run(root: Path, count: int) -> RunLayout:
    layout = RunLayout.at(root)
    rng = np.random.default_rng(count)
    shards: dict[str, list[int]] = {}
    images = []
    for index in range(count):
        shard = shard_name(index // SHARD_SIZE)
        shards.setdefault(shard, []).append(index + 1)
        layout.input_shard(shard).mkdir(parents=True, exist_ok=True)
        rng.random((3, H, W), dtype=np.float32).tofile(layout.input_shard(shard) / input_file_name(index + 1))
        images.append(
            ImageEntry(index + 1, f"{index + 1}.jpg", shard, Geometry(W, H, 1.0, 1.0, W, H, (0, 0, 0, 0)))
        )
    Manifest(
        "letterbox", "float32", H, W, SHARD_SIZE, "/coco", "/coco/a.json", "/coco/val2017", images, shards
    ).write(layout.manifest)
    return layout


def measure(layout: RunLayout, model: Path, mode: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(layout.root), str(model), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunLayout, RunLayout]:
    root = tmp_path_factory.mktemp("memory")
    model = candidates_graph(root / "candidates.onnx")
    return model, make_run(root / "small", SMALL), make_run(root / "large", LARGE)


def test_peak_memory_does_not_grow_with_the_number_of_images(runs: tuple[Path, RunLayout, RunLayout]) -> None:
    model, small, large = runs
    few, many = measure(small, model, "backend"), measure(large, model, "backend")
    assert (few["images"], many["images"]) == (SMALL, LARGE)
    input_growth_mb = (LARGE - SMALL) * BYTES_PER_IMAGE / 2**20  # ~84 MB more input, ~26 MB more outputs
    rss_growth_mb = (many["maxrss_kb"] - few["maxrss_kb"]) / 1024
    assert rss_growth_mb < 6, (
        f"peak RSS grew by {rss_growth_mb:.1f} MB ({few['maxrss_kb']} -> {many['maxrss_kb']} kB) for "
        f"{input_growth_mb:.0f} MB more input: the backend keeps more than one shard in memory"
    )
    # every shard was written in the shared layout, so the large run really processed all images
    assert len(list(large.outputs_dir("onnxruntime").glob("*/done.json"))) == LARGE // SHARD_SIZE


def test_the_measurement_sees_a_run_that_holds_every_input(runs: tuple[Path, RunLayout, RunLayout]) -> None:
    _, small, large = runs
    few, many = measure(small, Path("unused"), "control"), measure(large, Path("unused"), "control")
    growth_mb = (many["maxrss_kb"] - few["maxrss_kb"]) / 1024
    assert growth_mb > 0.9 * (LARGE - SMALL) * BYTES_PER_IMAGE / 2**20
