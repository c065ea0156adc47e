"""GFocalV2 R50-FPN 1x as the pipeline sees it (official config `gfocal_r50_fpn_1x.py`, ModelZoo recipe)."""

from __future__ import annotations

from gfocal_pipeline.constants import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    MAX_PER_IMG,
    MEAN_RGB,
    NMS_IOU,
    NMS_PRE,
    NUM_CLASSES,
    SCORE_THR,
    SIZE_DIVISOR,
    STD_RGB,
)
from gfocal_pipeline.model_spec import ModelSpec, Postprocess, Preprocessing

SPEC = ModelSpec(
    name="gfocalv2",
    display_name="GFocalV2 R50-FPN 1x",
    history_name="gfocalv2_r50_fpn_1x",  # the history's key since the first release: kept
    om_name="gfocal",
    num_classes=NUM_CLASSES,
    outputs="candidates",
    published_ap=0.410,
    official_checkpoint="gfocal_r50_fpn_1x.pth",
    demo_checkpoint="gfocal_r50_fpn_1x_RANDOM.pth",
    preprocessing=Preprocessing(
        channel_order="rgb",
        mean=MEAN_RGB,
        std=STD_RGB,
        policy="letterbox",
        height=DEFAULT_HEIGHT,
        width=DEFAULT_WIDTH,
        size_divisor=SIZE_DIVISOR,
        pad_value=0,
    ),
    postprocess=Postprocess(score_thr=SCORE_THR, nms_iou=NMS_IOU, max_per_img=MAX_PER_IMG, nms_pre=NMS_PRE),
)
