"""An OM cache entry that lost a file (crash, manual cleanup) is rebuilt, not a permanent failure."""

from __future__ import annotations

from pathlib import Path

from emulators.models import tiny_dets_model
from emulators.toolkit import make_toolkit

from gfocal_pipeline.backends.atc import CACHE_META, CACHE_OM, convert_onnx
from gfocal_pipeline.fileio import sha256_file


def test_incomplete_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    kit = make_toolkit(tmp_path / "cann")
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx")
    first = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend310")
    entry = Path(first["om_path"]).parent
    assert (entry / CACHE_OM).is_file()
    (entry / CACHE_META).unlink()  # metadata lost
    again = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend310")
    assert again["cached"] is False and sha256_file(again["om_path"]) == again["om_sha256"]
    (Path(again["om_path"]).parent / CACHE_OM).unlink()  # the OM itself lost
    third = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend310")
    assert third["cached"] is False and Path(third["om_path"]).is_file()
    assert len(kit.calls("atc")) == 3


def test_om_entries_live_in_the_cache_store_and_gc_evicts_them_unless_a_run_uses_them(tmp_path: Path) -> None:
    """An OM entry is a cache-store entry (`cache.json` recording both files by sha256), the run that
    converted names it in `uses/om-<key>`, and `gfocal gc` evicts it only once no run in use does."""
    import json
    import os
    import time

    from gfocal_pipeline.cache_store import RECORD, Cache
    from gfocal_pipeline.layout import om_cache_dir
    from gfocal_pipeline.retention import RECENT_USE_S, gc
    from gfocal_pipeline.steps import convert_step

    kit = make_toolkit(tmp_path / "cann")
    work = tmp_path / "work"
    run = work / "gfocal_ascend_nightly" / "night_1"
    run.mkdir(parents=True)
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx")
    result = convert_step(run, onnx_file, om_cache_dir(work), set_env=kit.set_env, soc_version="Ascend310")
    entry = om_cache_dir(work) / result["cache_key"]
    record = json.loads((entry / RECORD).read_text())
    assert sorted(record["files"]) == [CACHE_META, CACHE_OM]  # atc's working files are not kept
    assert record["files"][CACHE_OM]["sha256"] == sha256_file(entry / CACHE_OM) == result["om_sha256"]
    assert [(e.kind, e.key) for e in Cache(work).entries()] == [("om", result["cache_key"])]
    assert (run / "uses" / f"om-{result['cache_key']}").is_file()
    old = time.time() - RECENT_USE_S - 60
    os.utime(entry / RECORD, (old, old))

    kept = gc(work, keep_runs=5, cache_max_bytes=0, protect=[run])
    assert kept["totals"]["entries_evicted"] == 0 and entry.is_dir()
    evicted = gc(work, keep_runs=5, cache_max_bytes=0, grace_s=0)
    assert evicted["cache"]["evicted"][0]["kind"] == "om" and not entry.exists()
    again = convert_step(run, onnx_file, om_cache_dir(work), set_env=kit.set_env, soc_version="Ascend310")
    assert again["cached"] is False and len(kit.calls("atc")) == 2
