"""CANN environment capture, the tool process runner, npu-smi parsing, AIPP config, emulated NMS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from emulators.toolkit import PYLIB, make_toolkit

from gfocal_pipeline.backends import cann_env
from gfocal_pipeline.backends.aipp import aipp_config, parse_aipp_config
from gfocal_pipeline.backends.npu_smi import detect_soc_version, parse_npu_smi_info
from gfocal_pipeline.backends.process import ProcessHandle, check_safe_path, check_safe_value, run_tool
from gfocal_pipeline.errors import BackendError
from gfocal_pipeline.postprocess import multiclass_nms
from gfocal_pipeline.preprocess import normalize

sys.path.insert(0, str(PYLIB))
from gfocal_emulator import aipp as emulated_aipp
from gfocal_emulator.nms import batch_multiclass_nms


# --- CANN environment -------------------------------------------------------------------------------
def test_set_env_missing_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "Ascend" / "ascend-toolkit" / "set_env.sh"
    with pytest.raises(BackendError, match=r"set_env\.sh' does not exist; install the Ascend CANN toolkit"):
        cann_env.load_cann_env(missing)


def test_set_env_delta_cache_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = make_toolkit(tmp_path, version="8.0.RC2")
    monkeypatch.setenv("GFOCAL_TEST_KEEP", "kept")
    env = cann_env.load_cann_env(kit.set_env)
    assert env.delta["ASCEND_TOOLKIT_HOME"] == str(kit.home / "latest")
    assert env.delta["PATH"].startswith(str(kit.home / "latest" / "bin") + ":")
    assert "GFOCAL_TEST_KEEP" not in env.delta  # unchanged variables are not part of the delta
    assert cann_env.cann_version(env) == "8.0.RC2"
    assert cann_env.load_cann_env(kit.set_env) is env  # cached
    # variables set after the capture still reach the tools
    monkeypatch.setenv("GFOCAL_TEST_LATER", "later")
    merged = env.environ({"EXTRA": "1"})
    assert merged["GFOCAL_TEST_LATER"] == "later" and merged["EXTRA"] == "1"
    assert merged["ASCEND_OPP_PATH"] == str(kit.home / "latest" / "opp")
    # editing the script invalidates the cache
    time.sleep(0.01)
    kit.set_env.write_text(kit.set_env.read_text() + "export GFOCAL_EXTRA_VAR=1\n")
    again = cann_env.load_cann_env(kit.set_env)
    assert again is not env and again.delta["GFOCAL_EXTRA_VAR"] == "1"


def test_set_env_path_is_passed_as_argument_not_code(tmp_path: Path) -> None:
    odd = tmp_path / "dir with space"
    kit = make_toolkit(odd)
    env = cann_env.load_cann_env(kit.set_env)
    assert env.which("atc") == str(kit.home / "latest" / "bin" / "atc")


def test_set_env_with_shell_metacharacters_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"set_env\.sh path .* not allowed \(';'\)"):
        cann_env.load_cann_env(f"{tmp_path}/x;rm -rf /set_env.sh")


def test_failing_set_env_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "set_env.sh"
    script.write_text("return 3\n")
    with pytest.raises(BackendError, match=r"sourcing CANN environment script .* failed \(exit 3\)"):
        cann_env.load_cann_env(script)


def test_unknown_cann_version(tmp_path: Path) -> None:
    script = tmp_path / "set_env.sh"
    script.write_text(f"export ASCEND_TOOLKIT_HOME={tmp_path}/nothing\n")
    assert cann_env.cann_version(cann_env.load_cann_env(script)) == "unknown"


# --- process runner ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [";", "|", "&", "$", "`", "<", ">", "\n", "*", "'", '"', "\\", "(", "~"])
def test_shell_metacharacters_rejected(bad: str) -> None:
    with pytest.raises(BackendError, match=r"model path .* contains characters that are not allowed"):
        check_safe_path(f"/data/run{bad}x/model.om", "model path")


def test_safe_values_pass_and_extra_forbidden() -> None:
    assert check_safe_value("/data/runs/manual__2024-01-01T00:00:00+00:00/m.om", "p").endswith("m.om")
    with pytest.raises(BackendError, match=r"\(','\)"):
        check_safe_value("a,b", "input dir", ",")


def test_run_tool_streams_both_streams_and_keeps_rc(caplog: pytest.LogCaptureFixture) -> None:
    code = "import sys; print('out 1', flush=True); print('err 1', file=sys.stderr, flush=True); sys.exit(4)"
    with caplog.at_level("INFO"):
        result = run_tool([sys.executable, "-c", code], env=dict(os.environ), name="demo", timeout_s=30)
    assert result.returncode == 4
    assert sorted(result.lines) == ["err 1", "out 1"]
    assert (result.stdout_lines, result.stderr_lines) == (1, 1)
    assert "[demo] out 1" in caplog.text and "[demo] err 1" in caplog.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it no longer runs
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _parent_with_child(pid_file: Path) -> list[str]:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"demo did not finish within 2 s .*Last output:\nstarted"):
        run_tool(_parent_with_child(pid_file), env=dict(os.environ), name="demo", timeout_s=2)
    assert time.monotonic() - start < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the tool's child survived the timeout"


def test_handle_kill_stops_a_running_tool(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    handle = ProcessHandle()
    killer = threading.Timer(1.5, handle.kill)
    killer.start()
    start = time.monotonic()
    with pytest.raises(BackendError, match="demo was killed on request"):
        run_tool(_parent_with_child(pid_file), env=dict(os.environ), name="demo", timeout_s=60, handle=handle)
    killer.join()
    assert time.monotonic() - start < 20
    assert not _alive(int(pid_file.read_text()))


def test_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"could not start demo \('/nonexistent/tool'\)"):
        run_tool(["/nonexistent/tool"], env=dict(os.environ), name="demo", timeout_s=5)


# --- npu-smi ----------------------------------------------------------------------------------------
NPU_SMI_310 = """\
+-------------------------------------------------------------------------------------------+
| npu-smi 20.2.0                       Version: 20.2.0                                      |
+-------------------+-----------------+-----------------------------------------------------+
| NPU     Name      | Health          | Power(W)          Temp(C)                           |
| Chip              | Bus-Id          | AICore(%)         Memory-Usage(MB)                  |
+===================+=================+=====================================================+
| 0       310       | OK              | 12.8              45                                |
| 0                 | 0000:05:00.0    | 0                 2621 / 8192                       |
+===================+=================+=====================================================+
| 1       310       | Warning         | 12.8              44                                |
| 0                 | 0000:06:00.0    | 0                 2621 / 8192                       |
+===================+=================+=====================================================+
"""


def test_parse_npu_smi_old_310_table() -> None:
    devices = parse_npu_smi_info(NPU_SMI_310)
    assert [(d.npu_id, d.name, d.health) for d in devices] == [(0, "310", "OK"), (1, "310", "Warning")]
    assert devices[0].soc_version == "Ascend310"


def test_detect_soc_from_emulated_npu_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = make_toolkit(tmp_path)
    env = cann_env.load_cann_env(kit.set_env)
    assert detect_soc_version(env) == "Ascend310P3"
    monkeypatch.setenv("GFOCAL_EMULATOR_CHIP", "310")
    assert detect_soc_version(env) == "Ascend310"


def test_npu_smi_without_chip_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = make_toolkit(tmp_path)
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "npu_smi_no_chip")
    with pytest.raises(BackendError, match=r"`npu-smi info` listed no NPU .* pass soc_version explicitly"):
        detect_soc_version(cann_env.load_cann_env(kit.set_env))


def test_npu_smi_missing(tmp_path: Path) -> None:
    kit = make_toolkit(tmp_path, tools=("atc", "msame"))
    with pytest.raises(BackendError, match="npu-smi is not on PATH"):
        detect_soc_version(cann_env.load_cann_env(kit.set_env))


# --- AIPP -------------------------------------------------------------------------------------------
def test_aipp_config_values() -> None:
    cfg = parse_aipp_config(aipp_config(160, 128))
    assert cfg["aipp_mode"] == "static" and cfg["input_format"] == "RGB888_U8"
    assert (cfg["src_image_size_w"], cfg["src_image_size_h"]) == ("160", "128")
    assert cfg["rbuv_swap_switch"] == "true" and cfg["csc_switch"] == "false"
    # channel 0 is R after the swap: mean 123.675 = 123 (uint8 mean) + 0.675 (min), std 58.395
    assert (cfg["mean_chn_0"], cfg["min_chn_0"]) == ("123", "0.675")
    assert (cfg["mean_chn_2"], cfg["min_chn_2"]) == ("103", "0.53")
    assert float(cfg["var_reci_chn_1"]) == pytest.approx(1 / 57.12)


def test_aipp_arithmetic_matches_host_normalization() -> None:
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, size=(1, 24, 32, 3), dtype=np.uint8)
    cfg = emulated_aipp.parse(aipp_config(32, 24))
    on_npu = emulated_aipp.apply(bgr, cfg, 24, 32)[0]
    on_host = normalize(bgr[0]).transpose(2, 0, 1)
    # only the fp16 storage of min_chn/var_reci differs
    np.testing.assert_allclose(on_npu, on_host, atol=2e-3)


def test_aipp_config_rejects_bad_input() -> None:
    with pytest.raises(BackendError, match="must be positive"):
        aipp_config(0, 128)
    with pytest.raises(BackendError, match="no 'aipp_op"):
        parse_aipp_config("input_format: RGB888_U8")


# --- emulated BatchMultiClassNMS vs the host NMS ----------------------------------------------------
def test_emulated_nms_matches_host_nms_on_fp16_data() -> None:
    rng = np.random.default_rng(0)
    m, classes = 300, 82
    xy = rng.uniform(0, 200, size=(m, 2))
    wh = rng.uniform(10, 80, size=(m, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float16)
    scores = np.zeros((m, classes), np.float16)
    # distinct fp16 scores (step 2.9e-4 > fp16 resolution here) so the order is unambiguous
    distinct = np.linspace(0.06, 0.5, m * 5).astype(np.float16)
    assert np.unique(distinct).size == m * 5
    scores[:, :5] = rng.permutation(distinct).reshape(m, 5)
    out_boxes, out_scores, out_classes, out_num = batch_multiclass_nms(
        boxes[None, :, None, :], scores[None], 0.05, 0.6, 100, 100
    )
    host = multiclass_nms(boxes.astype(np.float32), scores[:, :80].astype(np.float32))
    n = int(out_num[0, 0])
    assert n == len(host) == 100
    np.testing.assert_array_equal(out_classes[0, :n].astype(np.int64), host.labels)
    np.testing.assert_allclose(out_scores[0, :n].astype(np.float32), host.scores, rtol=1e-3)
    np.testing.assert_allclose(out_boxes[0, :n].astype(np.float32), host.boxes, atol=1e-3)


def test_emulated_nms_pads_with_zeros() -> None:
    boxes = np.array([[[[0, 0, 10, 10]], [[1, 1, 10, 10]], [[50, 50, 60, 60]]]], np.float16)
    scores = np.zeros((1, 3, 4), np.float16)
    scores[0, :, 2] = [0.9, 0.8, 0.7]  # box 1 overlaps box 0 (IoU 0.81) -> suppressed
    scores[0, 1, 3] = 0.04  # below the threshold
    b, s, c, num = batch_multiclass_nms(boxes, scores, 0.05, 0.6, 100, 5)
    assert num[0, 0] == 2
    np.testing.assert_array_equal(c[0], np.array([2, 2, 0, 0, 0], np.float16))
    np.testing.assert_allclose(s[0].astype(np.float32), [0.9, 0.7, 0, 0, 0], atol=1e-3)
    np.testing.assert_array_equal(b[0, 2:], 0)


def test_emulator_scripts_are_executable() -> None:
    for tool in ("atc", "msame", "npu-smi"):
        script = PYLIB.parent / "bin" / tool
        assert script.read_text().startswith("#!/usr/bin/env python3\n")
    out = subprocess.run(
        [sys.executable, str(PYLIB.parent / "bin" / "npu-smi"), "info"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| 0       310P3     | OK" in out.stdout
