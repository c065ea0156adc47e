"""Facts of RetinaNet R50-FPN 1x (mmdet 3.3 `configs/retinanet/retinanet_r50_fpn_1x_coco.py`) as data."""

from __future__ import annotations

from dataclasses import dataclass

from gfocal_pipeline.model_spec import ModelSpec, Postprocess, Preprocessing


@dataclass(frozen=True)
class RetinaNetSpec:
    """Architecture, anchors, box coding, test-time post-processing and input normalization."""

    display_name: str = "RetinaNet R50-FPN 1x"
    # mmdet's released checkpoint of this config (metafile.yml; box AP 36.5 on COCO val2017)
    official_checkpoint: str = "retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth"
    published_ap: float = 0.365
    # architecture (the ResNet-50 backbone and FPN widths are shared with GFocalV2: see constants)
    num_classes: int = 80
    feat_channels: int = 256
    stacked_convs: int = 4
    fpn_extra_source: str = "on_input"  # P6 is computed from C5, not from the P5 output
    # anchor_generator
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    center_offset: float = 0.0
    # bbox_coder (DeltaXYWHBBoxCoder)
    target_means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    wh_ratio_clip: float = 16 / 1000
    # test_cfg
    nms_pre: int = 1000
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    # data_preprocessor (RGB order)
    mean_rgb: tuple[float, ...] = (123.675, 116.28, 103.53)
    std_rgb: tuple[float, ...] = (58.395, 57.12, 57.375)
    size_divisor: int = 32

    @property
    def anchors_per_location(self) -> int:
        """Base anchors at each feature-map location (ratios x octave scales, 9 here)."""
        return len(self.ratios) * self.scales_per_octave


RETINANET_R50_FPN_1X = RetinaNetSpec()


def _model_spec(spec: RetinaNetSpec) -> ModelSpec:
    """What the generic pipeline needs of `spec` (its input as the ModelZoo recipe feeds it)."""
    return ModelSpec(
        name="retinanet",
        display_name=spec.display_name,
        history_name="retinanet_r50_fpn_1x",
        om_name="retinanet",
        num_classes=spec.num_classes,
        outputs="candidates",
        published_ap=spec.published_ap,
        official_checkpoint=spec.official_checkpoint,
        demo_checkpoint="retinanet_r50_fpn_1x_RANDOM.pth",
        preprocessing=Preprocessing(
            channel_order="rgb", mean=spec.mean_rgb, std=spec.std_rgb, size_divisor=spec.size_divisor
        ),
        postprocess=Postprocess(
            score_thr=spec.score_thr, nms_iou=spec.nms_iou, max_per_img=spec.max_per_img, nms_pre=spec.nms_pre
        ),
    )


SPEC = _model_spec(RETINANET_R50_FPN_1X)
