"""ONNX -> OM conversion through the emulated atc: arguments, success rules, errors, the OM cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from emulators.models import tiny_dets_model
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline.backends.atc import build_atc_args, convert_onnx
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.fileio import sha256_file


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return tiny_dets_model(tmp_path / "tiny.onnx")


def test_atc_arguments_follow_the_recipe() -> None:
    args = build_atc_args(
        "/m/gfocal.onnx",
        "/m/gfocal_bs1",
        input_name="input.1",
        input_shape=(1, 3, 800, 1216),
        soc_version="Ascend310P3",
        log_level="debug",
    )
    assert args == [
        "--framework=5",
        "--model=/m/gfocal.onnx",
        "--output=/m/gfocal_bs1",
        "--input_format=NCHW",
        "--input_shape=input.1:1,3,800,1216",
        "--soc_version=Ascend310P3",
        "--log=debug",
        "--precision_mode=force_fp16",
    ]


def test_atc_arguments_dynamic_batch_aipp_and_out_nodes() -> None:
    args = build_atc_args(
        "/m/g.onnx",
        "/m/g",
        input_name="input.1",
        input_shape=(-1, 3, 128, 160),
        soc_version="Ascend310",
        dynamic_batch_sizes=(1, 2, 4, 8),
        precision_mode=None,
        insert_op_conf="/m/aipp.cfg",
        out_nodes=("dets", "labels"),
    )
    assert "--input_shape=input.1:-1,3,128,160" in args
    assert "--dynamic_batch_size=1,2,4,8" in args
    assert "--insert_op_conf=/m/aipp.cfg" in args
    assert "--out_nodes=dets;labels" in args
    assert not any(a.startswith("--precision_mode") for a in args)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_shape": (-1, 3, 8, 8)}, "a dynamic batch needs both batch -1"),
        ({"dynamic_batch_sizes": (1, 2)}, "a dynamic batch needs both batch -1"),
        ({"soc_version": "310P3"}, "soc_version '310P3' is not like 'Ascend310P3'"),
        ({"precision_mode": "fp8"}, "precision_mode 'fp8' is not one of"),
        (
            {"input_name": "in:put"},
            r"ONNX input name 'in:put' contains characters that are not allowed \(':'\)",
        ),
        ({"out_nodes": ("dets;rm",)}, "output node name 'dets;rm' contains characters"),
    ],
)
def test_atc_arguments_are_validated(options: dict, message: str) -> None:
    base = {"input_name": "input.1", "input_shape": (1, 3, 8, 8), "soc_version": "Ascend310P3"}
    with pytest.raises(BackendError, match=message):
        build_atc_args("/m/g.onnx", "/m/g", **{**base, **options})


def test_convert_and_cache(kit: Toolkit, onnx_file: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "model"
    first = convert_onnx(onnx_file, cache, output_dir=out, set_env=kit.set_env)
    assert first["cached"] is False and first["convert_seconds"] > 0
    assert first["soc_version"] == "Ascend310P3"  # from the emulated npu-smi
    assert first["cann_version"] == kit.version
    assert Path(first["om_path"]) == out / "gfocal_bs1.om" and Path(first["om_path"]).is_file()
    assert "--input_shape=input.1:1,3,16,16" in first["atc_args"]
    assert json.loads((out / "convert.json").read_text())["om_sha256"] == first["om_sha256"]
    assert len(kit.calls("atc")) == 1
    # atc ran in a scratch folder of the entry's build directory: its working files litter neither the
    # caller's directory nor the entry (which holds the OM, its convert.json and the store's record)
    scratch = Path(kit.calls("atc")[0]["cwd"])
    assert scratch.parent.parent == cache and scratch.parent.name.startswith(".build-")
    assert not list(cache.glob(".build-*"))
    entry = cache / first["cache_key"]
    assert sorted(p.name for p in entry.iterdir()) == ["cache.json", "convert.json", "model.om"]

    second = convert_onnx(onnx_file, cache, output_dir=tmp_path / "model2", set_env=kit.set_env)
    assert second["cached"] is True and second["convert_seconds"] == 0
    assert second["om_sha256"] == first["om_sha256"] and second["cache_key"] == first["cache_key"]
    assert len(kit.calls("atc")) == 1, "a cached OM must not call atc again"

    # a different option is a different OM
    third = convert_onnx(onnx_file, cache, set_env=kit.set_env, precision_mode="allow_fp32_to_fp16")
    assert third["cached"] is False and third["cache_key"] != first["cache_key"]
    assert len(kit.calls("atc")) == 2


def test_damaged_cache_entry_is_rebuilt(kit: Toolkit, onnx_file: Path, tmp_path: Path) -> None:
    first = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend310")
    Path(first["om_path"]).write_bytes(b"truncated")
    again = convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend310")
    assert again["cached"] is False
    assert sha256_file(again["om_path"]) == again["om_sha256"]
    assert Path(again["om_path"]).read_bytes() != b"truncated"
    assert len(kit.calls("atc")) == 2
    assert kit.calls("npu-smi") == []  # soc_version given: no detection


def test_om_with_arch_suffix_is_found(
    kit: Toolkit, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "atc_arch_suffix")
    result = convert_onnx(
        onnx_file, tmp_path / "cache", output_dir=tmp_path / "m", om_name="gfocal", set_env=kit.set_env
    )
    assert Path(result["om_path"]).name == "gfocal.om"
    meta = json.loads((Path(result["om_path"]).parent / "convert.json").read_text())
    assert meta["om_sha256"] == result["om_sha256"]


def test_atc_missing_from_path(tmp_path: Path, onnx_file: Path) -> None:
    kit = make_toolkit(tmp_path / "cann", tools=("msame", "npu-smi"))
    with pytest.raises(BackendError, match=r"'atc' was not found on PATH after sourcing .*set_env\.sh"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env)


def test_set_env_missing(tmp_path: Path, onnx_file: Path) -> None:
    with pytest.raises(BackendError, match=r"CANN environment script .*set_env\.sh' does not exist"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=tmp_path / "none" / "set_env.sh")


def test_no_chip_and_no_soc_version(
    kit: Toolkit, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "npu_smi_no_chip")
    with pytest.raises(BackendError, match="listed no NPU"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env)
    assert kit.calls("atc") == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            "atc_e10001",
            r"error codes: E10001\):\n  E10001: Value \[-1\] for parameter \[Inputs\] is invalid\. "
            r"Reason: maybe you should set input_shape to specify its shape\n  Solution: Try again",
        ),
        ("atc_e19999", r"error codes: E19999\):\n  E19999: Inner Error!"),
    ],
)
def test_atc_error_codes_are_surfaced(
    kit: Toolkit, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, message: str
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", fault)
    with pytest.raises(BackendError, match=message):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env)
    # nothing half-written (the store's lock folder aside)
    assert [p.name for p in (tmp_path / "cache").iterdir()] in ([], [".locks"])


def test_real_parameter_error_from_atc(kit: Toolkit, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"E10001: Value \[Ascend999\] for parameter \[--soc_version\]"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, soc_version="Ascend999")


def test_success_line_without_om(
    kit: Toolkit, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "atc_no_om")
    with pytest.raises(BackendError, match=r"atc reported success but wrote no model\*\.om"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env)
    assert [p.name for p in (tmp_path / "cache").iterdir()] in ([], [".locks"])


def test_atc_timeout_kills_atc(
    kit: Toolkit, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "atc_hang")
    start = time.monotonic()
    with pytest.raises(BackendError, match="atc did not finish within 3 s"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, timeout_s=3)
    assert time.monotonic() - start < 30
    pid = kit.calls("atc")[0]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("param", ["onnx_path", "cache_dir", "output_dir", "set_env"])
def test_shell_metacharacters_in_paths(kit: Toolkit, onnx_file: Path, tmp_path: Path, param: str) -> None:
    args = {
        "onnx_path": onnx_file,
        "cache_dir": tmp_path / "cache",
        "output_dir": tmp_path / "m",
        "set_env": kit.set_env,
    }
    args[param] = f"{args[param]}$(reboot)"
    with pytest.raises(BackendError, match=r"contains characters that are not allowed \('\$' '\(' '\)'\)"):
        convert_onnx(**args)
    assert kit.calls() == []


def test_dynamic_batch_and_wrong_batch(kit: Toolkit, tmp_path: Path) -> None:
    dynamic = tiny_dets_model(tmp_path / "dyn.onnx", batch="batch")
    result = convert_onnx(dynamic, tmp_path / "cache", set_env=kit.set_env, dynamic_batch_sizes=(1, 2))
    assert "--dynamic_batch_size=1,2" in result["atc_args"]
    assert "--input_shape=input.1:-1,3,16,16" in result["atc_args"]
    static = tiny_dets_model(tmp_path / "static.onnx")
    with pytest.raises(BackendError, match="batch 4 differs from the ONNX model's static batch 1"):
        convert_onnx(static, tmp_path / "cache", set_env=kit.set_env, batch=4)


def test_unknown_input_name(kit: Toolkit, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"has no input named 'images' \(inputs: input\.1\)"):
        convert_onnx(onnx_file, tmp_path / "cache", set_env=kit.set_env, input_name="images")
