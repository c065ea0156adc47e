"""Preprocessing inside a daemonic process, as in a Celery prefork pool child (which may not have
children): parallel, no child process, the same bytes as a serial run."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.preprocess import preprocess

SHAPE = {"height": 96, "width": 128, "shard_size": 3, "max_images": 7}


def _in_daemon(coco: str, out: str, dtype: str, queue: multiprocessing.Queue) -> None:
    """Runs in the daemonic child: preprocess with 2 workers; report (threads seen, children, error)."""
    import psutil

    seen: set[str] = set()
    original = threading.Thread.start

    def spy(thread: threading.Thread) -> None:
        seen.add(thread.name)
        original(thread)

    threading.Thread.start = spy  # type: ignore[method-assign]
    try:
        preprocess(coco, out, workers=2, dtype=dtype, **SHAPE)
        queue.put((sorted(seen), len(psutil.Process().children(recursive=True)), ""))
    except BaseException as exc:
        queue.put(([], -1, f"{type(exc).__name__}: {exc}"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("coco") / "coco", num_images=8, seed=0)


def _bins(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "inputs").rglob("*.bin"))}


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_preprocess_runs_in_a_daemonic_worker_with_the_serial_bytes(coco: Path, tmp_path: Path, dtype: str):
    serial = tmp_path / "serial"
    preprocess(coco, serial, workers=1, dtype=dtype, **SHAPE)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    parallel = tmp_path / "parallel"
    child = context.Process(target=_in_daemon, args=(str(coco), str(parallel), dtype, queue), daemon=True)
    child.start()
    threads, children, error = queue.get(timeout=120)
    child.join(timeout=30)
    assert error == "", error
    assert child.exitcode == 0
    assert children == 0  # no child processes of the daemonic worker
    assert [name for name in threads if name.startswith("gfocal-preprocess")], threads  # really parallel
    assert (parallel / "manifest.json").is_file()
    expected = _bins(serial)
    assert len(expected) == SHAPE["max_images"]
    assert _bins(parallel) == expected


@pytest.mark.parametrize(("setting", "expected"), [("3", 3), ("", None)])
def test_preprocess_workers_come_from_the_workers_own_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: int | None
) -> None:
    """`[gfocal] preprocess_workers`, read where the task runs; empty = that worker's cores."""
    from gfocal_pipeline import steps
    from operators.pipeline import CocoPreprocessOperator

    seen: dict = {}

    def fake_step(coco_root: str, run_dir: str, **options: object) -> dict:
        seen.update(options)
        return {
            "images": 1,
            "shards": ["00000"],
            "shard_size": 1,
            "policy": "letterbox",
            "dtype": "float32",
            "cached": False,
            "inputs": "/x",
        }

    class Ti:
        def xcom_push(self, key: str, value: object) -> None:
            pass

    monkeypatch.setenv("AIRFLOW__GFOCAL__PREPROCESS_WORKERS", setting)
    monkeypatch.setattr(steps, "preprocess_step", fake_step)
    operator = CocoPreprocessOperator(task_id="preprocess", coco_root="/data/coco", run_dir="/data/run")
    assert operator.execute({"ti": Ti()}) == ["00000"]
    assert seen["workers"] == expected
    explicit = CocoPreprocessOperator(task_id="p2", coco_root="/data/coco", run_dir="/data/run", workers=1)
    explicit.execute({"ti": Ti()})
    assert seen["workers"] == 1  # an explicit argument wins


def test_a_bad_preprocess_workers_setting_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from operators.settings import load_settings

    monkeypatch.setenv("AIRFLOW__GFOCAL__PREPROCESS_WORKERS", "many")
    with pytest.raises(ValueError, match=r"\[gfocal\] preprocess_workers = 'many'"):
        load_settings()


def test_a_task_that_cannot_see_the_run_directory_fails_naming_it_and_the_mount(tmp_path: Path) -> None:
    from gfocal_pipeline.errors import GfocalError
    from operators.base import require_shared_paths

    class Task:
        task_id = "convert"
        run_dir = str(tmp_path / "run")
        onnx_path = str(tmp_path / "run" / "model" / "gfocal_ascend.onnx")

    with pytest.raises(GfocalError, match=r"run_dir '.*/run' .* does not exist on this worker") as info:
        require_shared_paths({"task": Task()})
    assert "gfocal-data at /data/gfocal" in str(info.value)
    (tmp_path / "run").mkdir()
    with pytest.raises(GfocalError, match=r"onnx_path '.*gfocal_ascend\.onnx'"):
        require_shared_paths({"task": Task()})
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "model" / "gfocal_ascend.onnx").write_bytes(b"onnx")
    require_shared_paths({"task": Task()})  # all visible: no error

    class Prepare:
        task_id = "prepare"
        run_dir = str(tmp_path / "not-yet")

    require_shared_paths({"task": Prepare()})  # prepare makes it
