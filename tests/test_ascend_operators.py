"""AtcConvertOperator and MsameInferOperator through `execute()` with a minimal context."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from emulators.models import tiny_dets_model
from emulators.runs import IDS, SHARD, write_run
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.layout import read_shard_outputs
from operators.ascend import AtcConvertOperator, MsameInferOperator


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    return make_toolkit(tmp_path / "cann")


def convert_operator(kit: Toolkit, tmp_path: Path, **overrides: object) -> AtcConvertOperator:
    options = {
        "task_id": "convert",
        "onnx_path": str(tiny_dets_model(tmp_path / "tiny.onnx")),
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "run" / "model"),
        "set_env": str(kit.set_env),
        **overrides,
    }
    return AtcConvertOperator(**options)


def test_convert_operator_pushes_om_facts_and_reuses_cache(kit: Toolkit, tmp_path: Path) -> None:
    first = convert_operator(kit, tmp_path).execute(context={})
    assert set(first) >= {
        "om_path",
        "om_sha256",
        "soc_version",
        "cann_version",
        "atc_args",
        "cached",
        "convert_seconds",
    }
    assert first["cached"] is False and Path(first["om_path"]).is_file()
    assert first["soc_version"] == "Ascend310P3" and first["cann_version"] == "7.0.RC1"
    second = convert_operator(kit, tmp_path, dynamic_batch_sizes="", batch="1").execute(context={})
    assert second["cached"] is True and second["om_sha256"] == first["om_sha256"]
    assert len(kit.calls("atc")) == 1


def test_convert_operator_validates_arguments(kit: Toolkit, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"cache_dir .* contains characters that are not allowed \('\|'\)"):
        convert_operator(kit, tmp_path, cache_dir="/tmp/cache|tee")
    with pytest.raises(BackendError, match="input_dtype 'int8' is not one of float32, uint8"):
        convert_operator(kit, tmp_path, input_dtype="int8")
    # templated values are checked when the task runs
    op = convert_operator(kit, tmp_path, soc_version="{{ params.soc }}")
    op.soc_version = "Ascend310P3;reboot"
    with pytest.raises(BackendError, match=r"soc_version .* contains characters that are not allowed"):
        op.execute(context={})
    assert kit.calls("atc") == []


def test_convert_operator_on_kill_stops_atc(
    kit: Toolkit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "atc_hang")
    op = convert_operator(kit, tmp_path, soc_version="Ascend310P3")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute(context={})
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    worker = threading.Thread(target=run)
    start = time.monotonic()
    worker.start()
    deadline = time.monotonic() + 20
    while not kit.calls("atc") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    op.on_kill()
    worker.join(timeout=30)
    assert not worker.is_alive() and time.monotonic() - start < 40
    assert len(errors) == 1 and "atc was killed on request" in str(errors[0])


def test_infer_operator_msame_and_ais_bench(kit: Toolkit, tmp_path: Path) -> None:
    om = convert_operator(kit, tmp_path).execute(context={})["om_path"]
    write_run(tmp_path / "run")
    for tool in ("msame", "ais_bench"):
        op = MsameInferOperator(
            task_id=f"infer_{tool}",
            run_dir=str(tmp_path / "run"),
            shard=SHARD,
            om_path=om,
            tool=tool,
            device="2",
            set_env=str(kit.set_env),
        )
        xcom = op.execute(context={})
        assert set(xcom) == {
            "backend",
            "shard",
            "images",
            "output_dir",
            "fps",
            "latency_ms",
            "device",
            "batch_size",
            "reused",
        }
        assert xcom["batch_size"] == 1
        assert (xcom["backend"], xcom["shard"], xcom["images"], xcom["device"]) == (tool, SHARD, len(IDS), 2)
        assert xcom["fps"] == pytest.approx(1000.0 / xcom["latency_ms"]["mean"])
        _, arrays = read_shard_outputs(Path(xcom["output_dir"]))
        assert arrays["image_ids"].tolist() == IDS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": 256}, "device id 256 is out of range"),
        ({"device": "-1"}, "device id -1 is out of range"),
        ({"tool": "benchmark"}, "tool 'benchmark' is not one of msame, ais_bench"),
        ({"outfmt": "NPY"}, "outfmt 'NPY' is not supported by msame"),
        ({"om_path": "/models/a.om;reboot"}, r"om_path .* not allowed \(';'\)"),
        ({"run_dir": "/runs/$(id)"}, r"run_dir .* not allowed"),
        ({"shard": "00000`x`"}, r"shard .* not allowed"),
        ({"batch_size": 2}, r"msame batch_size must be 1 \(got 2\): msame .* has no file batching"),
        ({"batch_size": "0", "tool": "ais_bench"}, "batch_size must be >= 1, got 0"),
    ],
)
def test_infer_operator_validates_arguments(overrides: dict, message: str) -> None:
    options = {
        "task_id": "infer",
        "run_dir": "/runs/r",
        "shard": SHARD,
        "om_path": "/models/a.om",
        **overrides,
    }
    with pytest.raises(BackendError, match=message):
        MsameInferOperator(**options)


def test_infer_operator_checks_rendered_values(kit: Toolkit, tmp_path: Path) -> None:
    op = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        om_path="/m/a.om",
        device="{{ params.device }}",
    )
    op.device = "300"  # what the template rendered to
    with pytest.raises(BackendError, match="device id 300 is out of range"):
        op.execute(context={})


def test_infer_operator_ais_bench_rendered_batch_size(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "dyn.onnx", batch="N")
    om = convert_operator(kit, tmp_path, onnx_path=str(onnx_file), dynamic_batch_sizes="1,2").execute(
        context={}
    )["om_path"]
    write_run(tmp_path / "run")
    op = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        om_path=om,
        tool="ais_bench",
        batch_size="{{ params.batch_size }}",
        set_env=str(kit.set_env),
    )
    op.batch_size = "2"  # what the template rendered to
    xcom = op.execute(context={})
    assert xcom["batch_size"] == 2 and xcom["images"] == len(IDS)
    assert xcom["fps"] == pytest.approx(2 * 1000.0 / xcom["latency_ms"]["mean"])
    argv = kit.calls("ais_bench")[-1]["argv"]
    assert argv[argv.index("--dymBatch") + 1] == "2"
