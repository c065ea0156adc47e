"""A run directory with a hand-written manifest and one shard of random inputs (no COCO needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest

H = W = 16
IDS = [139, 285, 10139]
SHARD = "00000"


def write_run(
    root: Path, dtype: str = "float32", seed: int = 0, ids: list[int] | None = None
) -> tuple[RunLayout, Manifest, dict]:
    """A run directory with a manifest and one shard of random preprocessed inputs (`ids`, default IDS)."""
    ids = list(IDS if ids is None else ids)
    layout = RunLayout.at(root)
    entries = [
        ImageEntry(i, f"{i:012d}.jpg", SHARD, Geometry(W, H, 1.0, 1.0, W, H, (0, 0, 0, 0))) for i in ids
    ]
    manifest = Manifest(
        "letterbox", dtype, H, W, 8, "/coco", "/coco/a.json", "/coco/val2017", entries, {SHARD: ids}
    )
    manifest.write(layout.manifest)
    shard = layout.input_shard(SHARD)
    shard.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for image_id in ids:
        if dtype == "float32":
            x = rng.standard_normal((3, H, W)).astype(np.float32)
        else:
            x = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        x.tofile(shard / input_file_name(image_id))
        arrays[image_id] = x
    return layout, manifest, arrays
