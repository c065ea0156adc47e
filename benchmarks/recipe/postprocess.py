"""The recipe's msame-era postprocess + COCO evaluation, step by step, without mmdet (a baseline only).

What the ModelZoo `gfocal_postprocess.py` (msame version) does, written from the documented facts
(/work/shared/reference/pipeline-facts.md section 2.4) with mmdet 2.6's few helpers done by hand:

1. load the annotation file with pycocotools (mmdet's `CocoDataset`), `cat_ids` = the file's category
   ids of the 80 class names, images in annotation-file order;
2. per image: find its outputs with `glob(<dir>/*0<id>_output_0.txt)[0]`, read `_output_0.txt`
   (100 x 5 float32) and `_output_1.txt` (100 x 1 int64) with `np.loadtxt`;
3. divide x1, y1, x2, y2 by `scale = min(W/w, H/h)` (float32 arithmetic, as on the float32 array),
   no offset, no clipping, no score filter;
4. `bbox2result`: one array per class 0..79 (labels outside are dropped);
5. `results2json`: one dict per detection, `category_id = cat_ids[label]`, bbox `[x1, y1, x2-x1, y2-y1]`
   from `tolist()`, score `float`, dumped to a JSON file;
6. pycocotools `loadRes(file)` + `COCOeval(..., "bbox")` over the dataset's image ids, plus the
   classwise AP table (`classwise=True`).

An image whose two files are not both there gets 80 empty arrays (the recipe appends an empty list,
which breaks mmdet's indexing; the robust variant is used so a baseline run cannot crash).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from glob import glob
from pathlib import Path

import numpy as np

NUM_CLASSES = 80
INPUT_WIDTH, INPUT_HEIGHT = 1216, 800


def bbox2result(bboxes: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> list[np.ndarray]:
    """mmdet's `bbox2result`: (n,5) boxes + (n,) labels -> one (k,5) float32 array per class."""
    if bboxes.shape[0] == 0:
        return [np.zeros((0, 5), dtype=np.float32) for _ in range(num_classes)]
    return [bboxes[labels == i, :] for i in range(num_classes)]


def xyxy2xywh(bbox: np.ndarray) -> list[float]:
    """mmdet 2.6 `CocoDataset.xyxy2xywh`: through `tolist()`, widths without +1."""
    values = bbox.tolist()
    return [values[0], values[1], values[2] - values[0], values[3] - values[1]]


def read_image_outputs(bin_dir: str, img_id: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The recipe's lookup and read of one image's two msame TXT files (None if one is missing)."""
    base = os.path.basename(glob(os.path.join(bin_dir, f"*0{img_id}_output_0.txt"))[0]).split("_")[0]
    dets_file = os.path.join(bin_dir, base + "_output_0.txt")
    labels_file = os.path.join(bin_dir, base + "_output_1.txt")
    if not (os.path.exists(dets_file) and os.path.exists(labels_file)):
        return None
    bboxes = np.loadtxt(dets_file, dtype=np.float32).reshape(100, 5)
    labels = np.loadtxt(labels_file, dtype=np.int64).reshape(100, 1)
    return bboxes, labels


def postprocess(coco: object, bin_dir: str) -> list[list[np.ndarray]]:
    """Per image in annotation order: read, rescale, `bbox2result` (the recipe's main loop)."""
    results = []
    for img_id in coco.getImgIds():  # type: ignore[attr-defined]
        info = coco.imgs[img_id]  # type: ignore[attr-defined]
        found = read_image_outputs(bin_dir, img_id)
        if found is None:
            results.append(bbox2result(np.zeros((0, 5), np.float32), np.zeros(0, np.int64)))
            continue
        bboxes, labels = found
        scale = min(INPUT_WIDTH / info["width"], INPUT_HEIGHT / info["height"])
        bboxes[:, :4] = bboxes[:, :4] / scale
        results.append(bbox2result(bboxes, labels[:, 0], NUM_CLASSES))
    return results


def results2json(results: list[list[np.ndarray]], img_ids: list[int], cat_ids: list[int]) -> list[dict]:
    """mmdet 2.6 `_det2json`: one dict per detection, image by image, class by class."""
    json_results = []
    for idx, img_id in enumerate(img_ids):
        for label, bboxes in enumerate(results[idx]):
            for i in range(bboxes.shape[0]):
                json_results.append(
                    {
                        "image_id": img_id,
                        "bbox": xyxy2xywh(bboxes[i]),
                        "score": float(bboxes[i][4]),
                        "category_id": cat_ids[label],
                    }
                )
    return json_results


def evaluate(annotation_file: str | Path, bin_dir: str | Path, class_names: list[str]) -> np.ndarray:
    """The whole recipe postprocess + bbox evaluation; returns COCOeval's 12 stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
        cat_ids = coco.getCatIds(catNms=class_names)
        img_ids = coco.getImgIds()
        results = postprocess(coco, str(bin_dir))
        records = results2json(results, img_ids, cat_ids)
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "results.bbox.json")
            with open(result_file, "w") as handle:
                json.dump(records, handle)
            coco_dt = coco.loadRes(result_file)
            coco_eval = COCOeval(coco, coco_dt, "bbox")
            coco_eval.params.catIds = cat_ids
            coco_eval.params.imgIds = img_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        _classwise(coco, coco_eval, cat_ids)
    return np.asarray(coco_eval.stats, dtype=np.float64)


def _classwise(coco: object, coco_eval: object, cat_ids: list[int]) -> list[tuple[str, float]]:
    """The per-class AP table of `classwise=True` (mean precision over IoU and recall, area all, 100 dets)."""
    precisions = coco_eval.eval["precision"]  # type: ignore[attr-defined]
    table = []
    for idx, cat_id in enumerate(cat_ids):
        precision = precisions[:, :, idx, 0, -1]
        precision = precision[precision > -1]
        ap = float(np.mean(precision)) if precision.size else float("nan")
        table.append((coco.loadCats(cat_id)[0]["name"], ap))  # type: ignore[attr-defined]
    return table
