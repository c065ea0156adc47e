"""ONNX Runtime's optimized CPU graph is kept beside the model and reused by later sessions: outputs
are bit for bit those of a freshly optimized session; a damaged, stale or unwritable copy changes
nothing but the time."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from gfocal_pipeline import steps
from gfocal_pipeline.backends.onnxruntime import OPTIMIZED_DIR, OnnxRuntimeBackend, optimized_graph_path


@pytest.fixture(scope="module")
def portable(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("optimized") / "run"
    return Path(steps.export_step(run, "portable", random_checkpoint, height=64, width=96)["onnx_path"])


def _outputs(backend: OnnxRuntimeBackend, seed: int = 0) -> dict[str, np.ndarray]:
    batch = np.random.default_rng(seed).standard_normal((1, 3, 64, 96), dtype=np.float32)
    return backend.session.run(None, {backend.input.name: batch})


def test_the_optimized_graph_is_kept_and_gives_identical_outputs(portable: Path) -> None:
    kept = optimized_graph_path(portable)
    kept.unlink(missing_ok=True)
    fresh = OnnxRuntimeBackend(portable, cache_optimized_graph=False)
    assert not kept.exists()
    first = OnnxRuntimeBackend(portable)  # optimizes and keeps the graph
    assert kept.is_file() and not list(kept.parent.glob("*.tmp"))
    second = OnnxRuntimeBackend(portable)  # loads the kept graph, optimizations off
    assert second.output_names == fresh.output_names and second.identity() == fresh.identity()
    for seed in range(3):
        for a, b, c in zip(_outputs(fresh, seed), _outputs(first, seed), _outputs(second, seed), strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_a_damaged_copy_is_replaced(portable: Path, caplog: pytest.LogCaptureFixture) -> None:
    OnnxRuntimeBackend(portable)
    kept = optimized_graph_path(portable)
    kept.write_bytes(kept.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        backend = OnnxRuntimeBackend(portable)
    assert "unusable" in caplog.text and str(kept) in caplog.text
    assert kept.stat().st_size > 1000  # optimized and kept again
    reference = OnnxRuntimeBackend(portable, cache_optimized_graph=False)
    for a, b in zip(_outputs(reference), _outputs(backend), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_changed_model_gets_its_own_copy(portable: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(portable.read_bytes())
    OnnxRuntimeBackend(model)
    before = optimized_graph_path(model)
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # e.g. re-exported in place
    assert optimized_graph_path(model) != before
    OnnxRuntimeBackend(model)
    assert len(list((tmp_path / OPTIMIZED_DIR).glob("*.onnx"))) == 2


def test_an_unwritable_place_only_costs_time(portable: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(portable.read_bytes())
    (tmp_path / OPTIMIZED_DIR).write_text("a file where the folder would go")
    backend = OnnxRuntimeBackend(model)
    reference = OnnxRuntimeBackend(model, cache_optimized_graph=False)
    for a, b in zip(_outputs(reference), _outputs(backend), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_model_digest_is_kept_with_the_graph(
    portable: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gfocal_pipeline.backends import onnxruntime as module
    from gfocal_pipeline.fileio import sha256_file

    model = tmp_path / "model.onnx"
    model.write_bytes(portable.read_bytes())
    first = OnnxRuntimeBackend(model)
    kept = optimized_graph_path(model).with_suffix(".sha256")
    assert kept.read_text().strip() == sha256_file(model) == first.identity()["model_sha256"]

    def no_hashing(path: object) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(module, "sha256_file", no_hashing)
    assert OnnxRuntimeBackend(model).identity() == first.identity()
    kept.write_text("not a digest\n")  # damaged: hashed again (and kept again)
    monkeypatch.setattr(module, "sha256_file", sha256_file)
    assert OnnxRuntimeBackend(model).identity() == first.identity()
    assert kept.read_text().strip() == sha256_file(model)
    data = bytearray(model.read_bytes())
    model.write_bytes(bytes(data))  # rewritten: a new mtime, so a new key and a new hash
    assert optimized_graph_path(model).with_suffix(".sha256") != kept
