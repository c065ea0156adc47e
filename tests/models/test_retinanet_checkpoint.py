"""Loading RetinaNet checkpoints in mmdet's layout: strict by default, mismatches named by key, and
the error names the model and the official file (the same safe loader as GFocalV2's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gfocal_pipeline.errors import CheckpointError
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, write_random_checkpoint
from gfocal_pipeline.models.retinanet import RETINANET_R50_FPN_1X, build_retinanet
from gfocal_pipeline.models.retinanet.checkpoint import load_retinanet
from gfocal_pipeline.models.retinanet.weights import randomize


def _official_style(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A file shaped like mmdet's released checkpoints: `meta` beside `state_dict`."""
    torch.save({"meta": {"mmdet_version": "2.0.0", "epoch": 12}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    model = build_retinanet()
    randomize(model, seed=3)
    return model.state_dict()


def test_a_checkpoint_in_the_official_layout_loads_every_tensor(weights, tmp_path: Path) -> None:
    model = load_retinanet(_official_style(tmp_path / "retinanet.pth", weights))
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)
    assert not model.training


def test_a_gfocal_checkpoint_is_refused_naming_the_model_and_the_fix(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "gfocal.pth")
    with pytest.raises(CheckpointError) as info:
        load_retinanet(path)
    message = str(info.value)
    assert "RetinaNet R50-FPN 1x" in message and RETINANET_R50_FPN_1X.official_checkpoint in message
    # GFocalV2's head convs are conv + GroupNorm without bias; RetinaNet's are plain convs with bias
    assert "missing: bbox_head.cls_convs.0.conv.bias (256,)" in message
    assert "unexpected: bbox_head.cls_convs.0.gn.weight (256,)" in message
    assert "wrong shape: neck.fpn_convs.3.conv.weight expected (256, 2048, 3, 3)" in message
    assert "GFocalV2" not in message


def test_a_retinanet_checkpoint_is_refused_by_the_gfocal_loader(weights, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not match the GFocalV2 R50-FPN layout"):
        load_model(_official_style(tmp_path / "retinanet.pth", weights))


def test_a_wrong_class_count_is_refused_unless_not_strict(weights, tmp_path: Path) -> None:
    state = dict(weights)
    state["bbox_head.retina_cls.weight"] = torch.zeros(9 * 20, 256, 3, 3)
    state["bbox_head.retina_cls.bias"] = torch.zeros(9 * 20)
    path = _official_style(tmp_path / "voc.pth", state)
    with pytest.raises(CheckpointError, match=r"2 problem\(s\): 2 wrong shape"):
        load_retinanet(path)
    model = load_retinanet(path, strict=False)  # what fits is loaded, the classifier stays as built
    assert torch.equal(
        model.state_dict()["neck.fpn_convs.3.conv.weight"], weights["neck.fpn_convs.3.conv.weight"]
    )


@pytest.mark.reference
def test_the_published_facts_are_mmdet_metafile_s() -> None:
    """The official file and AP come from the metafile shipped inside the installed mmdet 3.3."""
    import mmdet
    import yaml

    metafile = Path(mmdet.__file__).parent / ".mim" / "configs" / "retinanet" / "metafile.yml"
    models = yaml.safe_load(metafile.read_text())["Models"]
    entry = next(m for m in models if m["Name"] == "retinanet_r50_fpn_1x_coco")
    box_ap = entry["Results"][0]["Metrics"]["box AP"]
    assert RETINANET_R50_FPN_1X.published_ap == pytest.approx(box_ap / 100)
    assert RETINANET_R50_FPN_1X.official_checkpoint == entry["Weights"].rsplit("/", 1)[1]
