"""Bad checkpoints given to the export: each is refused naming the file, and nothing is written.

The checks run when the checkpoint is loaded, before any tracing, so these exports fail fast. Every
case asserts the CheckpointError names the file and that the output folder stays empty (no .onnx, no
`.rejected.onnx`, no sidecar, no temporary file). Missing files and a missing key are covered in
test_export.py, the reading rules themselves in test_checkpoint.py.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from gfocal_pipeline.errors import CheckpointError
from gfocal_pipeline.export import export_onnx
from gfocal_pipeline.models.gfocalv2.checkpoint import random_state_dict

H, W = 256, 320  # the smallest export size the export tests use


class _WritesAFile:
    """Unpickled unsafely, this would create `path` (the proof that code ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _refused(checkpoint: Path, out: Path) -> str:
    """Export `checkpoint` into the empty folder `out`; the CheckpointError's message."""
    out.mkdir()
    with pytest.raises(CheckpointError) as info:
        export_onnx(checkpoint, out / "model.onnx", "portable", H, W)
    message = str(info.value)
    assert str(checkpoint) in message
    assert "Traceback" not in message
    assert sorted(p.name for p in out.iterdir()) == []  # no .onnx, .rejected.onnx, .json or temp file
    return message


def _zero_bytes(folder: Path, random_checkpoint: Path) -> Path:
    path = folder / "empty.pth"
    path.write_bytes(b"")
    return path


def _truncated(folder: Path, random_checkpoint: Path) -> Path:
    data = random_checkpoint.read_bytes()
    path = folder / "cut.pth"
    path.write_bytes(data[: len(data) // 2])  # a download cut short
    return path


def _other_model(folder: Path, random_checkpoint: Path) -> Path:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))
    path = folder / "classifier.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": other.state_dict()}, path)
    return path


CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "zero bytes": (_zero_bytes, r"is empty \(0 bytes\).*copy it again"),
    "truncated": (_truncated, r"truncated or damaged .*copy the file again"),
    "another model": (
        _other_model,
        r"does not match the GFocalV2 R50-FPN layout .*unexpected: 0\.weight .*state dict of another model",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_or_foreign_checkpoint_is_refused(case: str, tmp_path: Path, random_checkpoint: Path) -> None:
    make, pattern = CASES[case]
    (tmp_path / "in").mkdir()
    message = _refused(make(tmp_path / "in", random_checkpoint), tmp_path / "out")
    assert re.search(pattern, message, re.DOTALL), message


@pytest.mark.parametrize("form", ["zip", "legacy pickle"])
def test_code_executing_pickle_is_refused_not_run(form: str, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = {"meta": {"hook": _WritesAFile(marker)}, "state_dict": {"w": torch.zeros(2)}}
    checkpoint = tmp_path / "evil.pth"
    if form == "zip":
        torch.save(payload, checkpoint)
    else:  # the pre-1.6 format: a bare pickle stream, as mmcv-era tools wrote
        with open(checkpoint, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    message = _refused(checkpoint, tmp_path / "out")
    assert "unsafe to unpickle" in message and "nothing in it was run" in message
    assert not marker.exists()


def test_nan_weights_fail_the_export_naming_the_tensors(tmp_path: Path) -> None:
    """The acceptance of issue #13: a run with NaN weights fails at export, naming the tensors."""
    state = random_state_dict(0)
    state["bbox_head.gfl_reg.bias"][:] = float("nan")  # 68 values
    state["backbone.conv1.weight"][0, 0, 0, 0] = float("inf")
    checkpoint = tmp_path / "nan.pth"
    torch.save({"meta": {}, "state_dict": state}, checkpoint)
    message = _refused(checkpoint, tmp_path / "out")
    assert "non-finite values (NaN/Inf) in 2 floating tensor(s)" in message
    assert "backbone.conv1.weight (1 Inf)" in message and "bbox_head.gfl_reg.bias (68 NaN)" in message
    assert "re-export" in message
