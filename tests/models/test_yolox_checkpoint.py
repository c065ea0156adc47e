"""Loading YOLOX checkpoints in mmdet's layout: strict by default, mismatches named by key, the error
names the model and the official file; the random demo checkpoint is deterministic and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gfocal_pipeline import adapters
from gfocal_pipeline.errors import CheckpointError
from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint as write_gfocal_checkpoint
from gfocal_pipeline.models.yolox import YOLOX_S, YoloxDeploy
from gfocal_pipeline.models.yolox.checkpoint import load_yolox
from gfocal_pipeline.models.yolox.spec import SPEC as MODEL_SPEC
from gfocal_pipeline.models.yolox.weights import random_state_dict, write_random_checkpoint


def _official_style(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A file shaped like mmdet's released checkpoints: `meta` beside `state_dict`."""
    torch.save({"meta": {"mmdet_version": "2.18.0", "epoch": 300}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_state_dict(seed=3)


@pytest.fixture
def registered():
    """The adapter as the registry has it (`yolox` in adapters.py)."""
    assert "yolox" in adapters.model_names()
    return adapters.load_adapter("yolox")


def test_a_checkpoint_in_the_official_layout_loads_every_tensor(weights, tmp_path: Path) -> None:
    model = load_yolox(_official_style(tmp_path / "yolox.pth", weights))
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)
    assert not model.training


def test_a_renamed_key_is_refused_naming_both_names(weights, tmp_path: Path) -> None:
    state = dict(weights)
    state["bbox_head.multi_level_conv_objectness.1.weight"] = state.pop(
        "bbox_head.multi_level_conv_obj.1.weight"
    )
    with pytest.raises(CheckpointError) as info:
        load_yolox(_official_style(tmp_path / "renamed.pth", state))
    message = str(info.value)
    assert "does not match the YOLOX-s layout (2 problem(s): 1 missing, 1 unexpected)" in message
    assert "missing: bbox_head.multi_level_conv_obj.1.weight (1, 128, 1, 1)" in message
    assert "unexpected: bbox_head.multi_level_conv_objectness.1.weight (1, 128, 1, 1)" in message
    assert YOLOX_S.official_checkpoint in message


def test_a_missing_key_is_refused_naming_it(weights, tmp_path: Path) -> None:
    state = {k: v for k, v in weights.items() if k != "backbone.stage4.1.conv2.bn.running_var"}
    with pytest.raises(
        CheckpointError, match=r"missing: backbone\.stage4\.1\.conv2\.bn\.running_var \(512,\)"
    ):
        load_yolox(_official_style(tmp_path / "missing.pth", state))


def test_a_wrong_class_count_is_refused_unless_not_strict(weights, tmp_path: Path) -> None:
    state = dict(weights)
    for level in range(3):
        state[f"bbox_head.multi_level_conv_cls.{level}.weight"] = torch.zeros(20, 128, 1, 1)
        state[f"bbox_head.multi_level_conv_cls.{level}.bias"] = torch.zeros(20)
    path = _official_style(tmp_path / "voc.pth", state)
    with pytest.raises(CheckpointError, match=r"6 problem\(s\): 6 wrong shape"):
        load_yolox(path)
    model = load_yolox(path, strict=False)  # what fits is loaded, the classifiers stay as built
    key = "neck.out_convs.2.conv.weight"
    assert torch.equal(model.state_dict()[key], weights[key])


def test_another_model_s_checkpoint_is_refused_as_foreign(tmp_path: Path) -> None:
    path = write_gfocal_checkpoint(tmp_path / "gfocal.pth")
    with pytest.raises(CheckpointError) as info:
        load_yolox(path)
    assert "It has no key of YOLOX-s at all: this is the state dict of another model" in str(info.value)


def test_the_random_checkpoint_is_deterministic_and_loads_through_the_adapter(
    registered, tmp_path: Path
) -> None:
    first = registered.write_random_checkpoint(tmp_path / MODEL_SPEC.demo_checkpoint, seed=0)
    again = write_random_checkpoint(tmp_path / "again.pth", seed=0)
    other = write_random_checkpoint(tmp_path / "other.pth", seed=1)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    network = registered.load_network(first)
    deploy = registered.reference_module(network, 128, 160)
    assert isinstance(deploy, YoloxDeploy) and not deploy.swaps_channels  # BGR, as the spec says
    assert torch.equal(deploy.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(
        deploy.std, torch.ones(1, 3, 1, 1)
    )
    with torch.inference_mode():
        boxes, scores = deploy(torch.full((1, 3, 128, 160), 114.0))
    assert boxes.shape == (1, 16 * 20 + 8 * 10 + 4 * 5, 4) and scores.shape == (1, boxes.shape[1], 80)
    assert registered.spec == MODEL_SPEC and adapters.model_spec("yolox") == MODEL_SPEC
