"""Independent verification against mmdetection 3.3 / mmcv 2.1 (the `reference` extra).

mmdet has no GFocalV2 head, but its ResNet, FPN and GFL v1 decode/NMS are the same building blocks:
the same random checkpoint must give the same features, and the same head outputs the same boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# no importorskip: CI installs the reference extra, and a missing install must fail, not skip
from mmdet.models import backbones as mmdet_backbones
from mmdet.models.dense_heads import GFLHead
from mmdet.models.necks import FPN
from mmengine.config import ConfigDict

from gfocal_pipeline.checkpoint import read_state_dict
from gfocal_pipeline.demo_data import demo_image
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model
from gfocal_pipeline.models.gfocalv2.decode import decode_candidates, level_sizes
from gfocal_pipeline.postprocess import multiclass_nms
from gfocal_pipeline.preprocess import preprocess_image

pytestmark = pytest.mark.reference


def _mmdet_backbone_neck(checkpoint: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """mmdet ResNet + FPN configured as in `gfocal_r50_fpn_1x.py`, loaded from our checkpoint file."""
    backbone = mmdet_backbones.ResNet(
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=True,
        style="pytorch",
    )
    neck = FPN(
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs="on_output",
        num_outs=5,
    )
    state, _ = read_state_dict(checkpoint)
    for prefix, module in (("backbone.", backbone), ("neck.", neck)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)  # strict: the key layouts must agree exactly
        module.eval()
    return backbone, neck


@pytest.mark.parametrize(("height", "width"), [(256, 320), (800, 1216)])
def test_backbone_and_neck_match_mmdet(random_checkpoint: Path, height: int, width: int) -> None:
    ours = load_model(random_checkpoint)
    backbone, neck = _mmdet_backbone_neck(random_checkpoint)
    image, _ = preprocess_image(demo_image(3, 500, 375), "letterbox", "float32", height, width)
    x = torch.from_numpy(image)[None]
    with torch.inference_mode():
        theirs = neck(backbone(x))
        mine = ours.features(x)
    assert len(theirs) == len(mine) == 5
    for level, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert a.shape == b.shape, level
        assert a.abs().max() > 0.05  # features are not trivially zero
        diff = (a - b).abs().max().item()
        assert diff <= 1e-4, f"P{level + 3}: max abs diff {diff}"


def _head_outputs(height: int, width: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head outputs with a sparse set of confident (anchor, class) pairs among near-zero scores.

    Per level at most 600 anchors carry a score above 0.05, so mmdet 3's top-k over pairs and the
    official top-k over anchors select the same candidates and the comparison is exact.
    """
    rng = np.random.default_rng(seed)
    cls_scores, bbox_preds = [], []
    for h, w in level_sizes(height, width):
        probs = rng.uniform(0.0, 0.02, size=(81, h, w)).astype(np.float32)
        probs[80] = 0.0  # the untrained 81st channel
        n = min(600, (h * w) // 2)
        anchors = rng.choice(h * w, size=n, replace=False)
        for k in range(1, 3):
            classes = rng.integers(0, 80, size=n)
            probs[classes, anchors // w, anchors % w] = rng.uniform(0.06, 0.95, size=n) / k
        cls_scores.append(torch.from_numpy(probs)[None])
        bbox_preds.append(torch.from_numpy(rng.normal(0, 2.0, size=(1, 68, h, w)).astype(np.float32)))
    return cls_scores, bbox_preds


@pytest.mark.parametrize(("height", "width", "seed"), [(320, 416, 0), (512, 640, 1)])
def test_decode_and_nms_match_mmdet_gfl(height: int, width: int, seed: int) -> None:
    cls_scores, bbox_preds = _head_outputs(height, width, seed)
    assert max(h * w for h, w in level_sizes(height, width)) > 1000  # the nms_pre path is exercised

    boxes, scores = decode_candidates(cls_scores, bbox_preds, height, width)
    ours = multiclass_nms(boxes[0].numpy(), scores[0].numpy())

    head = GFLHead(
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        reg_max=16,
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128],
        ),
        test_cfg=ConfigDict(
            nms_pre=1000,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type="nms", iou_threshold=0.6),
            max_per_img=100,
        ),
    ).eval()
    logits = [torch.logit(c[:, :80].clamp(1e-7, 1 - 1e-7)) for c in cls_scores]  # GFL v1 applies sigmoid
    with torch.inference_mode():
        theirs = head.predict_by_feat(
            logits,
            bbox_preds,
            batch_img_metas=[{"img_shape": (height, width), "scale_factor": (1.0, 1.0)}],
            rescale=False,
            with_nms=True,
        )[0]
    t_scores = theirs.scores.numpy()
    order = np.argsort(-t_scores, kind="stable")
    assert len(ours) == len(t_scores) == 100  # enough overlap that NMS and the top-100 cut both act
    np.testing.assert_array_equal(ours.labels, theirs.labels.numpy()[order])
    np.testing.assert_allclose(ours.scores, t_scores[order], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.boxes, theirs.bboxes.numpy()[order], atol=1e-3, rtol=0)
