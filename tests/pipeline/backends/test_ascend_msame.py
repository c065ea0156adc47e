"""msame / ais_bench backends against the emulators: output discovery, validation, timing, errors."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from emulators.models import tiny_dets_model, tiny_reference
from emulators.runs import IDS, SHARD, H, W, write_run
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline.backends.ais_bench import AisBenchBackend
from gfocal_pipeline.backends.atc import convert_onnx
from gfocal_pipeline.backends.msame import MsameBackend
from gfocal_pipeline.errors import BackendError, DatasetError
from gfocal_pipeline.layout import RunLayout, input_file_name, read_shard_outputs
from gfocal_pipeline.preprocess import normalize


def check_outputs(layout: RunLayout, backend: str, inputs: dict, dets_atol: float) -> dict:
    marker, arrays = read_shard_outputs(layout.output_shard(backend, SHARD))
    assert marker["backend"] == backend and marker["kind"] == "dets" and marker["images"] == len(IDS)
    assert arrays["image_ids"].tolist() == IDS
    assert arrays["dets"].shape == (3, 100, 5) and arrays["dets"].dtype == np.float32
    assert arrays["labels"].shape == (3, 100) and arrays["labels"].dtype == np.int64
    for row, image_id in enumerate(IDS):
        dets, labels = tiny_reference(inputs[image_id])
        np.testing.assert_allclose(arrays["dets"][row], dets, atol=dets_atol, rtol=1e-5)
        np.testing.assert_array_equal(arrays["labels"][row], labels)
    return marker


@pytest.mark.parametrize("outfmt", ["BIN", "TXT"])
@pytest.mark.parametrize("version", ["2021", "2022"])
def test_msame_shard_into_shared_layout(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outfmt: str, version: str
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_MSAME_VERSION", version)  # padded vs unpadded folder names
    layout, manifest, inputs = write_run(tmp_path / "run")
    result = MsameBackend(om, outfmt=outfmt, device=3, set_env=kit.set_env).infer_shard(
        layout, manifest, SHARD
    )
    assert (result.backend, result.shard, result.images, result.reused) == ("msame", SHARD, 3, False)
    # TXT keeps 6 significant digits, BIN is exact
    check_outputs(layout, "msame", inputs, dets_atol=1e-5 if outfmt == "TXT" else 0)
    call = kit.calls("msame")[0]["argv"]
    assert call[:4] == ["--model", str(om), "--input", str(layout.input_shard(SHARD))]
    assert call[6:] == ["--outfmt", outfmt, "--device", "3"]
    timing = result.timing
    assert timing["device"] == 3 and timing["images"] == 3
    mean = timing["latency_ms"]["mean"]
    assert timing["fps"] == pytest.approx(1000.0 / mean)
    assert timing["latency_ms"]["mean_without_first"] is not None
    saved = json.loads(layout.timing_file("msame", SHARD).read_text())
    assert len(saved["latencies_ms"]) == 3 and saved["summary"] == timing
    # the raw tool folder is gone once the shared layout is written
    assert not (layout.output_shard("msame", SHARD) / "raw").exists()


def test_msame_reuses_finished_shard(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    backend = MsameBackend(om, set_env=kit.set_env, chips=4)
    first = backend.infer_shard(layout, manifest, SHARD)
    assert first.timing["fps"] == pytest.approx(4 * 1000.0 / first.timing["latency_ms"]["mean"])
    again = backend.infer_shard(layout, manifest, SHARD)
    assert again.reused is True and again.timing == first.timing
    assert len(kit.calls("msame")) == 1


def test_msame_not_om_despite_exit_0(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_not_om")
    with pytest.raises(
        BackendError,
        match=r"msame rejected the model .*'\[ERROR\] input model file type is not "
        r"\.om' \(msame exits 0 even so\)",
    ):
        MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert not (layout.output_shard("msame", SHARD) / "done.json").exists()


def test_msame_exit_0_without_success_line(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_exit0_no_success")
    with pytest.raises(
        BackendError,
        match=r"msame did not report success \(exit 0, no '\[INFO\] Execute sample success' line\)",
    ):
        MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)


def test_msame_real_failure(kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_fail")
    with pytest.raises(
        BackendError,
        match=r"(?s)exit 1, no '\[INFO\] Execute sample success' line.*\[ERROR\] Sample process failed",
    ):
        MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("msame_drop_output", r"missing 1 file\(s\): \['000000010139_output_1\.txt'\]"),
        ("msame_extra_output", r"unexpected 1 file\(s\): \['000000010139_output_2\.txt'\]"),
        ("msame_garbage_timing", r"cannot parse msame timing line 'Inference average time : -nan\(ind\) ms'"),
    ],
)
def test_msame_bad_outputs(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, message: str
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", fault)
    with pytest.raises(BackendError, match=message):
        MsameBackend(om, outfmt="TXT", set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert not (layout.output_shard("msame", SHARD) / "done.json").exists()


def test_output_folder_of_an_earlier_run_is_ignored(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, _, inputs = write_run(tmp_path / "run")
    out = tmp_path / "tool_out"
    # an earlier run's folders (one with a later-looking name) holding wrong results
    for old in ("20200101_000000", "2099123_23_59_59_999999"):
        (out / old).mkdir(parents=True)
        for image_id in IDS:
            for index in (0, 1):
                (out / old / f"{image_id:012d}_output_{index}.txt").write_text("garbage\n")
    backend = MsameBackend(om, outfmt="TXT", set_env=kit.set_env)
    stems = [f"{i:012d}" for i in IDS]
    run = backend.run_tool(layout.input_shard(SHARD), out, stems)
    assert run.run_dir.parent == out and run.run_dir.name not in (
        "20200101_000000",
        "2099123_23_59_59_999999",
    )
    dets = backend.read_output(run.files[stems[0]][0], 0)
    np.testing.assert_allclose(dets, tiny_reference(inputs[IDS[0]])[0], atol=1e-5)
    assert (out / "20200101_000000" / f"{IDS[0]:012d}_output_0.txt").read_text() == "garbage\n"


@pytest.mark.parametrize("device", [-1, 256, "x", True, 2.5])
def test_device_out_of_range(om: Path, device: object) -> None:
    with pytest.raises(BackendError, match=r"device id .* (out of range|must be an integer)"):
        MsameBackend(om, device=device)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"device id .* (out of range|must be an integer)"):
        AisBenchBackend(om, device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["model;reboot.om", "model,second.om", "$(id).om", "m`x`.om"])
def test_shell_metacharacters_in_om_path(tmp_path: Path, bad: str) -> None:
    with pytest.raises(BackendError, match=r"OM model path .* contains characters that are not allowed"):
        MsameBackend(tmp_path / bad)


def test_bad_backend_options(om: Path) -> None:
    with pytest.raises(BackendError, match=r"outfmt 'NPY' is not supported by msame; use one of BIN, TXT"):
        MsameBackend(om, outfmt="NPY")
    with pytest.raises(BackendError, match=r"must end in \.om"):
        MsameBackend(om.with_suffix(".onnx"))
    with pytest.raises(BackendError, match="batch_size must be 1"):
        MsameBackend(om, batch_size=4)


def test_missing_om_and_missing_inputs(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    with pytest.raises(BackendError, match="does not exist; run the convert step first"):
        MsameBackend(tmp_path / "nope.om", set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    (layout.input_shard(SHARD) / input_file_name(IDS[1])).write_bytes(b"short")
    with pytest.raises(DatasetError, match=r"has 5 bytes, expected 3072 for float32 \(3, 16, 16\)"):
        MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert kit.calls("msame") == []


def test_foreign_files_in_shard_dir_are_not_fed(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, manifest, inputs = write_run(tmp_path / "run")
    (layout.input_shard(SHARD) / "notes.txt").write_text("not an input")
    MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    check_outputs(layout, "msame", inputs, dets_atol=0)


def test_msame_timeout_and_kill(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_hang")
    with pytest.raises(BackendError, match="msame did not finish within 3 s"):
        MsameBackend(om, set_env=kit.set_env, timeout_s=3).infer_shard(layout, manifest, SHARD)
    backend = MsameBackend(om, set_env=kit.set_env)
    killer = threading.Timer(2.0, backend.handle.kill)
    killer.start()
    start = time.monotonic()
    with pytest.raises(BackendError, match="msame was killed on request"):
        backend.infer_shard(layout, manifest, SHARD)
    killer.join()
    assert time.monotonic() - start < 30


# --- ais_bench --------------------------------------------------------------------------------------
@pytest.mark.parametrize("outfmt", ["BIN", "NPY", "TXT"])
def test_ais_bench_shard_into_shared_layout(kit: Toolkit, om: Path, tmp_path: Path, outfmt: str) -> None:
    layout, manifest, inputs = write_run(tmp_path / "run")
    result = AisBenchBackend(om, outfmt=outfmt, device=1, set_env=kit.set_env).infer_shard(
        layout, manifest, SHARD
    )
    assert (result.backend, result.images) == ("ais_bench", 3)
    check_outputs(layout, "ais_bench", inputs, dets_atol=1e-6 if outfmt == "TXT" else 0)
    call = kit.calls("ais_bench")[0]["argv"]
    assert call[:4] == ["--model", str(om), "--input", str(layout.input_shard(SHARD))]
    assert call[-4:] == ["--outfmt", outfmt, "--device", "1"]
    latency = result.timing["latency_ms"]
    assert result.timing["fps"] == pytest.approx(1000.0 / latency["mean"])
    assert result.timing["tool_reported_fps"] == pytest.approx(result.timing["fps"])
    assert latency["min"] <= latency["p50"] <= latency["max"]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("ais_drop_output", r"missing 1 file\(s\): \['000000010139_1\.bin'\]"),
        ("ais_extra_output", r"unexpected 1 file\(s\): \['stray_0\.bin'\]"),
        ("ais_no_summary", r"should write one new <time>_summary\.json .* found none"),
        ("ais_fail", r"ais_bench did not report success \(exit 1"),
    ],
)
def test_ais_bench_errors(
    kit: Toolkit, om: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, message: str
) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", fault)
    with pytest.raises(BackendError, match=message):
        AisBenchBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)


def test_ais_bench_not_installed(tmp_path: Path, om: Path) -> None:
    kit = make_toolkit(tmp_path / "bare", tools=("atc", "msame", "npu-smi"))
    layout, manifest, _ = write_run(tmp_path / "run")
    with pytest.raises(
        BackendError, match=r"(?s)ais_bench did not report success .*No module named ais_bench"
    ):
        AisBenchBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)


def test_ais_bench_ignores_earlier_runs(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, _, _ = write_run(tmp_path / "run")
    out = tmp_path / "ais_out"
    (out / "2020_01_01-00_00_00").mkdir(parents=True)
    (out / "2020_01_01-00_00_00_summary.json").write_text("{not json")
    backend = AisBenchBackend(om, set_env=kit.set_env)
    run = backend.run_tool(layout.input_shard(SHARD), out, [f"{i:012d}" for i in IDS])
    assert run.run_dir.name != "2020_01_01-00_00_00" and run.timing.mean_ms > 0


def test_uint8_inputs_through_aipp(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    converted = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, input_dtype="uint8")
    assert any(a.startswith("--insert_op_conf=") for a in converted["atc_args"])
    assert "--input_shape=input.1:1,3,16,16" in converted["atc_args"]  # the ONNX (NCHW float) shape
    layout, manifest, inputs = write_run(tmp_path / "run", dtype="uint8")
    MsameBackend(converted["om_path"], set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    _, arrays = read_shard_outputs(layout.output_shard("msame", SHARD))
    for row, image_id in enumerate(IDS):
        expected, _ = tiny_reference(normalize(inputs[image_id]).transpose(2, 0, 1))
        np.testing.assert_allclose(arrays["dets"][row], expected, atol=3e-3)


def test_uint8_graph_without_aipp(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "u8.onnx", H, W, uint8_nhwc=True)
    with pytest.raises(BackendError, match=r"is uint8 .* convert it with input_dtype='uint8'"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env)
    converted = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, input_dtype="uint8")
    assert (
        "--input_format=NHWC" in converted["atc_args"]
        and "--input_shape=input.1:1,16,16,3" in converted["atc_args"]
    )
    assert not any(a.startswith("--insert_op_conf") for a in converted["atc_args"])
    layout, manifest, inputs = write_run(tmp_path / "run", dtype="uint8")
    MsameBackend(converted["om_path"], set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    _, arrays = read_shard_outputs(layout.output_shard("msame", SHARD))
    for row, image_id in enumerate(IDS):
        expected_dets, expected_labels = tiny_reference(inputs[image_id])
        np.testing.assert_array_equal(arrays["dets"][row], expected_dets)
        np.testing.assert_array_equal(arrays["labels"][row], expected_labels)


def test_outputs_of_another_om_are_not_reused(kit: Toolkit, om: Path, tmp_path: Path) -> None:
    layout, manifest, _ = write_run(tmp_path / "run")
    MsameBackend(om, set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    other = convert_onnx(
        tiny_dets_model(tmp_path / "other.onnx", H, W),
        tmp_path / "cache",
        set_env=kit.set_env,
        precision_mode="allow_fp32_to_fp16",
    )
    result = MsameBackend(other["om_path"], set_env=kit.set_env).infer_shard(layout, manifest, SHARD)
    assert result.reused is False and len(kit.calls("msame")) == 2
