"""Content-addressed cache entries: atomic builds, verified reuse, concurrent builders, LRU eviction."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
import zlib
from pathlib import Path

import pytest
from support import read_only_tree

from gfocal_pipeline.cache_store import CRC32, SHA256, Cache, CacheError, cache_key, dir_size, reclaim_stale

KEY = {"checkpoint_sha256": "ab" * 32, "variant": "portable", "height": 320}


def _writer(payload: bytes = b"graph bytes", name: str = "model.onnx"):
    calls: list[Path] = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / name).write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text("{}")
        return {"note": "built"}

    return build, calls


def test_build_once_then_reuse(tmp_path: Path) -> None:
    entry = Cache(tmp_path).entry("onnx", KEY)
    build, calls = _writer()
    record, cached = entry.get_or_build(build)
    assert not cached and len(calls) == 1
    assert entry.path == tmp_path / "cache" / "onnx" / cache_key(KEY)
    assert (entry.path / "model.onnx").read_bytes() == b"graph bytes"
    assert record["key_inputs"] == KEY and record["info"] == {"note": "built"}
    assert set(record["files"]) == {"model.onnx", "sub/meta.json"}
    again, cached = entry.get_or_build(build)
    assert cached and len(calls) == 1 and again["key"] == entry.key
    # the temporary build directory is gone
    assert [p.name for p in entry.path.parent.iterdir() if p.name.startswith(".build")] == []


def test_key_changes_with_any_input() -> None:
    assert cache_key(KEY) == cache_key(dict(reversed(list(KEY.items()))))
    assert cache_key(KEY) != cache_key({**KEY, "height": 640})
    assert cache_key(KEY) != cache_key({**KEY, "opset": 17})


@pytest.mark.parametrize("verify", [SHA256, CRC32])
@pytest.mark.parametrize(
    "damage",
    ["truncate", "change", "no-record", "garbage-record", "delete-file", "no-checksum"],
)
def test_damaged_entry_is_rebuilt_never_used(
    tmp_path: Path, damage: str, verify: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = Cache(tmp_path).entry("onnx", KEY, verify=verify)
    build, calls = _writer()
    record, _ = entry.get_or_build(build)
    assert set(record["files"]["model.onnx"]) == {"size", verify}
    target = entry.path / "model.onnx"
    if damage == "truncate":
        target.write_bytes(b"graph")
    elif damage == "change":
        target.write_bytes(b"graph bytEs")  # same size, one byte other
    elif damage == "no-record":
        entry.record_path.unlink()
    elif damage == "garbage-record":
        entry.record_path.write_text("{not json")
    elif damage == "no-checksum":  # a record of an older version: sizes only
        for info in record["files"].values():
            del info[verify]
        entry.record_path.write_text(json.dumps(record))
    else:
        target.unlink()
    assert entry.record() is None
    _, cached = entry.get_or_build(build)
    assert not cached and len(calls) == 2
    assert target.read_bytes() == b"graph bytes"
    if damage in ("change", "no-checksum"):
        why = "has a changed model.onnx" if damage == "change" else f"has no recorded {verify} of model.onnx"
        assert why in caplog.text and "discarding it and building again" in caplog.text


def test_a_crc32_entry_records_what_zlib_computes(tmp_path: Path) -> None:
    payload = os.urandom(3 * 2**20 + 17)  # more than one read chunk
    record, _ = Cache(tmp_path).entry("inputs", KEY, verify=CRC32).get_or_build(_writer(payload)[0])
    assert record["files"]["model.onnx"] == {"size": len(payload), CRC32: f"{zlib.crc32(payload):08x}"}


def test_unknown_verify_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown verify mode 'md5'"):
        Cache(tmp_path).entry("inputs", KEY, verify="md5")


def test_a_read_only_cache_serves_its_valid_entries(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    entry = cache.entry("inputs", KEY, verify=CRC32)
    build, calls = _writer()
    record, _ = entry.get_or_build(build)
    used = entry.record_path.stat().st_mtime
    with read_only_tree(cache.root):
        again, cached = entry.get_or_build(build)
        assert cached and again == record and len(calls) == 1
        assert entry.record_path.stat().st_mtime == used  # its last use could not be written


def test_a_damaged_entry_in_a_read_only_cache_is_a_clear_error(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    entry = cache.entry("inputs", KEY, verify=CRC32)
    build, calls = _writer()
    entry.get_or_build(build)
    (entry.path / "model.onnx").write_bytes(b"GRAPH BYTES")
    with read_only_tree(cache.root), pytest.raises(CacheError) as info:
        entry.get_or_build(build)
    message = str(info.value)
    assert str(entry.path) in message and "has a changed model.onnx" in message
    assert "cannot be set aside" in message and "cache_inputs=false" in message
    assert len(calls) == 1 and (entry.path / "model.onnx").read_bytes() == b"GRAPH BYTES"


def test_a_missing_entry_in_a_read_only_cache_is_a_clear_error(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.entry("inputs", {**KEY, "n": 0}).get_or_build(_writer()[0])
    build, calls = _writer()
    with read_only_tree(cache.root), pytest.raises(CacheError) as info:
        cache.entry("inputs", {**KEY, "n": 1}).get_or_build(build)
    message = str(info.value)
    assert "cannot be written" in message and str(cache.root) in message and "cache_inputs=false" in message
    assert calls == []


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    entry = Cache(tmp_path).entry("onnx", KEY)

    def build(tmp: Path) -> None:
        (tmp / "half.onnx").write_bytes(b"half")
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        entry.get_or_build(build)
    assert not entry.path.exists()
    assert [p.name for p in entry.path.parent.iterdir() if not p.name.startswith(".locks")] == []


def test_disk_full_is_a_clear_error_without_a_half_entry(tmp_path: Path) -> None:
    entry = Cache(tmp_path).entry("inputs", KEY)

    def build(tmp: Path) -> None:
        (tmp / "part.bin").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part.bin"))

    with pytest.raises(CacheError, match=r"disk full while building cache entry .* MiB free"):
        entry.get_or_build(build)
    assert not entry.path.exists()
    assert [p for p in entry.path.parent.iterdir() if p.name.startswith(".build")] == []


def test_first_rename_wins_when_two_builders_race_without_a_lock(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    first, second = cache.entry("onnx", KEY), cache.entry("onnx", KEY)
    first._build(_writer(b"first")[0])
    record = second._build(_writer(b"second")[0])  # its rename finds the entry complete
    assert (first.path / "model.onnx").read_bytes() == b"first"
    assert record["files"]["model.onnx"]["size"] == len(b"first")
    assert [p for p in first.path.parent.iterdir() if p.name.startswith(".build")] == []


def _slow_builder(work_dir: str, log: str) -> str:
    def build(tmp: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (tmp / "shard.bin").write_bytes(b"\1" * 1000)

    record, cached = Cache(work_dir).entry("inputs", KEY).get_or_build(build)
    return json.dumps({"cached": cached, "key": record["key"]})


def test_two_processes_building_one_entry_both_succeed_with_one_build(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = [json.loads(r) for r in pool.starmap(_slow_builder, [(str(tmp_path), str(log))] * 2)]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert len(log.read_text().split()) == 1
    assert len([p for p in (tmp_path / "cache" / "inputs").iterdir() if not p.name.startswith(".")]) == 1


def test_evict_least_recently_used_but_never_a_kept_key(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    entries = [cache.entry("inputs", {**KEY, "n": n}) for n in range(3)]
    for n, entry in enumerate(entries):
        entry.get_or_build(_writer(b"x" * 1000)[0])
        os.utime(entry.record_path, (1000 + n, 1000 + n))
    entries[0].touch()  # used just now: the newest
    sizes = [dir_size(e.path) for e in entries]
    # room for all but one entry: the oldest not kept (entries[1] is kept, entries[0] is recent) goes
    removed = cache.evict(max_bytes=sum(sizes) - 1, keep=[entries[1].key])
    assert [e.key for e, _ in removed] == [entries[2].key]
    assert removed[0][1] == sizes[2]
    assert entries[0].path.exists() and entries[1].path.exists() and not entries[2].path.exists()
    assert cache.evict(max_bytes=0, keep=[e.key for e in entries]) == []


def test_reclaim_stale_build_directories(tmp_path: Path) -> None:
    kind = tmp_path / "cache" / "onnx"
    old, fresh = kind / ".build-aa-1-x", kind / ".build-bb-2-y"
    old.mkdir(parents=True)
    fresh.mkdir()
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    assert reclaim_stale(kind) == [old]
    assert not old.exists() and fresh.exists()


def test_usage_lists_least_recently_used_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    entries = [cache.entry("onnx", {**KEY, "n": n}) for n in range(3)]
    for n, entry in enumerate(entries):
        entry.get_or_build(_writer(b"y" * (100 * (n + 1)))[0])
        os.utime(entry.record_path, (2000 - n, 2000 - n))
    usage = cache.usage()
    assert [use.entry.key for use in usage] == [e.key for e in reversed(entries)]
    assert [use.bytes for use in usage] == [dir_size(e.path) for e in reversed(entries)]
    assert [use.last_used for use in usage] == [1998, 1999, 2000]


def test_evict_dry_run_touches_nothing_and_recent_entries_stay(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    old, recent = cache.entry("inputs", {**KEY, "n": 0}), cache.entry("inputs", {**KEY, "n": 1})
    for entry in (old, recent):
        entry.get_or_build(_writer(b"z" * 500)[0])
    os.utime(old.record_path, (time.time() - 3600,) * 2)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    would = cache.evict(0, min_idle_s=600, dry_run=True)
    assert [(e.key, size) for e, size in would] == [(old.key, dir_size(old.path))]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
    removed = cache.evict(0, min_idle_s=600)
    assert [e.key for e, _ in removed] == [old.key]
    assert not old.path.exists() and recent.path.is_dir()


def test_reclaim_stale_dry_run_only_reports(tmp_path: Path) -> None:
    kind = tmp_path / "cache" / "onnx"
    old = kind / ".trash-aa-1"
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    assert reclaim_stale(kind, dry_run=True) == [old] and old.exists()
    assert Cache(tmp_path).kind_dirs() == [kind]
