"""The `gfocal` CLI runs every step without Airflow, and its gate e-mails through a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from aiosmtpd.controller import Controller

from gfocal_pipeline.config import ensure_demo_data


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
