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
