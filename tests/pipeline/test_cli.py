"""The `gfocal` CLI runs every step without Airflow, and its gate e-mails through a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from gfocal_pipeline.workspace import ensure_demo_data


def _gfocal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gfocal_pipeline.cli", *args], capture_output=True, text=True
    )


class Inbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"


def test_cli_chain_and_gate(tmp_path: Path) -> None:
    demo = ensure_demo_data(tmp_path / "w")
    run = tmp_path / "run"
    onnx = run / "model" / "p.onnx"
    steps = [
        (
            "export",
            "--checkpoint",
            str(demo["checkpoint"]),
            "--output",
            str(onnx),
            "--height",
            "128",
            "--width",
            "160",
            "--dynamic-batch",
        ),
        (
            "preprocess",
            "--coco-root",
            str(demo["coco_root"]),
            "--run-dir",
            str(run),
            "--height",
            "128",
            "--width",
            "160",
            "--max-images",
            "3",
            "--shard-size",
            "2",
        ),
        ("infer", "--run-dir", str(run), "--model", str(onnx), "--batch-size", "2"),
        ("eval", "--run-dir", str(run)),
    ]
    outputs = {}
    for step in steps:
        result = _gfocal(*step)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[step[0]] = json.loads(result.stdout)
    assert outputs["export"]["candidates_per_image"] == 428  # 16x20 + 8x10 + 4x5 + 2x3 + 1x2
    assert outputs["preprocess"]["shards"] == ["00000", "00001"]
    assert outputs["infer"]["timing"]["images"] == 3
    assert set(outputs["eval"]["stats"]) >= {"AP", "AP50", "ARl"}

    inbox = Inbox()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    history = f"sqlite:///{tmp_path / 'h.sqlite'}"
    smtp = ("--smtp-host", "127.0.0.1", "--smtp-port", str(port), "--alert-to", "oncall@example.test")
    try:
        passed = _gfocal("gate", "--run-dir", str(run), "--history-url", history, *smtp)
        failed = _gfocal(
            "gate",
            "--run-dir",
            str(run),
            "--run-id",
            "second",
            "--history-url",
            history,
            "--min-ap",
            "0.5",
            *smtp,
        )
    finally:
        controller.stop()
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert json.loads(passed.stdout)["first_run"] is True
    assert failed.returncode == 1 and "regression" in failed.stderr
    assert len(inbox.messages) == 1 and "AP" in inbox.messages[0]["Subject"]


def _run_json(*args: str) -> dict:
    result = _gfocal(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_cli_help_of_the_ascend_steps() -> None:
    convert = _gfocal("convert", "--help")
    assert (
        convert.returncode == 0
        and "--precision-mode" in convert.stdout
        and "--cann-set-env" in convert.stdout
    )
    infer = _gfocal("infer", "--backend", "msame", "--help")
    assert infer.returncode == 0 and "ais_bench" in infer.stdout and "--outfmt" in infer.stdout
    bad = _gfocal("preprocess", "--coco-root", "/c", "--run-dir", "/r", "--images-dir", "../x")
    assert bad.returncode == 2 and "'images_dir'" in bad.stderr and "relative, normalized path" in bad.stderr


def test_cli_whole_ascend_path_against_the_emulators(tmp_path: Path) -> None:
    from emulators.toolkit import make_toolkit

    kit = make_toolkit(tmp_path / "cann")
    demo = ensure_demo_data(tmp_path / "w")
    coco = tmp_path / "coco"  # a COCO-format set with other names than val2017
    shutil.copytree(demo["coco_root"], coco)
    (coco / "val2017").rename(coco / "images2014")
    (coco / "annotations" / "instances_val2017.json").rename(coco / "annotations" / "instances_val2014.json")
    run = tmp_path / "runs" / "r1"
    size = ("--height", "128", "--width", "160")
    onnx = run / "model" / "gfocal_ascend.onnx"
    export = _run_json(
        "export", "--checkpoint", str(demo["checkpoint"]), "--output", str(onnx), "--variant", "ascend", *size
    )
    assert export["variant"] == "ascend" and onnx.is_file()
    pre = _run_json(
        "preprocess",
        "--coco-root",
        str(coco),
        "--images-dir",
        "images2014",
        "--annotations",
        "annotations/instances_val2014.json",
        "--run-dir",
        str(run),
        *size,
        "--max-images",
        "3",
        "--shard-size",
        "2",
    )
    assert pre["shards"] == ["00000", "00001"] and pre["images"] == 3
    env = ("--cann-set-env", str(kit.set_env))
    convert = _run_json("convert", "--run-dir", str(run), *env)
    assert convert["om_path"] == str(run / "model" / "gfocal.om") and convert["cached"] is False
    assert convert["soc_version"] == "Ascend310P3"  # detected with the emulated npu-smi
    assert _run_json("convert", "--run-dir", str(run), *env)["cached"] is True
    assert (tmp_path / "runs" / "cache" / "om").is_dir() and len(kit.calls("atc")) == 1
    infer = _run_json("infer", "--run-dir", str(run), "--backend", "msame", "--outfmt", "TXT", *env)
    assert infer["timing"]["images"] == 3 and [s["backend"] for s in infer["shards"]] == ["msame"] * 2
    assert len(kit.calls("msame")) == 2
    evaluation = _run_json("eval", "--run-dir", str(run), "--backend", "msame")
    assert evaluation["images"] == 3 and set(evaluation["stats"]) >= {"AP", "AP50"}


def _old_run(work: Path, run_id: str, days_ago: float) -> Path:
    """A finished run directory of `days_ago` with 30 kB of bulk inputs and a small summary."""
    run = work / "gfocal_onnxruntime" / run_id
    (run / "inputs" / "00000").mkdir(parents=True)
    (run / "inputs" / "00000" / "000000000001.bin").write_bytes(b"\0" * 30_000)
    (run / "eval" / "onnxruntime").mkdir(parents=True)
    (run / "eval" / "onnxruntime" / "stats.json").write_text('{"AP": 0.4}')
    created = time.time() - days_ago * 86400
    (run / "run.json").write_text(
        json.dumps({"dag_id": "gfocal_onnxruntime", "run_id": run_id, "created": created})
    )
    (run / "summary.json").write_text("{}")
    for path in [run, *run.rglob("*")]:
        os.utime(path, (created, created))
    return run


def test_cli_gc_dry_run_then_for_real_through_the_console_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gfocal_pipeline import cli
    from gfocal_pipeline.cache_store import Cache

    work = tmp_path / "work"
    runs = [_old_run(work, f"scheduled__{n}", 10 - n) for n in range(3)]
    entry = Cache(work).entry("inputs", {"n": 1}, verify="crc32")

    def build(tmp: Path) -> None:
        (tmp / "x.bin").write_bytes(b"\1" * 20_000)

    entry.get_or_build(build)
    os.utime(entry.record_path, (1000, 1000))
    monkeypatch.setenv("GFOCAL_WORK_DIR", str(work))  # the default of --work-dir

    assert cli.main(["gc", "--keep-runs", "1", "--cache-max-gb", "0", "--dry-run"]) == 0
    out = capsys.readouterr()
    dry = json.loads(out.out)
    assert dry["work_dir"] == str(work) and dry["dry_run"] is True
    assert dry["totals"]["runs_pruned"] == 2 and dry["totals"]["entries_evicted"] == 1
    assert out.err.startswith("gfocal gc: would free ") and "2 run directories pruned" in out.err
    assert all((run / "inputs").is_dir() for run in runs) and entry.path.is_dir()

    gfocal = Path(sys.executable).parent / "gfocal"  # the installed console script
    args = ["gc", "--work-dir", str(work), "--keep-runs", "1", "--cache-max-gb", "0"]
    result = subprocess.run([str(gfocal), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["dry_run"] is False and report["totals"] == dry["totals"]
    assert report["totals"]["bytes_freed"] >= 2 * 30_000 + 20_000
    assert "gfocal gc: freed " in result.stderr
    assert [(run / "inputs").exists() for run in runs] == [False, False, True]
    assert all((run / "pruned.json").is_file() for run in runs[:2]) and not entry.path.exists()
    assert (runs[0] / "eval" / "onnxruntime" / "stats.json").is_file()


def test_cli_gc_refuses_a_bad_keep_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gfocal_pipeline import cli

    runs = [_old_run(tmp_path, f"r{n}", 10 - n) for n in range(2)]
    assert cli.main(["gc", "--work-dir", str(tmp_path), "--keep-runs", "0"]) == 2
    err = capsys.readouterr().err
    assert "gfocal gc: error: --keep-runs 0: expected an integer >= 1" in err and "default 14" in err
    assert cli.main(["gc", "--work-dir", str(tmp_path), "--cache-max-gb", "-3"]) == 2
    assert "--cache-max-gb -3: expected a size in GB >= 0" in capsys.readouterr().err
    assert all((run / "inputs").is_dir() for run in runs)


def test_cli_infer_keep_candidates_reaches_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import gfocal_pipeline.steps as steps
    from gfocal_pipeline import cli

    calls: list[dict] = []
    monkeypatch.setattr(steps, "infer_step", lambda run_dir, shard, backend, **options: calls.append(options))
    monkeypatch.setattr(steps, "combined_timing", lambda run_dir, backend, **_: {})
    base = ["infer", "--run-dir", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--shard", "00000"]
    assert cli.main([*base, "--keep-candidates"]) == 0
    assert cli.main(base) == 0
    capsys.readouterr()
    assert calls[0]["keep_candidates"] is True and "keep_candidates" not in calls[1]
    for backend in ("torch", "msame"):
        args = cli.build_parser().parse_args(
            ["infer", "--run-dir", "/r", "--backend", backend, "--keep-candidates"]
        )
        assert cli._backend_options(args)["keep_candidates"] is True
