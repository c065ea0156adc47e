"""The model's state_dict equals the official checkpoint layout, derived here from the reference rules."""

from __future__ import annotations

from gfocal_pipeline.models.gfocalv2 import build_model

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (channels,)) for k in BN_KEYS}


def official_layout() -> dict[str, tuple[int, ...]]:
    """pipeline-facts.md §1.2, written out rule by rule (torchvision ResNet names, mmcv ConvModule)."""
    keys: dict[str, tuple[int, ...]] = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    inplanes = 64
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (layer - 1)
        for block in range(blocks):
            p = f"backbone.layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    for i, c in enumerate((512, 1024, 2048)):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    for tower in ("cls_convs", "reg_convs"):
        for i in range(4):
            keys[f"bbox_head.{tower}.{i}.conv.weight"] = (256, 256, 3, 3)  # no bias: GN follows
            keys[f"bbox_head.{tower}.{i}.gn.weight"] = (256,)
            keys[f"bbox_head.{tower}.{i}.gn.bias"] = (256,)
    keys["bbox_head.gfl_cls.weight"] = (81, 256, 3, 3)
    keys["bbox_head.gfl_cls.bias"] = (81,)
    keys["bbox_head.gfl_reg.weight"] = (68, 256, 3, 3)
    keys["bbox_head.gfl_reg.bias"] = (68,)
    for i in range(5):
        keys[f"bbox_head.scales.{i}.scale"] = ()
    keys["bbox_head.reg_conf.0.weight"] = (64, 20, 1, 1)
    keys["bbox_head.reg_conf.0.bias"] = (64,)
    keys["bbox_head.reg_conf.2.weight"] = (1, 64, 1, 1)
    keys["bbox_head.reg_conf.2.bias"] = (1,)
    keys["bbox_head.integral.project"] = (17,)
    return keys


def test_state_dict_matches_official_layout() -> None:
    ours = {k: tuple(v.shape) for k, v in build_model().state_dict().items()}
    expected = official_layout()
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_integral_project_is_linspace() -> None:
    project = build_model().state_dict()["bbox_head.integral.project"]
    assert project.tolist() == [float(i) for i in range(17)]


def test_no_reference_framework_imported_at_run_time() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gfocal_pipeline.models.gfocalv2, gfocal_pipeline.export, gfocal_pipeline.postprocess;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('mmdet','mmcv','mmengine','torchvision')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
