"""Fixtures of the Ascend backend tests: the emulated CANN toolkit and an OM converted with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from emulators.models import tiny_dets_model
from emulators.runs import H, W
from emulators.toolkit import Toolkit, make_toolkit

from gfocal_pipeline.backends.atc import convert_onnx


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    """A fresh emulated toolkit (its set_env.sh and call log) per test."""
    return make_toolkit(tmp_path / "cann")


@pytest.fixture
def om(kit: Toolkit, tmp_path: Path) -> Path:
    """The tiny dets model converted by the emulated atc (H x W input)."""
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    result = convert_onnx(onnx_file, tmp_path / "cache", output_dir=tmp_path / "model", set_env=kit.set_env)
    return Path(result["om_path"])
