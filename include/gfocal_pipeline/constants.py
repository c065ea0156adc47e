"""Facts of the GFocalV2 R50-FPN 1x model and the Ascend recipe, in one place.

Values come from the official config (`gfocal_r50_fpn_1x.py`) and the ModelZoo scripts; see
`docs/architecture.md` for where each one is used.
"""

from __future__ import annotations

NUM_CLASSES = 80
CLS_OUT_CHANNELS = NUM_CLASSES + 1  # QualityFocalLoss(use_sigmoid=False) -> 81 channels
REG_MAX = 16
REG_TOPK = 4
REG_CHANNELS = 64
STRIDES = (8, 16, 32, 64, 128)
RESNET_BLOCKS = (3, 4, 6, 3)
FPN_IN_CHANNELS = (256, 512, 1024, 2048)
FPN_OUT_CHANNELS = 256
GN_GROUPS = 32

# test_cfg of the official config
NMS_PRE = 1000
SCORE_THR = 0.05
NMS_IOU = 0.6
MAX_PER_IMG = 100

# img_norm_cfg (RGB order)
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)

# Model input as in the ModelZoo recipe
DEFAULT_INPUT_NAME = "input.1"
DEFAULT_HEIGHT = 800
DEFAULT_WIDTH = 1216
MMDET_SCALE = (1333, 800)  # official test pipeline: keep ratio into (long 1333, short 800)
SIZE_DIVISOR = 32

# COCO layout inside a COCO root (the forms' and the CLI's defaults)
DEFAULT_IMAGE_DIR = "val2017"
DEFAULT_ANNOTATION_FILE = "annotations/instances_val2017.json"

# export parity defaults (also the forms' defaults)
DEFAULT_PARITY_THRESHOLD = 1e-3
DEFAULT_MAX_UNEXPLAINED = 0

# Deployment names shared by the DAG factory, docs and docker-compose.yaml
ASCEND_QUEUE = "ascend"
ASCEND_POOL = "ascend_npu"
# the pixel budget of one source image (width x height), checked from its header before decoding;
# COCO's largest images are under half a megapixel (see `preprocess`)
DEFAULT_MAX_PIXELS = 100_000_000
