"""Facts of YOLOX-s (mmdet 3.3 `configs/yolox/yolox_s_8xb8-300e_coco.py`) as data (imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from gfocal_pipeline.model_spec import ModelSpec, Postprocess, Preprocessing

# mmdet keeps every prior of every level (no per-level top-k): nms_pre covers the P3 priors of the
# largest input a spec allows (4096x4096 / stride 8), so the parity check keeps every prior too
EVERY_PRIOR = (4096 // 8) ** 2


@dataclass(frozen=True)
class YoloxSpec:
    """Architecture, priors, test-time post-processing and input of YOLOX-s, as in the config."""

    display_name: str = "YOLOX-s"
    # configs/yolox/metafile.yml: yolox_s_8x8_300e_coco, box AP 40.5
    official_checkpoint: str = "yolox_s_8x8_300e_coco_20211121_095711-4592a793.pth"
    published_ap: float = 0.405
    num_classes: int = 80  # bbox_head.num_classes
    # backbone (CSPDarknet, arch P5): deepen_factor, widen_factor, out_indices, spp_kernal_sizes
    deepen_factor: float = 0.33
    widen_factor: float = 0.5
    out_indices: tuple[int, ...] = (2, 3, 4)
    spp_kernel_sizes: tuple[int, ...] = (5, 9, 13)
    # norm_cfg of backbone, neck and head: BN momentum 0.03, eps 0.001; act_cfg Swish (x * sigmoid(x))
    bn_eps: float = 1e-3
    bn_momentum: float = 0.03
    # neck (YOLOXPAFPN): in_channels, out_channels, num_csp_blocks
    neck_in_channels: tuple[int, ...] = (128, 256, 512)
    neck_out_channels: int = 128
    neck_csp_blocks: int = 1
    # bbox_head (YOLOXHead): in/feat channels, stacked_convs, strides (MlvlPointGenerator, offset 0)
    feat_channels: int = 128
    stacked_convs: int = 2
    strides: tuple[int, ...] = (8, 16, 32)
    center_offset: float = 0.0
    # test_cfg: score_thr 0.01 and nms iou_threshold 0.65 (batched, class-aware); mmdet applies no
    # max_per_img and no nms_pre to YOLOX: 100 per image is COCO's maxDets (pycocotools' cap)
    score_thr: float = 0.01
    nms_iou: float = 0.65
    max_per_img: int = 100
    nms_pre: int = EVERY_PRIOR
    # predict_by_feat: one label per prior, the argmax of its class scores (the graph writes its score
    # max class score x objectness in that column only)
    one_label_per_box: bool = True
    # export parity (gfocal_pipeline.parity): boxes are decoded as exp(log wh) * stride, so a float
    # difference of the network's outputs grows with the box (several px on the 1e5 px boxes of random
    # weights at 640x640, relative errors ~2e-5): box differences are measured as a fraction of the
    # level's stride + the box's larger side, a candidate matching its prior within `parity_match_box`
    # of that scale; its one label is compared with PyTorch's scores of every class (a near-tie of two
    # classes may pick either)
    parity_box_unit: str = "size"
    parity_match_box: float = 1e-3
    # data_preprocessor: no mean/std, no bgr_to_rgb (BGR 0..255), pad_size_divisor 32;
    # test_pipeline: Resize scale (640, 640) keep_ratio, Pad pad_to_square with 114
    size_divisor: int = 32
    resize_scale: tuple[int, int] = (640, 640)
    pad_value: float = 114.0

    @property
    def anchors_per_location(self) -> int:
        """One point prior per feature-map location."""
        return 1


YOLOX_S = YoloxSpec()


def _model_spec(spec: YoloxSpec) -> ModelSpec:
    """What the generic pipeline needs of `spec`."""
    return ModelSpec(
        name="yolox",
        display_name=spec.display_name,
        history_name="yolox_s_8xb8-300e_coco",
        om_name="yolox",
        num_classes=spec.num_classes,
        outputs="candidates",
        published_ap=spec.published_ap,
        official_checkpoint=spec.official_checkpoint,
        demo_checkpoint="yolox_s_RANDOM.pth",
        preprocessing=Preprocessing(
            channel_order="bgr",
            mean=None,
            std=None,
            pad_value=spec.pad_value,
            policy="mmdet",
            resize_scale=spec.resize_scale,
            height=spec.resize_scale[1],
            width=spec.resize_scale[0],
            size_divisor=spec.size_divisor,
        ),
        postprocess=Postprocess(
            score_thr=spec.score_thr,
            nms_iou=spec.nms_iou,
            max_per_img=spec.max_per_img,
            nms_pre=spec.nms_pre,
            class_aware=True,
        ),
    )


SPEC = _model_spec(YOLOX_S)
