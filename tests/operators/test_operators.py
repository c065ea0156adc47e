"""AtcConvertOperator and the one InferOperator (MsameInferOperator) through `execute()`."""

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
from operators.ascend import AtcConvertOperator
from operators.infer import InferOperator, MsameInferOperator


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    return make_toolkit(tmp_path / "cann")


def convert_operator(kit: Toolkit, tmp_path: Path, **overrides: object) -> AtcConvertOperator:
    options = {
        "task_id": "convert",
        "run_dir": str(tmp_path / "run"),
        "onnx_path": str(tiny_dets_model(tmp_path / "tiny.onnx")),
        "cache_dir": str(tmp_path / "cache"),
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
    assert first["om_path"] == str(tmp_path / "run" / "model" / "gfocal.om")  # the run layout's OM
    assert first["soc_version"] == "Ascend310P3" and first["cann_version"] == "7.0.RC1"
    second = convert_operator(kit, tmp_path, batch_size=1).execute(context={})
    assert second["cached"] is True and second["om_sha256"] == first["om_sha256"]
    assert len(kit.calls("atc")) == 1


def test_convert_operator_validates_arguments(kit: Toolkit, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"OM cache directory .* characters that are not allowed \('\|'\)"):
        convert_operator(kit, tmp_path, cache_dir="/tmp/cache|tee").execute(context={})
    with pytest.raises(BackendError, match="input_dtype 'int8' is not one of float32, uint8"):
        convert_operator(kit, tmp_path, input_dtype="int8").execute(context={})
    # templated values are checked when the task runs, after rendering
    op = convert_operator(kit, tmp_path, soc_version="{{ params.soc }}")
    op.soc_version = "Ascend310P3;reboot"
    with pytest.raises(BackendError, match=r"soc_version .* is not like 'Ascend310P3'"):
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
            model=om,
            backend=tool,
            options={"device": 2, "set_env": str(kit.set_env)},
        )
        xcom = op.execute(context={})
        assert set(xcom) == {
            "backend",
            "shard",
            "images",
            "output_dir",
            "timing",
            "fps",
            "latency_ms",
            "device",
            "batch_size",
            "reused",
            "cached",
            "kind",
            "output_bytes",
        }
        assert xcom["batch_size"] == 1 and xcom["cached"] is False and xcom["kind"] == "dets"
        assert (xcom["backend"], xcom["shard"], xcom["images"], xcom["device"]) == (tool, SHARD, len(IDS), 2)
        assert xcom["fps"] == pytest.approx(1000.0 / xcom["latency_ms"]["mean"])
        _, arrays = read_shard_outputs(Path(xcom["output_dir"]))
        assert arrays["image_ids"].tolist() == IDS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"options": {"device": 256}}, "device id 256 is out of range"),
        ({"options": {"device": -1}}, "device id -1 is out of range"),
        (
            {"backend": "benchmark"},
            "unknown backend 'benchmark'; choose one of: ais_bench, msame, onnxruntime",
        ),
        ({"options": {"outfmt": "NPY"}}, "outfmt 'NPY' is not supported by msame"),
        ({"model": "/models/a.om;reboot"}, r"OM model path .* not allowed \(';'\)"),
        ({"options": {"tool": "msame"}}, "bad options for backend 'msame'"),
        ({"batch_size": 2}, r"msame batch_size must be 1 \(got 2\): msame .* has no file batching"),
        ({"batch_size": 0, "backend": "ais_bench"}, "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_infer_operator_validates_arguments_at_parse_time(overrides: dict, message: str) -> None:
    options = {"task_id": "infer", "run_dir": "/runs/r", "shard": SHARD, "model": "/models/a.om", **overrides}
    with pytest.raises(BackendError, match=message):
        MsameInferOperator(**options)


def test_infer_operator_checks_rendered_values(kit: Toolkit, tmp_path: Path) -> None:
    op = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        model="/m/a.om",
        options={"device": "{{ params.device }}"},
    )
    op.options = {"device": 300}  # what the template rendered to
    with pytest.raises(BackendError, match="device id 300 is out of range"):
        op.execute(context={})


def test_infer_operator_refuses_an_unsafe_run_directory(kit: Toolkit, tmp_path: Path) -> None:
    om = convert_operator(kit, tmp_path).execute(context={})["om_path"]
    unsafe = tmp_path / "runs$(id)"
    write_run(unsafe)
    op = MsameInferOperator(
        task_id="infer", run_dir=str(unsafe), shard=SHARD, model=om, options={"set_env": str(kit.set_env)}
    )
    with pytest.raises(BackendError, match=r"input directory .* not allowed \('\$' '\(' '\)'\)"):
        op.execute(context={})
    assert kit.calls("msame") == []


def test_infer_operator_ais_bench_rendered_batch_size(kit: Toolkit, tmp_path: Path) -> None:
    onnx_file = tiny_dets_model(tmp_path / "dyn.onnx", batch="N")
    om = convert_operator(kit, tmp_path, onnx_path=str(onnx_file), batch_size=2).execute(context={})[
        "om_path"
    ]
    write_run(tmp_path / "run")
    op = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        model=om,
        backend="ais_bench",
        batch_size="{{ params.batch_size }}",
        options={"set_env": str(kit.set_env)},
    )
    op.batch_size = 2  # what the template rendered to (native)
    xcom = op.execute(context={})
    assert xcom["batch_size"] == 2 and xcom["images"] == len(IDS)
    assert xcom["fps"] == pytest.approx(2 * 1000.0 / xcom["latency_ms"]["mean"])
    argv = kit.calls("ais_bench")[-1]["argv"]
    assert argv[argv.index("--dymBatch") + 1] == "2"


def test_one_infer_operator_serves_the_in_process_backends(tmp_path: Path) -> None:
    assert MsameInferOperator.__mro__[1] is InferOperator
    op = InferOperator(task_id="infer", run_dir=str(tmp_path), shard=SHARD, model=str(tmp_path / "x.onnx"))
    assert op.backend == "onnxruntime"  # built when the task runs (it loads the model)
    with pytest.raises(BackendError, match="does not exist; run the export step"):
        op.execute(context={})


@pytest.mark.parametrize(
    ("variant", "dtype", "batch_size", "dynamic", "normalize"),
    [
        ("portable", "uint8", 1, True, True),
        ("ascend", "uint8", 1, False, False),
        ("ascend", "float32", 4, True, False),
    ],
)
def test_export_operator_writes_the_layouts_graph_with_the_parity_options(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variant: str,
    dtype: str,
    batch_size: int,
    dynamic: bool,
    normalize: bool,
) -> None:
    import gfocal_pipeline.export as export
    from operators.export import OnnxExportOperator

    calls: list[dict] = []

    class Result:
        def to_xcom(self) -> dict:
            return {"onnx_path": str(calls[-1]["output"]), "onnx_sha256": "0" * 64, "parity_max_abs_err": 0.0}

    monkeypatch.setattr(export, "export_onnx", lambda **kwargs: calls.append(kwargs) or Result())
    op = OnnxExportOperator(
        task_id="export",
        run_dir=str(tmp_path),
        checkpoint="/c.pth",
        variant=variant,
        dtype=dtype,
        batch_size=batch_size,
        parity_threshold=0.01,
        max_unexplained=2,
    )
    xcom = op.execute(context={})
    (call,) = calls
    assert xcom["onnx_path"] == str(tmp_path / "model" / f"gfocal_{variant}.onnx")
    assert (call["dynamic_batch"], call["normalize_in_graph"]) == (dynamic, normalize)
    assert (call["parity_threshold"], call["max_unexplained"]) == (0.01, 2)


def test_errors_no_retry_can_heal_fail_the_task_at_once(kit: Toolkit, tmp_path: Path) -> None:
    """Bad options and an OM converted for another input skip the retries (AirflowFailException)."""
    from airflow.sdk.exceptions import AirflowFailException

    from operators.pipeline import PrepareRunOperator

    prepare = PrepareRunOperator(task_id="prepare", config={"work_dir": "relative/dir"})

    class Dag:
        dag_id = "gfocal_onnxruntime"

    with pytest.raises(AirflowFailException, match=r"ConfigError: parameter .* must be an absolute"):
        prepare.execute(context={"dag": Dag(), "run_id": "manual__1"})
    om = convert_operator(kit, tmp_path).execute(context={})["om_path"]  # float32 16x16
    write_run(tmp_path / "run", dtype="uint8")
    infer = MsameInferOperator(
        task_id="infer",
        run_dir=str(tmp_path / "run"),
        shard=SHARD,
        model=om,
        options={"set_env": str(kit.set_env)},
    )
    with pytest.raises(
        AirflowFailException, match=r"OmInputMismatchError: the run's input \(uint8 NHWC 16x16"
    ):
        infer.execute(context={})
    assert kit.calls("msame") == []
