"""The nightly's caches through the steps: inputs, ONNX and the PyTorch reference are built once and
reused; a changed image redoes exactly its input and its shard's reference; concurrent builders
share one entry; with the inputs cache off the disk holds only the shard in flight."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import read_only_tree

from gfocal_pipeline import steps
from gfocal_pipeline.cache_store import CacheError
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import load_manifest

SMALL = {"policy": "letterbox", "dtype": "float32", "height": 64, "width": 96, "shard_size": 3}


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    return make_demo_coco(tmp_path / "coco", num_images=7, seed=3)


def entries(work: Path, kind: str) -> list[Path]:
    folder = work / "cache" / kind
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def preprocess(coco: Path, work: Path, run: str, **extra: object) -> dict:
    return steps.preprocess_step(coco, work / "runs" / run, work_dir=work, workers=2, **{**SMALL, **extra})


def change_image(coco: Path, file_name: str) -> None:
    path = coco / "val2017" / file_name
    img = cv2.imread(str(path))
    img[: img.shape[0] // 2] = 255 - img[: img.shape[0] // 2]  # same size, other content
    assert cv2.imwrite(str(path), img)


def test_inputs_are_built_once_and_the_run_holds_no_copy(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = preprocess(coco, work, "night1")
    second = preprocess(coco, work, "night2")
    assert first["cached"] is False and second["cached"] is True
    assert first["cache_key"] == second["cache_key"] and len(entries(work, "inputs")) == 1
    for night in ("night1", "night2"):
        run = RunLayout.at(work / "runs" / night)
        assert not run.inputs_dir.exists()
        manifest = load_manifest(run.manifest)
        assert manifest.inputs_folder.is_relative_to(work / "cache" / "inputs")
        assert all(entry.sha256 for entry in manifest.images)
        assert (run.uses_dir / f"inputs-{first['cache_key']}").is_file()
    # what the cached entry holds is what preprocessing writes into a run directory without a cache
    plain = steps.preprocess_step(coco, tmp_path / "plain", workers=1, **SMALL)
    manifest = load_manifest(work / "runs" / "night2" / "manifest.json")
    for entry in manifest.images:
        name = input_file_name(entry.image_id)
        cached = (manifest.input_dir(entry.shard) / name).read_bytes()
        assert cached == (Path(plain["manifest_path"]).parent / "inputs" / entry.shard / name).read_bytes()


def test_a_changed_image_redoes_exactly_its_input(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    preprocess(coco, work, "night1")
    old = load_manifest(work / "runs" / "night1" / "manifest.json")
    changed = old.images[4]
    change_image(coco, changed.file_name)
    again = preprocess(coco, work, "night2")
    assert again["cached"] is False and len(entries(work, "inputs")) == 2
    new = load_manifest(work / "runs" / "night2" / "manifest.json")
    assert new.dataset_id != old.dataset_id
    for before, after in zip(old.images, new.images, strict=True):
        name = input_file_name(before.image_id)
        a, b = old.input_dir(before.shard) / name, new.input_dir(after.shard) / name
        if before.image_id == changed.image_id:
            assert before.sha256 != after.sha256 and a.read_bytes() != b.read_bytes()
        else:  # linked from the first entry, not computed again
            assert os.stat(a).st_ino == os.stat(b).st_ino
    digests = {shard: (old.shard_digest(shard), new.shard_digest(shard)) for shard in old.shards}
    assert [shard for shard, (x, y) in digests.items() if x != y] == [changed.shard]


def _build(coco: str, work: str, run: str) -> str:
    return steps.preprocess_step(coco, Path(work) / run, work_dir=work, workers=1, **SMALL)["cache_key"]


def test_two_builders_of_one_entry_both_succeed_with_one_entry(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        keys = pool.starmap(_build, [(str(coco), str(work), "a"), (str(coco), str(work), "b")])
    assert keys[0] == keys[1] and len(entries(work, "inputs")) == 1
    leftovers = [
        p.name for p in (work / "cache" / "inputs").iterdir() if p.name.startswith((".build", ".trash"))
    ]
    assert leftovers == []
    for run in ("a", "b"):
        manifest = load_manifest(work / run / "manifest.json")
        assert all(
            manifest.input_dir(e.shard).joinpath(input_file_name(e.image_id)).is_file()
            for e in manifest.images
        )


def test_a_damaged_entry_is_rebuilt_not_used(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = preprocess(coco, work, "night1")
    (entry,) = entries(work, "inputs")
    victim = next((entry / "inputs").rglob("*.bin"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    second = preprocess(coco, work, "night2")
    assert second["cached"] is False and second["cache_key"] == first["cache_key"]
    assert victim.stat().st_size == load_manifest(work / "runs" / "night2" / "manifest.json").bytes_per_image


def test_a_same_size_corruption_of_a_cached_input_is_found_and_rebuilt(
    coco: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    first = preprocess(coco, work, "night1")
    (entry,) = entries(work, "inputs")
    victim = sorted((entry / "inputs").rglob("*.bin"))[2]
    good = victim.read_bytes()
    victim.write_bytes(good[:1000] + bytes([good[1000] ^ 0x01]) + good[1001:])  # one bit, same size
    second = preprocess(coco, work, "night2")
    assert second["cached"] is False and second["cache_key"] == first["cache_key"]
    assert victim.read_bytes() == good
    relative = victim.relative_to(entry).as_posix()
    assert f"has a changed {relative} (its crc32 differs" in caplog.text


def test_an_entry_recorded_without_checksums_is_rebuilt_once(coco: Path, tmp_path: Path) -> None:
    """An entry of the size-only format (before content checks) cannot be verified: rebuilt, then reused."""
    work = tmp_path / "work"
    first = preprocess(coco, work, "night1")
    (entry,) = entries(work, "inputs")
    record = json.loads((entry / "cache.json").read_text())
    for info in record["files"].values():
        del info["crc32"]
    (entry / "cache.json").write_text(json.dumps(record))
    second = preprocess(coco, work, "night2")
    third = preprocess(coco, work, "night3")
    assert (second["cached"], third["cached"]) == (False, True)
    assert first["cache_key"] == second["cache_key"] == third["cache_key"]
    assert all("crc32" in info for info in json.loads((entry / "cache.json").read_text())["files"].values())


def test_a_damaged_input_of_the_donor_entry_is_computed_again_not_linked(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    preprocess(coco, work, "night1")
    old = load_manifest(work / "runs" / "night1" / "manifest.json")
    damaged, changed = old.images[1], old.images[4]
    source = old.input_dir(damaged.shard) / input_file_name(damaged.image_id)
    good = source.read_bytes()
    source.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # the donor's copy, same size
    change_image(coco, changed.file_name)
    preprocess(coco, work, "night2")
    new = load_manifest(work / "runs" / "night2" / "manifest.json")
    rebuilt = new.input_dir(new.by_id()[damaged.image_id].shard) / input_file_name(damaged.image_id)
    assert rebuilt.read_bytes() == good and os.stat(rebuilt).st_ino != os.stat(source).st_ino
    other = old.images[0]
    linked = new.input_dir(new.by_id()[other.image_id].shard) / input_file_name(other.image_id)
    assert (
        os.stat(linked).st_ino == os.stat(old.input_dir(other.shard) / input_file_name(other.image_id)).st_ino
    )


def test_a_read_only_inputs_cache_serves_its_valid_entry(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = preprocess(coco, work, "night1")
    (work / "runs").mkdir(exist_ok=True)
    with read_only_tree(work / "cache"):
        second = preprocess(coco, work, "night2")
        assert second["cached"] is True and second["cache_key"] == first["cache_key"]
        manifest = load_manifest(work / "runs" / "night2" / "manifest.json")
        assert all(
            (manifest.input_dir(e.shard) / input_file_name(e.image_id)).is_file() for e in manifest.images
        )
        with pytest.raises(CacheError) as info:  # another format: a new entry, which cannot be written
            preprocess(coco, work, "night3", dtype="uint8")
        assert "cannot be written" in str(info.value) and "cache_inputs=false" in str(info.value)


@pytest.fixture(scope="module")
def onnx_model(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("onnxwork")
    run = work / "runs" / "r1"
    result = steps.export_step(run, "portable", random_checkpoint, height=64, width=96, work_dir=work)
    return work, result


@pytest.mark.slow
def test_export_is_reused_and_stays_in_the_cache(
    onnx_model: tuple[Path, dict], random_checkpoint: Path
) -> None:
    work, first = onnx_model
    second = steps.export_step(
        work / "runs" / "r2", "portable", random_checkpoint, height=64, width=96, work_dir=work
    )
    assert first["cached"] is False and second["cached"] is True
    assert second["onnx_sha256"] == first["onnx_sha256"] and second["onnx_path"] == first["onnx_path"]
    assert Path(second["onnx_path"]).is_relative_to(work / "cache" / "onnx")
    assert not list((work / "runs").rglob("*.onnx"))
    other = steps.export_step(
        work / "runs" / "r3", "portable", random_checkpoint, height=64, width=128, work_dir=work
    )
    assert other["cached"] is False and other["cache_key"] != first["cache_key"]


@pytest.mark.slow
def test_reference_runs_once_per_checkpoint_and_inputs(
    coco: Path, tmp_path: Path, random_checkpoint: Path
) -> None:
    work = tmp_path / "work"
    options = {"model": str(random_checkpoint), "batch_size": 1, "device": "cpu", "work_dir": work}
    results = {}
    for night in ("night1", "night2"):
        shards = preprocess(coco, work, night)["shards"]
        results[night] = [steps.infer_step(work / "runs" / night, s, "torch", **options) for s in shards]
    assert [r["cached"] for r in results["night1"]] == [False] * 3
    assert [r["cached"] for r in results["night2"]] == [True] * 3
    for shard in ("00000", "00001", "00002"):
        a = RunLayout.at(work / "runs" / "night1").output_shard("torch", shard) / "outputs.npz"
        b = RunLayout.at(work / "runs" / "night2").output_shard("torch", shard) / "outputs.npz"
        assert a.read_bytes() == b.read_bytes()
    # one changed image: only its shard's reference runs again
    manifest = load_manifest(work / "runs" / "night1" / "manifest.json")
    change_image(coco, manifest.images[4].file_name)
    shards = preprocess(coco, work, "night3")["shards"]
    night3 = [steps.infer_step(work / "runs" / "night3", s, "torch", **options) for s in shards]
    assert [r["cached"] for r in night3] == [s != manifest.images[4].shard for s in shards]
    for run in ("night1", "night2", "night3"):
        evaluation = steps.evaluate_step(work / "runs" / run, "torch")
        assert evaluation["images"] == 7


def test_with_the_inputs_cache_off_each_task_builds_and_deletes_its_shard(
    coco: Path, tmp_path: Path, onnx_model: tuple[Path, dict]
) -> None:
    _, exported = onnx_model
    work = tmp_path / "work"
    off = preprocess(coco, work, "off", cache_inputs=False)
    assert off["inputs"] == "per-task" and entries(work, "inputs") == []
    preprocess(coco, work, "on")
    run_off, run_on = RunLayout.at(work / "runs" / "off"), RunLayout.at(work / "runs" / "on")
    assert not run_off.inputs_dir.exists()
    peak = 0
    for shard in off["shards"]:
        steps.infer_step(run_off.root, shard, "onnxruntime", model=exported["onnx_path"])
        steps.infer_step(run_on.root, shard, "onnxruntime", model=exported["onnx_path"])
        peak = max(peak, sum(p.stat().st_size for p in run_off.root.rglob("*.bin")))
        assert peak == 0  # deleted when the task finished
    for shard in off["shards"]:
        a = np.load(run_off.output_shard("onnxruntime", shard) / "outputs.npz")
        b = np.load(run_on.output_shard("onnxruntime", shard) / "outputs.npz")
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    shutil.rmtree(run_on.root)


def test_a_retry_after_the_inputs_were_evicted_rebuilds_them(
    coco: Path, tmp_path: Path, onnx_model: tuple[Path, dict]
) -> None:
    _, exported = onnx_model
    work = tmp_path / "work"
    shards = preprocess(coco, work, "night")["shards"]
    run = RunLayout.at(work / "runs" / "night")
    first = steps.infer_step(run.root, shards[0], "onnxruntime", model=exported["onnx_path"])
    before = (Path(first["output_dir"]) / "outputs.npz").read_bytes()
    shutil.rmtree(run.root / "outputs")
    (entry,) = entries(work, "inputs")
    shutil.rmtree(entry)  # evicted while the run still needs it
    again = steps.infer_step(run.root, shards[0], "onnxruntime", model=exported["onnx_path"])
    assert (Path(again["output_dir"]) / "outputs.npz").read_bytes() == before
    assert not run.inputs_dir.joinpath("onnxruntime", shards[0]).exists()
