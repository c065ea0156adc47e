"""SIGKILL a step mid-build, then run it again (what a retry does): no orphan process, no leftover
temp file or build folder after the retry, and results identical to an uninterrupted run.

Each step runs as a real `gfocal` process (or the steps the DAG tasks call, in a child process) that
is killed once it has written part of its output. Inference has the same test on a real Celery
deployment (tests/integration/test_worker_loss.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from emulators.models import tiny_dets_model
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline import cli, steps
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.fileio import read_state_json, sha256_file

pytestmark = pytest.mark.slow

SIZE = ["--height", "320", "--width", "320"]


def leftovers(*folders: Path) -> list[str]:
    """Temps of atomic writers, build folders and staging areas anywhere below `folders`."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            name = path.name
            if name.endswith(".tmp") or name.startswith((".build-", ".trash-", ".staging")):
                found.append(str(path.relative_to(folder)))
    return sorted(found)


def kill_when(
    argv: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None, timeout: float = 300
) -> list[psutil.Process]:
    """Start `argv`, SIGKILL it as soon as `ready()`; returns the descendants it had then."""
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"{argv} finished (rc {process.returncode}) before it was killed"
            assert time.monotonic() < deadline, f"{argv} never reached the point to kill it"
            time.sleep(0.01)
        children = psutil.Process(process.pid).children(recursive=True)
        KILLED_CMDLINES[:] = [_cmdline(p) for p in children]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    return children


KILLED_CMDLINES: list[list[str]] = []  # the descendants' command lines at the moment of the last kill


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def assert_no_orphans(children: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(children, timeout=20)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after their parent was killed: {[p.cmdline() for p in alive]}"


def gfocal(*args: object) -> list[str]:
    return [sys.executable, "-m", "gfocal_pipeline.cli", *map(str, args)]


def files(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob(pattern))}


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("coco"), num_images=24, seed=5)


def test_preprocess_killed_mid_build_then_retried(coco: Path, tmp_path: Path) -> None:
    run, clean = tmp_path / "run", tmp_path / "clean"
    argv = ["preprocess", "--coco-root", coco, "--run-dir", run, *SIZE, "--workers", "1"]
    children = kill_when(gfocal(*argv), lambda: any((run / "inputs").rglob("*.bin")))
    assert_no_orphans(children)
    assert not (run / "manifest.json").exists()
    assert cli.main(list(map(str, argv))) == 0
    assert cli.main(["preprocess", "--coco-root", str(coco), "--run-dir", str(clean), *SIZE]) == 0
    assert leftovers(run) == []
    assert files(run / "inputs", "*.bin") == files(clean / "inputs", "*.bin")
    assert len(files(run / "inputs", "*.bin")) == 24


CACHED = {
    "height": 320,
    "width": 320,
    "policy": "letterbox",
    "dtype": "float32",
    "shard_size": 256,
    "workers": 1,
}


def _preprocess_into_cache(coco: Path, run: Path, work: Path) -> list[str]:
    code = (
        "import sys, json; from gfocal_pipeline import steps; "
        "steps.preprocess_step(sys.argv[1], sys.argv[2], work_dir=sys.argv[3], **json.loads(sys.argv[4]))"
    )
    return [sys.executable, "-c", code, str(coco), str(run), str(work), json.dumps(CACHED)]


def test_cached_preprocess_killed_mid_build_then_retried(coco: Path, tmp_path: Path) -> None:
    work, clean = tmp_path / "work", tmp_path / "clean"
    cache = work / "cache" / "inputs"

    def building() -> bool:
        return cache.is_dir() and any(
            d.name.startswith(".build-") and any(d.rglob("*.bin")) for d in cache.iterdir()
        )

    children = kill_when(_preprocess_into_cache(coco, work / "runs" / "a", work), building)
    assert_no_orphans(children)
    healed = steps.preprocess_step(coco, work / "runs" / "a", work_dir=work, **CACHED)
    fresh = steps.preprocess_step(coco, clean / "runs" / "a", work_dir=clean, **CACHED)
    assert healed["cache_key"] == fresh["cache_key"] and healed["cached"] is False
    assert leftovers(work) == []
    entry = healed["cache_key"]
    assert files(cache / entry, "*.bin") == files(clean / "cache" / "inputs" / entry, "*.bin")


def test_export_killed_mid_write_then_retried(random_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model" / "gfocal_portable.onnx"
    clean = tmp_path / "clean" / "gfocal_portable.onnx"
    argv = ["export", "--checkpoint", random_checkpoint, "--output", out, "--height", "64", "--width", "96"]
    out.parent.mkdir(parents=True)

    def writing() -> bool:
        return any(p.stat().st_size > 0 for p in out.parent.glob(f".{out.name}.*.tmp"))

    children = kill_when(gfocal(*argv), writing)
    assert_no_orphans(children)
    assert not out.exists() and list(out.parent.glob("*.tmp"))  # what the killed writer left
    assert cli.main(list(map(str, argv))) == 0
    argv[argv.index("--output") + 1] = clean
    assert cli.main(list(map(str, argv))) == 0
    assert leftovers(out.parent) == []
    assert sha256_file(out) == sha256_file(clean)


def is_atc(process: psutil.Process) -> bool:
    """The (emulated) atc converting: `... atc --framework=5 ...`."""
    try:
        args = process.cmdline()
        return process.status() != psutil.STATUS_ZOMBIE and any(a.startswith("--framework") for a in args)
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Toolkit:
    return make_toolkit(tmp_path_factory.mktemp("cann"))


def test_convert_killed_while_atc_runs_then_retried(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", 32, 32)
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["convert", "--run-dir", run, "--onnx", onnx_file, "--cache-dir", cache]
    argv += ["--soc-version", "Ascend310P3", "--cann-set-env", kit.set_env]
    hang = {**os.environ, "GFOCAL_EMULATOR_FAULT": "atc_hang"}

    def atc_running() -> bool:
        return any(is_atc(p) for p in psutil.process_iter())

    children = kill_when(gfocal(*argv), atc_running, env=hang)
    assert any(any(a.startswith("--framework") for a in args) for args in KILLED_CMDLINES), KILLED_CMDLINES
    assert_no_orphans(children)  # the watchdog stopped atc when its parent died
    assert cli.main(list(map(str, argv))) == 0
    assert leftovers(run, cache) == []
    argv[argv.index("--cache-dir") + 1] = tmp_path / "clean-cache"
    argv[argv.index("--run-dir") + 1] = tmp_path / "clean-run"
    assert cli.main(list(map(str, argv))) == 0
    healed = read_state_json(run / "model" / "convert.json", "convert record")
    fresh = read_state_json(tmp_path / "clean-run" / "model" / "convert.json", "convert record")
    assert healed["cache_key"] == fresh["cache_key"]
    # the emulated OM is a zip (member timestamps differ): the same members with the same bytes
    assert om_members(Path(healed["om_path"])) == om_members(Path(fresh["om_path"]))


def om_members(path: Path) -> dict[str, object]:
    """The emulated OM's graphs (bytes) and metadata, less when and where it was written."""
    with zipfile.ZipFile(path) as om:
        members: dict[str, object] = {name: om.read(name) for name in sorted(om.namelist())}
    meta = json.loads(members.pop("om.json"))
    meta.pop("created", None)
    members["om.json"] = {k: v for k, v in meta.items() if "/" not in json.dumps(v)}
    return members
