"""The `gfocal` CLI runs every step without Airflow, and its gate e-mails through a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
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
