"""The ModelZoo recipe's `gfocal_preprocess.py`, reimplemented as a benchmark baseline (not product code).

Written from the documented steps (docs: pipeline-facts.md section 2.1), with cv2/numpy doing what
the recipe's mmcv 1.2 calls do:

- `mmcv.imread(path, backend="cv2")`: `cv2.imread(path, cv2.IMREAD_COLOR)`, BGR uint8;
- scale = min(W/w, H/h), new size floor(w*scale) x floor(h*scale), `mmcv.imresize` (cv2 bilinear);
- `mmcv.imnormalize(img, mean, std, to_rgb=True)`: a float32 copy, then BGR->RGB, subtract the mean
  and multiply by 1/std, in place with cv2 on the float image (the colour conversion runs on floats);
- `mmcv.impad(img, shape=(H, W), pad_val=0)`: `cv2.copyMakeBorder`, image top-left, zeros right/bottom;
- `img.transpose(2, 0, 1).tofile(<stem>.bin)` (a non-contiguous array: numpy writes it element-wise).

Parallelism as in the script: the file list is cut into chunks and every chunk is one
`multiprocessing.Pool.apply_async` task, with one pool process per chunk. The script's chunks hold 100
files (5000 images: 50 processes); here the chunk size is chosen so that each core gets the same
share (`ceil(n / cores)`), which is the script's steady state on a full set: with 100-file chunks a
120-image sample would leave one core with 100 images and the other with 20, an artefact against
the recipe. Unlike the script, a worker's exception is re-raised (the script swallows them), so a
broken baseline cannot be timed as fast.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path

import cv2
import numpy as np

# img_norm_cfg of the config (RGB), float32 arrays as the script passes them to mmcv
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def imnormalize(img: np.ndarray) -> np.ndarray:
    """mmcv.imnormalize(img, MEAN, STD, to_rgb=True): float32 copy, then cv2 ops in place."""
    out = img.copy().astype(np.float32)
    mean = np.float64(MEAN.reshape(1, -1))
    stdinv = 1 / np.float64(STD.reshape(1, -1))
    cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    cv2.subtract(out, mean, out)
    cv2.multiply(out, stdinv, out)
    return out


def preprocess_file(source: Path, bin_dir: Path, height: int, width: int) -> None:
    """One image -> `<bin_dir>/<stem>.bin` (float32 CHW, 3*height*width*4 bytes)."""
    img = cv2.imread(str(source), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = math.floor(w * scale), math.floor(h * scale)
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    img = imnormalize(img)
    img = cv2.copyMakeBorder(img, 0, height - new_h, 0, width - new_w, cv2.BORDER_CONSTANT, value=0)
    img = img.transpose(2, 0, 1)
    img.tofile(bin_dir / f"{source.name.split('.')[0]}.bin")


def _chunk(files: list[Path], bin_dir: Path, height: int, width: int) -> int:
    for source in files:
        preprocess_file(source, bin_dir, height, width)
    return len(files)


def run(
    image_dir: Path, bin_dir: Path, height: int = 800, width: int = 1216, chunk: int | None = None
) -> int:
    """Preprocess every file of `image_dir` into `bin_dir` with the script's chunked process pool;
    returns the number of images written."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(image_dir.iterdir())
    cores = os.cpu_count() or 1
    size = chunk or max(1, math.ceil(len(files) / cores))
    chunks = [files[start : start + size] for start in range(0, len(files), size)]
    context = multiprocessing.get_context("fork")  # the script's platform default (Linux)
    with context.Pool(len(chunks)) as pool:
        tasks = [pool.apply_async(_chunk, (part, bin_dir, height, width)) for part in chunks]
        pool.close()
        done = sum(task.get() for task in tasks)
        pool.join()
    return done
