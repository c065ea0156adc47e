"""msame / ais_bench check the run's input (dtype, layout, size, batch) against the OM's before running.

The tools only see bytes: uint8 640x640x3 = 1228800 bytes = float32 3x320x320, so without this
check such a run executes, exits 0 and scores AP 0. The OMs are converted by the emulated atc.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from emulators.models import tiny_dets_model
from emulators.toolkit import Toolkit

from gfocal_pipeline.backends.ais_bench import AisBenchBackend
from gfocal_pipeline.backends.atc import CACHE_META, convert_onnx
from gfocal_pipeline.backends.msame import MsameBackend, om_input
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest

SHARD = "00000"
IDS = [139]
BACKENDS = (MsameBackend, AisBenchBackend)


def convert(kit: Toolkit, tmp_path: Path, height: int, width: int, **options: object) -> Path:
    onnx_file = tiny_dets_model(
        tmp_path / f"m{height}x{width}.onnx", height, width, **options.pop("model", {})
    )
    out = tmp_path / f"model{height}x{width}{options.get('input_dtype', '')}"
    result = convert_onnx(onnx_file, tmp_path / "cache", output_dir=out, set_env=kit.set_env, **options)
    return Path(result["om_path"])


def write_run(root: Path, dtype: str, height: int, width: int) -> tuple[RunLayout, Manifest]:
    """A run of one image of `dtype` at height x width (zeros; the check runs before the tool)."""
    layout = RunLayout.at(root)
    entries = [
        ImageEntry(i, f"{i:012d}.jpg", SHARD, Geometry(width, height, 1.0, 1.0, width, height, (0, 0, 0, 0)))
        for i in IDS
    ]
    manifest = Manifest(
        "letterbox", dtype, height, width, 8, "/coco", "/coco/a.json", "/coco/val2017", entries, {SHARD: IDS}
    )
    manifest.write(layout.manifest)
    shard = layout.input_shard(SHARD)
    shard.mkdir(parents=True)
    for image_id in IDS:
        np.zeros(manifest.bytes_per_image, np.uint8).tofile(shard / input_file_name(image_id))
    manifest.path = layout.manifest
    return layout, manifest


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_640_run_on_a_float32_320_om_fails_naming_both(
    kit: Toolkit, tmp_path: Path, backend: type[MsameBackend]
) -> None:
    om = convert(kit, tmp_path, 320, 320)
    layout, manifest = write_run(tmp_path / "run", "uint8", 640, 640)
    assert manifest.bytes_per_image == 3 * 320 * 320 * 4  # the byte counts agree: only the check can tell
    with pytest.raises(BackendError) as caught:
        backend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    message = str(caught.value)
    assert "the run's input (uint8 NHWC 640x640, batch 1" in message
    assert f"OM {str(om)!r} (float32 NCHW 320x320, static batch 1" in message
    assert "Convert the OM from this run's export" in message
    assert kit.calls(backend.name) == []  # refused before the tool ran
    assert not layout.output_shard(backend.name, SHARD).exists()


@pytest.mark.parametrize(
    ("om_size", "om_options", "run", "om_described"),
    [
        ((16, 32), {}, ("float32", 32, 16), "float32 NCHW 16x32"),  # transposed size, same bytes
        ((16, 16), {"input_dtype": "uint8"}, ("float32", 16, 16), "uint8 NHWC 16x16"),  # AIPP OM
        (
            (16, 16),
            {"input_dtype": "uint8", "model": {"uint8_nhwc": True}},
            ("uint8", 32, 32),
            "uint8 NHWC 16x16",
        ),
    ],
)
def test_other_mismatches_are_refused(
    kit: Toolkit,
    tmp_path: Path,
    om_size: tuple[int, int],
    om_options: dict,
    run: tuple[str, int, int],
    om_described: str,
) -> None:
    om = convert(kit, tmp_path, *om_size, **om_options)
    layout, manifest = write_run(tmp_path / "run", *run)
    with pytest.raises(BackendError, match=f"input of OM .*{om_described}"):
        MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert kit.calls("msame") == []


@pytest.mark.parametrize(
    ("om_options", "dtype"),
    [
        ({}, "float32"),
        ({"input_dtype": "uint8"}, "uint8"),
        ({"input_dtype": "uint8", "model": {"uint8_nhwc": True}}, "uint8"),
    ],
)
def test_matching_runs_pass_the_check_and_run(
    kit: Toolkit, tmp_path: Path, om_options: dict, dtype: str
) -> None:
    om = convert(kit, tmp_path, 16, 16, **om_options)
    layout, manifest = write_run(tmp_path / "run", dtype, 16, 16)
    result = MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert result.images == len(IDS) and len(kit.calls("msame")) == 1


def test_batch_is_checked_with_the_input(kit: Toolkit, tmp_path: Path) -> None:
    om = convert(kit, tmp_path, 16, 16)  # static batch 1
    layout, manifest = write_run(tmp_path / "run", "float32", 16, 16)
    with pytest.raises(BackendError, match=r"batch_size 4 does not match the OM .*static batch 1"):
        AisBenchBackend(om, set_env=kit.set_env, batch_size=4).infer_shard(layout, manifest, SHARD)
    assert kit.calls("ais_bench") == []


def test_the_om_input_of_a_cache_entry_comes_from_its_atc_arguments(kit: Toolkit, tmp_path: Path) -> None:
    """A cache entry's convert.json (no output_dir) has no input_dtype / input_format."""
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", 16, 24)
    for dtype in ("float32", "uint8"):
        om = Path(
            convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, input_dtype=dtype)["om_path"]
        )
        meta = json.loads((om.parent / CACHE_META).read_text())
        assert "input_dtype" not in meta
        known = om_input(om, sha256_file(om))
        assert known is not None
        layout = "NCHW" if dtype == "float32" else "NHWC"
        assert (known.dtype, known.layout, known.height, known.width) == (dtype, layout, 16, 24)


def test_an_om_without_convert_json_runs_with_a_warning(
    kit: Toolkit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    om = convert(kit, tmp_path, 16, 16)
    (om.parent / CACHE_META).unlink()
    layout, manifest = write_run(tmp_path / "run", "float32", 16, 16)
    MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert "cannot be checked against it" in caplog.text
