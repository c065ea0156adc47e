"""Toy detectors built without the project's exporter (a small torch module of their own, traced with
`torch.onnx.export`), their declarations, and a COCO-format set whose ground truth they partly hit.

Every image's detections are fixed boxes in network-input pixels with fixed scores, so a test knows
them exactly and can evaluate them on its own (its own letterbox rescaling, its own NMS, pycocotools).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torch import nn

from gfocal_pipeline.coco_classes import COCO_CATEGORIES

HEIGHT, WIDTH = 128, 160  # network input
# (x1, y1, x2, y2) in input pixels, inside the picture of both image sizes below (no clipping)
BOXES = np.array(
    [[8, 8, 40, 40], [48, 8, 90, 50], [8, 50, 44, 92], [50, 56, 92, 94], [12, 12, 44, 44]], np.float32
)
LABELS = np.array([0, 2, 56, 0, 0])  # person, car, chair, person, person (box 0 shifted: IoU 0.62)
SCORES = np.array([0.9, 0.8, 0.7, 0.35, 0.95], np.float32)
PADDING_ROWS = 3  # dets graphs end with empty rows: score 0, label -1 (MMDeploy's convention)
SIZES = [(320, 240)] * 4 + [(240, 320)] * 2  # (width, height): landscape, then portrait


class ToyDets(nn.Module):
    """MMDeploy-style end2end outputs: dets (N,K,5) x1,y1,x2,y2,score and labels (N,K) int64."""

    def __init__(self) -> None:
        super().__init__()
        rows = len(BOXES) + PADDING_ROWS
        dets = np.zeros((rows, 5), np.float32)
        dets[: len(BOXES), :4], dets[: len(BOXES), 4] = BOXES, SCORES
        labels = np.full(rows, -1, np.int64)
        labels[: len(BOXES)] = LABELS
        self.register_buffer("dets", torch.from_numpy(dets))
        self.register_buffer("labels", torch.from_numpy(labels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = (x.mean(dim=(1, 2, 3)) * 0).view(-1, 1, 1)  # ties the outputs' batch to the input's
        return self.dets.unsqueeze(0) + zero, self.labels.unsqueeze(0).expand(x.shape[0], -1)


class ToyCandidates(nn.Module):
    """Pre-NMS candidates: boxes (N,K,4), scores (N,K,classes) with each box's score in its class."""

    def __init__(self, classes: int = 80) -> None:
        super().__init__()
        scores = np.zeros((len(BOXES), classes), np.float32)
        scores[np.arange(len(BOXES)), LABELS] = SCORES
        self.register_buffer("boxes", torch.from_numpy(BOXES))
        self.register_buffer("scores", torch.from_numpy(scores))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = (x.float().mean(dim=(1, 2, 3)) * 0).view(-1, 1, 1)
        return self.boxes.unsqueeze(0) + zero, self.scores.unsqueeze(0) + zero


def write_graph(
    module: nn.Module,
    path: Path,
    outputs: tuple[str, str],
    declaration: dict | None,
    nhwc_uint8: bool = False,
) -> Path:
    """Trace `module` to `path` (input `images`, dynamic batch) and write `declaration` beside it."""
    shape = (1, HEIGHT, WIDTH, 3) if nhwc_uint8 else (1, 3, HEIGHT, WIDTH)
    example = torch.zeros(shape, dtype=torch.uint8 if nhwc_uint8 else torch.float32)
    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=list(outputs),
        dynamic_axes={name: {0: "batch"} for name in ("images", *outputs)},
    )
    if declaration is not None:
        path.with_suffix(".spec.yaml").write_text(yaml.safe_dump(declaration))
    return path


def declaration(outputs: str, **extra: object) -> dict:
    return {
        "name": f"toy_{outputs}",
        "outputs": outputs,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {"policy": "letterbox", "height": HEIGHT, "width": WIDTH},
        "postprocess": {"score_thr": 0.05, "nms_iou": 0.5, "max_per_img": 100},
        **extra,
    }


def _ground_truth(width: int, height: int) -> list[tuple[list[float], int]]:
    """(xywh box, category id) of one image: the model's boxes rescaled, some moved or relabelled."""
    scale = min(HEIGHT / height, WIDTH / width)
    boxes = BOXES[:4] / scale
    ids = [cat_id for cat_id, _, _ in COCO_CATEGORIES]
    truth = [
        (boxes[0], ids[0]),  # hit by box 0 (and its near-copy, a duplicate)
        (boxes[1] + np.array([6, 6, 6, 6]), ids[2]),  # hit at a lower IoU
        (boxes[2], ids[57] if width > height else ids[56]),  # wrong class on landscape pictures
        (np.array([150, 150, 200, 200], np.float32), ids[0]),  # missed by every box
    ]
    return [([float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], cat) for b, cat in truth]


def write_dataset(root: Path) -> Path:
    """A COCO-format set (val2017/ + annotations/instances_val2017.json) of `SIZES` noise pictures."""
    images_dir = root / "val2017"
    images_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(images_dir / name), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for box, category in _ground_truth(width, height):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root
