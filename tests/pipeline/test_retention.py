"""Retention on real run directories and cache entries: what pruning keeps, what it never touches,
LRU eviction around the entries of runs in progress, dry runs, and the late-retry error."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from support import lock_held_by_a_child

from gfocal_pipeline.cache_store import Cache, dir_size
from gfocal_pipeline.errors import ConfigError, GfocalError
from gfocal_pipeline.retention import (
    PRUNED_FILE,
    RECENT_USE_S,
    RunPrunedError,
    cache_keys_in_use,
    check_not_pruned,
    find_runs,
    format_summary,
    gc,
    is_kept,
    prune_runs,
    small_report,
)

DAY = 86400.0
NOW = time.time()
SHARDS = ("00000", "00001")
BACKENDS = ("onnxruntime", "torch")
# bulk files of a run (relative path -> bytes): what pruning must remove
BULK = {
    "inputs/00000/000000000001.bin": 60_000,
    "inputs/00000/000000000002.bin": 60_000,
    "inputs/00001/000000000003.bin": 60_000,
    "model/gfocal_portable.onnx": 90_000,
    "model/gfocal.om": 80_000,
    "outputs/onnxruntime/00000/candidates.npz": 70_000,
    "outputs/onnxruntime/00001/candidates.npz": 70_000,
    "outputs/torch/00000/.outputs.npz.k2j3.tmp": 5_000,  # a killed atomic write
    "eval/onnxruntime/.detections.json.x1.tmp": 3_000,
    ".staging/00001/part.bin": 40_000,
    "convert_work/kernel_meta/op.o": 10_000,
}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _set_mtime(root: Path, when: float) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def make_run(
    work: Path,
    run_id: str,
    created: float,
    *,
    dag: str = "gfocal_onnxruntime",
    finished: bool = True,
    uses: tuple[str, ...] = (),
    run_json: bool = True,
) -> Path:
    """A realistic run directory (small results + BULK), every file dated `created`."""
    run = work / dag / run_id
    if run_json:
        _write(run / "run.json", json.dumps({"dag_id": dag, "run_id": run_id, "created": created}).encode())
    _write(run / "manifest.json", json.dumps({"images": 3, "shards": list(SHARDS)}).encode())
    for relative, size in BULK.items():
        _write(run / relative, os.urandom(size))
    _write(run / "model" / "convert.json", b'{"soc_version": "Ascend310P3"}')
    for backend in BACKENDS:
        for shard in SHARDS:
            out = run / "outputs" / backend / shard
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "outputs.npz", "wb") as handle:
                np.savez(handle, image_ids=np.arange(2), dets=np.ones((2, 100, 5), np.float32))
            _write(out / "done.json", b'{"images": 2}')
            _write(run / "timing" / backend / f"{shard}.json", b'{"latency_ms": [1.0]}')
        for name in ("detections.json", "stats.json", "per_class.csv"):
            _write(run / "eval" / backend / name, b"x" * 300)
    _write(run / "export.log", b"exported\n")
    _write(run / "logs" / "atc" / "atc.log", b"ATC run success\n")
    for use in uses:
        _write(run / "uses" / use, b'{"cached": true}')
    if finished:
        _write(run / "summary.json", b'{"AP": 0.4}')
    _set_mtime(run, created)
    return run


def files(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.lstat().st_size
        for p in root.rglob("*")
        if p.is_file() or p.is_symlink()
    }


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime) for p in root.rglob("*")}


def small_files(run: Path) -> set[str]:
    """What a pruned run must hold: exactly the small results."""
    return {name for name in files(run) if name not in BULK} | {PRUNED_FILE}


def test_is_kept_patterns() -> None:
    kept = [
        "summary.json",
        "run.json",
        "manifest.json",
        "uses/inputs-ab12",
        "eval/torch/per_class.csv",
        "timing/msame/00000.json",
        "outputs/msame/00003/outputs.npz",
        "outputs/msame/00003/done.json",
        "model/convert.json",
        "preprocess.log",
        "logs/atc/debug/atc.log",
        "model/atc.log",
    ]
    removed = [
        "inputs/00000/000000000001.bin",
        "model/gfocal.om",
        "model/gfocal_ascend.onnx",
        "model/sub/meta.json",
        "outputs/msame/00003/candidates.npz",
        "outputs/msame/00003/raw/out_0.bin",
        "outputs/msame/outputs.npz",
        ".staging/x",
        "eval/torch/.stats.json.ab.tmp",
        "summary.json.tmp",
        "scratch.npz",
    ]
    assert [name for name in kept if not is_kept(name)] == []
    assert [name for name in removed if is_kept(name)] == []


def test_prune_keeps_the_newest_whole_and_older_ones_to_their_small_results(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"scheduled__{n}", NOW - (10 - n) * DAY) for n in range(4)]
    before = {run: files(run) for run in runs}
    report = prune_runs(tmp_path, keep_runs=2)

    assert [item["path"] for item in report["pruned"]] == [str(runs[1]), str(runs[0])]
    assert report["kept"] == [str(runs[3]), str(runs[2])]
    for run in runs[2:]:
        assert files(run) == before[run]  # untouched
    for run in runs[:2]:
        assert set(files(run)) == small_files(runs[3])
        assert not (run / "inputs").exists() and not (run / ".staging").exists()
        assert not (run / "convert_work").exists()
        with np.load(run / "outputs" / "torch" / "00001" / "outputs.npz") as data:
            assert data["dets"].shape == (2, 100, 5)
        record = json.loads((run / PRUNED_FILE).read_text())
        assert record["complete"] is True and record["keep_runs"] == 2
        assert record["bytes_freed"] == sum(BULK.values()) == sum(before[run][name] for name in BULK)
        assert record["files_removed"] == len(BULK)
        assert record["removed"]["inputs/"] == {"files": 3, "bytes": 3 * 60_000}
        assert time.time() - record["pruned_at"] < 60 and "UTC" in record["pruned_at_utc"]
    freed = sum(sum(before[run][name] for name in BULK) for run in runs[:2])
    assert report["bytes_freed"] == freed
    assert report["bytes_before"] - report["bytes_after"] == freed
    assert report["bytes_after"] == sum(dir_size(run) for run in runs) - sum(
        (run / PRUNED_FILE).stat().st_size for run in runs[:2]
    )


def test_each_dag_keeps_its_own_newest_runs_ordered_by_created(tmp_path: Path) -> None:
    # names and mtimes disagree with run.json's "created": "created" decides
    a_old = make_run(tmp_path, "z_old", NOW - 9 * DAY)
    a_new = make_run(tmp_path, "a_new", NOW - 8 * DAY)
    os.utime(a_old, (NOW - DAY, NOW - DAY))
    b_only = make_run(tmp_path, "only", NOW - 30 * DAY, dag="gfocal_ascend_nightly")
    # without run.json (a CLI run dir): the directory's mtime orders it
    c_old = make_run(tmp_path, "c1", NOW - 6 * DAY, dag="cli", run_json=False)
    c_new = make_run(tmp_path, "c0", NOW - 5 * DAY, dag="cli", run_json=False)
    report = prune_runs(tmp_path, keep_runs=1)
    assert sorted(item["path"] for item in report["pruned"]) == sorted([str(a_old), str(c_old)])
    assert sorted(report["kept"]) == sorted([str(a_new), str(b_only), str(c_new)])


def test_work_dir_folders_that_are_not_runs_are_left_alone(tmp_path: Path) -> None:
    work = tmp_path / "work"
    make_run(work, "old", NOW - 9 * DAY)
    make_run(work, "new", NOW - 8 * DAY)
    _write(work / "demo" / "coco" / "val2017" / "1.jpg", b"j" * 5000)
    _write(work / "cache" / "inputs" / "k" / "manifest.json", b"{}")  # looks like a run
    _write(work / ".airflow" / "dag" / "r" / "summary.json", b"{}")
    # old runs reached through symbolic links (a run, a DAG folder) are not this work dir's
    elsewhere = make_run(tmp_path / "outside", "linked", NOW - 30 * DAY)
    (work / "gfocal_onnxruntime" / "link").symlink_to(elsewhere)
    (work / "linked_dag").symlink_to(elsewhere.parent)
    assert set(find_runs(work)) == {"gfocal_onnxruntime"}
    assert [run.path.name for run in find_runs(work)["gfocal_onnxruntime"]] == ["new", "old"]
    before = {path: snapshot(path) for path in (work / "demo", work / "cache", work / ".airflow", elsewhere)}
    report = prune_runs(work, keep_runs=1)
    assert [item["path"] for item in report["pruned"]] == [str(work / "gfocal_onnxruntime" / "old")]
    assert {path: snapshot(path) for path in before} == before


def test_protected_and_in_progress_runs_are_never_touched(tmp_path: Path) -> None:
    keep = make_run(tmp_path, "newest", NOW - DAY)
    current = make_run(tmp_path, "current", NOW - 3 * DAY, finished=False)
    running = make_run(tmp_path, "running", NOW - 4 * DAY, finished=False)
    (running / "outputs" / "onnxruntime" / "00001" / "done.json").touch()  # a task wrote just now
    failed = make_run(tmp_path, "failed", NOW - 5 * DAY, finished=False)  # unfinished, idle for days
    retouched = make_run(tmp_path, "retouched", NOW - 6 * DAY)
    (retouched / "export.log").touch()  # finished: a recent change does not keep it
    untouched = {run: snapshot(run) for run in (keep, current, running)}

    report = prune_runs(tmp_path, keep_runs=1, protect=[str(current)])
    assert report["kept"] == [str(keep)]
    assert report["protected"] == [str(current)]
    assert report["in_use"] == [str(running)]
    assert sorted(item["path"] for item in report["pruned"]) == sorted([str(failed), str(retouched)])
    assert {run: snapshot(run) for run in untouched} == untouched
    assert not (failed / "inputs").exists() and (failed / PRUNED_FILE).is_file()
    # a shorter grace makes the idle-for-seconds run prunable too
    again = prune_runs(tmp_path, 1, protect=[current], grace_s=0)
    assert [item["path"] for item in again["pruned"]] == [str(running)]


def test_second_pass_skips_pruned_directories(tmp_path: Path) -> None:
    make_run(tmp_path, "new", NOW - DAY)
    old = make_run(tmp_path, "old", NOW - 2 * DAY)
    first = prune_runs(tmp_path, keep_runs=1)
    assert len(first["pruned"]) == 1
    after_first = snapshot(old)
    second = prune_runs(tmp_path, keep_runs=1)
    assert second["pruned"] == [] and second["already_pruned"] == [str(old)]
    assert second["bytes_freed"] == 0 and second["bytes_before"] == first["bytes_after"]
    assert snapshot(old) == after_first


def test_an_interrupted_prune_is_finished_by_the_next_pass(tmp_path: Path) -> None:
    make_run(tmp_path, "new", NOW - DAY)
    old = make_run(tmp_path, "old", NOW - 2 * DAY)
    _write(old / PRUNED_FILE, json.dumps({"complete": False, "pruned_at_utc": "then"}).encode())
    with pytest.raises(RunPrunedError):  # a task starting meanwhile already refuses the directory
        check_not_pruned(old, "inputs")
    report = prune_runs(tmp_path, keep_runs=1)
    assert [item["path"] for item in report["pruned"]] == [str(old)]
    assert not (old / "inputs").exists() and json.loads((old / PRUNED_FILE).read_text())["complete"]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None])
def test_keep_runs_must_be_a_positive_integer(tmp_path: Path, bad: object) -> None:
    runs = [make_run(tmp_path, f"r{n}", NOW - (5 - n) * DAY) for n in range(3)]
    before = {run: snapshot(run) for run in runs}
    for call in (lambda: prune_runs(tmp_path, bad), lambda: gc(tmp_path, bad, 0)):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "[gfocal] keep_runs" in message and "--keep-runs" in message
        assert "integer >= 1" in message and repr(bad) in message
    assert {run: snapshot(run) for run in runs} == before


def test_symbolic_links_are_removed_never_followed(tmp_path: Path) -> None:
    make_run(tmp_path, "new", NOW - DAY)
    old = make_run(tmp_path, "old", NOW - 2 * DAY)
    target = tmp_path / "elsewhere"
    _write(target / "precious.bin", b"p" * 1000)
    (old / "model" / "linked").symlink_to(target)
    (old / "eval" / "onnxruntime" / "ref").symlink_to(target)  # kept (inside eval/), as a link
    prune_runs(tmp_path, keep_runs=1)
    assert not (old / "model" / "linked").is_symlink()
    assert (old / "eval" / "onnxruntime" / "ref").is_symlink()
    assert (target / "precious.bin").read_bytes() == b"p" * 1000


def test_hard_linked_files_are_counted_as_shared_not_freed(tmp_path: Path) -> None:
    make_run(tmp_path, "new", NOW - DAY)
    old = make_run(tmp_path, "old", NOW - 2 * DAY)
    om_cache = tmp_path / "cache" / "om" / "k"
    om_cache.mkdir(parents=True)
    os.link(old / "model" / "gfocal.om", om_cache / "gfocal.om")  # as the OM cache links it
    (result,) = prune_runs(tmp_path, keep_runs=1)["pruned"]
    assert result["bytes_shared"] == BULK["model/gfocal.om"]
    assert result["bytes_freed"] == sum(BULK.values()) - BULK["model/gfocal.om"]
    assert (om_cache / "gfocal.om").stat().st_size == result["bytes_shared"]


def test_check_not_pruned_names_the_run_the_date_and_the_fix(tmp_path: Path) -> None:
    make_run(tmp_path, "new", NOW - DAY)
    old = make_run(tmp_path, "old", NOW - 2 * DAY)
    check_not_pruned(old, "inputs")  # not pruned yet: fine
    prune_runs(tmp_path, keep_runs=1)
    record = json.loads((old / PRUNED_FILE).read_text())
    with pytest.raises(RunPrunedError) as info:
        check_not_pruned(old, "preprocessed inputs")
    message = str(info.value)
    assert isinstance(info.value, GfocalError) and str(old) in message
    assert record["pruned_at_utc"] in message and "keep_runs=1" in message
    assert "its preprocessed inputs was removed; trigger a new run" in message


# --------------------------------------------------------------------------------------------------
# the cache


def make_entries(work: Path, sizes: dict[str, int], last_used: dict[str, float]) -> dict[str, object]:
    """Cache entries named by their "n" key input, with the given payload sizes and last uses."""
    cache = Cache(work)
    entries = {}
    for name, size in sizes.items():
        kind = "reference" if name.startswith("ref") else "inputs"
        entry = cache.entry(kind, {"n": name}, verify="crc32")

        def build(tmp: Path, size: int = size) -> None:
            _write(tmp / "00000" / "payload.bin", b"\1" * size)

        entry.get_or_build(build)
        os.utime(entry.record_path, (last_used[name], last_used[name]))
        entries[name] = entry
    return entries


def test_gc_evicts_least_recently_used_first_but_never_an_entry_in_use(tmp_path: Path) -> None:
    sizes = {"a": 100_000, "b": 100_000, "c": 100_000, "ref": 100_000}
    used = {"a": NOW - 5 * DAY, "b": NOW - 4 * DAY, "c": NOW - 3 * DAY, "ref": NOW - 2 * DAY}
    entries = make_entries(tmp_path, sizes, used)
    key = {name: entry.key for name, entry in entries.items()}
    # the oldest entry is used by a run in progress, "b" only by an old finished run
    make_run(tmp_path, "running", NOW - DAY, finished=False, uses=(f"inputs-{key['a']}",))
    (tmp_path / "gfocal_onnxruntime" / "running" / "run.json").touch()
    make_run(tmp_path, "finished", NOW - 2 * DAY, uses=(f"inputs-{key['b']}",))
    assert cache_keys_in_use(tmp_path) == {key["a"]}
    sized = {name: dir_size(entry.path) for name, entry in entries.items()}

    # exactly what b + c free (record sizes differ by a byte or two with their timestamps)
    report = gc(tmp_path, keep_runs=5, cache_max_bytes=sum(sized.values()) - sized["b"] - sized["c"])
    evicted = [(item["kind"], item["key"]) for item in report["cache"]["evicted"]]
    assert evicted == [("inputs", key["b"]), ("inputs", key["c"])]  # LRU order, "a" skipped
    assert [item["bytes"] for item in report["cache"]["evicted"]] == [sized["b"], sized["c"]]
    assert entries["a"].path.is_dir() and entries["ref"].path.is_dir()
    assert not entries["b"].path.exists() and not entries["c"].path.exists()
    assert report["cache"]["in_use"] == [key["a"]]
    assert report["cache"]["bytes_before"] - report["cache"]["bytes_after"] == sized["b"] + sized["c"]
    assert report["cache"]["bytes_after"] == dir_size(tmp_path / "cache")
    assert report["totals"]["cache_bytes_freed"] == sized["b"] + sized["c"]

    # 0: everything but the entry in use goes
    report = gc(tmp_path, keep_runs=5, cache_max_bytes=0)
    assert [item["key"] for item in report["cache"]["evicted"]] == [key["ref"]]
    assert [entry.key for entry in Cache(tmp_path).entries()] == [key["a"]]


def test_gc_keeps_the_entries_of_the_current_run_and_recently_used_ones(tmp_path: Path) -> None:
    now = time.time()  # not the module's NOW: "recently used" is relative to when gc runs
    entries = make_entries(
        tmp_path, {"mine": 1000, "fresh": 1000, "old": 1000}, {"mine": now - DAY, "fresh": now, "old": now}
    )
    os.utime(entries["old"].record_path, (now - RECENT_USE_S - 60,) * 2)
    current = make_run(tmp_path, "current", now - 3 * DAY, uses=(f"inputs-{entries['mine'].key}",))
    report = gc(tmp_path, keep_runs=1, cache_max_bytes=0, protect=[current])
    assert [item["key"] for item in report["cache"]["evicted"]] == [entries["old"].key]
    assert entries["mine"].path.is_dir() and entries["fresh"].path.is_dir()


def test_dry_run_removes_nothing_and_predicts_the_real_run(tmp_path: Path) -> None:
    make_entries(tmp_path, {"a": 50_000, "b": 50_000}, {"a": NOW - 3 * DAY, "b": NOW - 2 * DAY})
    stale = tmp_path / "cache" / "inputs" / ".build-dead-1-x"
    _write(stale / "half.bin", b"h" * 7000)
    _set_mtime(stale, NOW - DAY)
    for n in range(3):
        make_run(tmp_path, f"r{n}", NOW - (10 - n) * DAY)
    before = snapshot(tmp_path)
    dry = gc(tmp_path, keep_runs=1, cache_max_bytes=60_000, dry_run=True)
    assert snapshot(tmp_path) == before
    assert dry["dry_run"] is True and dry["totals"]["runs_pruned"] == 2
    assert dry["totals"]["entries_evicted"] == 1 and dry["cache"]["stale"][0]["bytes"] == 7000
    assert format_summary(dry).startswith("would free ")

    real = gc(tmp_path, keep_runs=1, cache_max_bytes=60_000)
    assert not stale.exists()
    for key in ("runs_pruned", "entries_evicted", "run_bytes_freed", "cache_bytes_freed", "bytes_freed"):
        assert real["totals"][key] == dry["totals"][key], key
    assert real["cache"]["evicted"] == dry["cache"]["evicted"]
    assert real["bytes_before"] == dry["bytes_before"]
    # the real after-size, measured independently (the pruned.json records are the only additions)
    records = sum(p.stat().st_size for p in tmp_path.rglob(PRUNED_FILE))
    assert real["bytes_after"] == dir_size(tmp_path) - records
    assert json.loads(json.dumps(real)) == real  # JSON-able
    assert re.match(
        r"freed 1\.\d MB: 2 run directories pruned \(1\.1 MB\), 1 cache entries evicted \(5\d\.\d kB\)",
        format_summary(real),
    ), format_summary(real)


def test_small_report_caps_its_lists(tmp_path: Path) -> None:
    for n in range(25):
        make_run(tmp_path, f"r{n:02d}", NOW - (40 - n) * DAY)
    report = gc(tmp_path, keep_runs=1, cache_max_bytes=0)
    small = small_report(report, cap=20)
    assert small["runs_pruned"] == 24 and len(small["pruned"]) == 20 and small["truncated"] is True
    assert small["bytes_freed"] == report["totals"]["bytes_freed"] > 0
    assert len(json.dumps(small)) < 6000


def test_gc_on_an_empty_work_dir_frees_nothing_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    report = gc(tmp_path, keep_runs=3, cache_max_bytes=0)
    assert report["totals"]["bytes_freed"] == 0 and report["bytes_before"] == 0
    for missing in (tmp_path / "missing", tmp_path / "a-file"):
        if missing.name == "a-file":
            missing.write_text("x")
        with pytest.raises(ConfigError) as info:
            gc(missing, keep_runs=3, cache_max_bytes=0, dry_run=True)
        assert f"work directory {str(missing)!r}" in str(info.value) and "--work-dir" in str(info.value)
    with pytest.raises(ConfigError, match="cache_max_bytes"):
        gc(tmp_path, keep_runs=3, cache_max_bytes=-1)


def test_a_run_whose_step_lock_a_live_process_holds_is_in_use_whatever_its_file_times(tmp_path: Path) -> None:
    entry = make_entries(tmp_path, {"busy": 1000}, {"busy": NOW - 5 * DAY})["busy"]
    make_run(tmp_path, "newest", NOW - DAY)
    busy = make_run(tmp_path, "busy", NOW - 5 * DAY, finished=False, uses=(f"inputs-{entry.key}",))
    with lock_held_by_a_child(busy, "evaluate-onnxruntime"):
        _set_mtime(busy, NOW - 5 * DAY)  # the lock file is as old as the rest: only the lock tells
        before = snapshot(busy)
        report = gc(tmp_path, keep_runs=1, cache_max_bytes=0)
        assert report["runs"]["in_use"] == [str(busy)] and report["runs"]["pruned"] == []
        assert snapshot(busy) == before
        assert report["cache"]["in_use"] == [entry.key] and entry.path.is_dir()
    _set_mtime(busy, NOW - 5 * DAY)  # released: as old as before, and no process holds its lock
    report = gc(tmp_path, keep_runs=1, cache_max_bytes=0)
    assert [item["path"] for item in report["runs"]["pruned"]] == [str(busy)]
    assert not (busy / "inputs").exists() and (busy / PRUNED_FILE).is_file()
    assert [item["key"] for item in report["cache"]["evicted"]] == [entry.key]
