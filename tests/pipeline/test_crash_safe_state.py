"""Crash-safe state: a damaged marker, outputs or timing file means "not done" and a retry heals it;
temps of killed writers are reclaimed; one writer per step and run directory, the second fails fast
naming the holder, and a killed holder never blocks its retry."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gfocal_pipeline import steps
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import DatasetError, GfocalError, StepBusyError
from gfocal_pipeline.fileio import (
    atomic_path,
    owner_is_dead,
    owner_tag,
    read_state_json,
    read_state_npz,
    reclaim_temps,
    step_lock,
)
from gfocal_pipeline.layout import RunLayout, shard_done

SMALL = {"policy": "letterbox", "dtype": "float32", "height": 64, "width": 96, "shard_size": 4}


def _hold_lock(run_dir: str, step: str, ready: multiprocessing.Event) -> None:
    with step_lock(run_dir, step):
        ready.set()
        time.sleep(120)


@pytest.fixture()
def holder(tmp_path: Path):
    """Start a process holding a step lock; yields (start(step) -> process)."""
    context = multiprocessing.get_context("spawn")
    started: list[multiprocessing.Process] = []

    def start(run_dir: Path, step: str) -> multiprocessing.Process:
        ready = context.Event()
        process = context.Process(target=_hold_lock, args=(str(run_dir), step, ready), daemon=True)
        process.start()
        assert ready.wait(60), "the lock holder did not start"
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.join(10)


def test_damaged_json_is_not_done_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "done.json"
    assert read_state_json(path, "marker") is None  # missing
    path.write_text('{"images": 3')  # a writer killed mid-write (without atomic rename)
    with caplog.at_level(logging.WARNING):
        assert read_state_json(path, "marker") is None
    assert str(path) in caplog.text and "not done" in caplog.text
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert read_state_json(path, "marker") is None
    path.write_text('{"images": 3}')
    assert read_state_json(path, "marker") == {"images": 3}


def test_damaged_npz_is_not_done(tmp_path: Path) -> None:
    path = tmp_path / "outputs.npz"
    np.savez(path, image_ids=np.arange(5), dets=np.ones((5, 100, 5), np.float32))
    assert read_state_npz(path, "outputs")["image_ids"].tolist() == [0, 1, 2, 3, 4]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_state_npz(path, "outputs") is None
    path.write_bytes(b"")
    assert read_state_npz(path, "outputs") is None


def test_shard_done_rejects_damaged_marker_or_outputs(tmp_path: Path) -> None:
    out = tmp_path / "00000"
    out.mkdir()
    np.savez(out / "outputs.npz", image_ids=np.arange(2))
    (out / "done.json").write_text(json.dumps({"images": 2, "kind": "dets"}))
    assert shard_done(out) == {"images": 2, "kind": "dets"}
    for bad in ("{", "[1, 2]", '{"images": "two"}', ""):
        (out / "done.json").write_text(bad)
        assert shard_done(out) is None, bad
    (out / "done.json").write_text(json.dumps({"images": 2, "kind": "dets"}))
    (out / "outputs.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert shard_done(out) is None


def test_reclaim_removes_only_the_named_targets_temps(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"x" * 100)
        raise RuntimeError  # an ordinary failure cleans up after itself
    assert not list(tmp_path.iterdir())
    left = tmp_path / ".model.onnx.abc123.tmp"  # what a SIGKILLed writer leaves
    other = tmp_path / ".summary.json.def456.tmp"
    left.write_bytes(b"x" * 100)
    other.write_text("{}")
    assert reclaim_temps(tmp_path, ["model.onnx"]) == [left]
    assert other.exists() and not left.exists()
    assert reclaim_temps(tmp_path) == [other]
    assert reclaim_temps(tmp_path / "missing") == []


def test_a_second_writer_fails_fast_naming_the_holder(tmp_path: Path, holder) -> None:
    run = tmp_path / "run"
    process = holder(run, "preprocess")
    started = time.perf_counter()
    with pytest.raises(StepBusyError) as err, step_lock(run, "preprocess"):
        pass
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert f"pid {process.pid}" in message and "preprocess" in message and str(run) in message
    with step_lock(run, "infer-onnxruntime-00000"):  # other steps of the same run are free
        pass
    os.kill(process.pid, signal.SIGKILL)  # the holder dies: its lock goes with it
    process.join(10)
    with step_lock(run, "preprocess"):
        pass


def test_preprocess_into_a_busy_run_directory_writes_nothing(tmp_path: Path, holder) -> None:
    coco = make_demo_coco(tmp_path / "coco", num_images=3, seed=1)
    run = tmp_path / "run"
    holder(run, "preprocess")
    with pytest.raises(StepBusyError, match="already running"):
        steps.preprocess_step(coco, run, workers=1, **SMALL)
    assert not (run / "manifest.json").exists() and not (run / "inputs").exists()


@pytest.fixture(scope="module")
def onnx_run(
    random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, list[str]]:
    """A preprocessed run (7 images, 2 shards) and its portable ONNX."""
    root = tmp_path_factory.mktemp("crash")
    coco = make_demo_coco(root / "coco", num_images=7, seed=2)
    run = root / "run"
    shards = steps.preprocess_step(coco, run, workers=1, **SMALL)["shards"]
    exported = steps.export_step(run, "portable", random_checkpoint, height=64, width=96)
    return run, exported["onnx_path"], shards


def _infer(run: Path, model: str, shard: str) -> dict:
    return steps.infer_step(run, shard, "onnxruntime", model=model)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["done.json", "outputs.npz", "timing"])
def test_a_damaged_shard_is_recomputed_not_a_crash(
    onnx_run: tuple[Path, str, list[str]], damage: str
) -> None:
    run, model, shards = onnx_run
    layout = RunLayout.at(run)
    shard = shards[0]
    first = _infer(run, model, shard)
    outputs = layout.output_shard("onnxruntime", shard) / "outputs.npz"
    reference = read_state_npz(outputs, "outputs")
    assert _infer(run, model, shard)["reused"] is True
    target = {
        "done.json": layout.output_shard("onnxruntime", shard) / "done.json",
        "outputs.npz": outputs,
        "timing": layout.timing_file("onnxruntime", shard),
    }[damage]
    target.write_bytes(target.read_bytes()[:20])  # e.g. a disk that filled up under a non-atomic tool
    again = _infer(run, model, shard)
    assert again["reused"] is False and again["images"] == first["images"]
    healed = read_state_npz(outputs, "outputs")
    assert healed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(healed[name], reference[name])


@pytest.mark.slow
def test_killed_writers_temps_are_reclaimed_by_the_next_run_of_the_step(
    onnx_run: tuple[Path, str, list[str]],
) -> None:
    run, model, shards = onnx_run
    layout = RunLayout.at(run)
    shard = shards[-1]
    out = layout.output_shard("onnxruntime", shard)
    out.mkdir(parents=True, exist_ok=True)
    layout.timing_dir("onnxruntime").mkdir(parents=True, exist_ok=True)
    stale = [out / ".outputs.npz.k1ll3d.tmp", layout.timing_dir("onnxruntime") / f".{shard}.json.k1ll3d.tmp"]
    other_shard = layout.timing_dir("onnxruntime") / f".{shards[0]}.json.busy.tmp"  # not this task's
    for path in [*stale, other_shard]:
        path.write_bytes(b"\0" * 1000)
    _infer(run, model, shard)
    assert not any(path.exists() for path in stale)
    assert other_shard.exists()
    other_shard.unlink()


@pytest.mark.slow
def test_evaluation_names_a_damaged_timing_file(
    onnx_run: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    run, model, shards = onnx_run
    for shard in shards:
        _infer(run, model, shard)
    timing = RunLayout.at(run).timing_file("onnxruntime", shards[1])
    saved = timing.read_bytes()
    timing.write_text("{")
    try:
        with pytest.raises(DatasetError, match=rf"timing file .*{shards[1]}\.json.* is damaged.*{shards[1]}"):
            steps.evaluate_step(run, "onnxruntime", allow_missing=True)
        assert not (RunLayout.at(run).eval_dir("onnxruntime") / "stats.json").exists()
    finally:
        timing.write_bytes(saved)


def test_a_writer_removes_only_dead_writers_temps_of_its_target(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().rsplit("-", 1)[0]
    target = tmp_path / "model.onnx"
    killed = tmp_path / f".model.onnx.{host}-{dead.pid}.abc123.tmp"  # a SIGKILLed writer's
    live = tmp_path / f".model.onnx.{host}-{os.getppid()}.def456.tmp"  # a writer still running
    remote = tmp_path / f".model.onnx.otherhost-{dead.pid}.ghi789.tmp"  # another host: unknown
    other = tmp_path / f".summary.json.{host}-{dead.pid}.jkl012.tmp"  # another target
    for path in (killed, live, remote, other):
        path.write_bytes(b"x")
    assert owner_is_dead(killed) and not owner_is_dead(live) and not owner_is_dead(remote)
    with atomic_path(target) as tmp:
        assert owner_tag() in tmp.name
        tmp.write_bytes(b"graph")
    assert target.read_bytes() == b"graph"
    assert not killed.exists() and live.exists() and remote.exists() and other.exists()


@pytest.mark.parametrize("content", [None, "{", '{"stats": 3}'], ids=["missing", "truncated", "not-results"])
def test_gate_on_missing_or_damaged_results_says_to_evaluate(tmp_path: Path, content: str | None) -> None:
    stats = RunLayout.at(tmp_path).eval_dir("onnxruntime") / "stats.json"
    if content is not None:
        stats.parent.mkdir(parents=True)
        stats.write_text(content)
    with pytest.raises(
        GfocalError, match=r"stats\.json.*(damaged|not found).*gfocal eval --backend onnxruntime"
    ):
        steps.cli_history_record(tmp_path, "onnxruntime", run_id=None, device="cpu", precision="fp32")
