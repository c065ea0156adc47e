"""The dataset manifest: what was preprocessed, how, and into which shard (keyed by COCO image id).

`manifest.json`:
    {"version": 1, "policy": "letterbox"|"mmdet", "dtype": "float32"|"uint8",
     "layout": "NCHW"|"NHWC", "input_height": 800, "input_width": 1216, "shard_size": 8,
     "coco_root": ..., "annotation_file": ..., "image_dir": ...,
     "images": [{"image_id", "file_name", "width", "height", "scale_x", "scale_y",
                 "resized_width", "resized_height", "pad": [left, top, right, bottom], "shard"}],
     "shards": {"00000": [image ids in order], ...},
     "skipped": [{"file_name", "image_id", "reason"}]}

Boxes in input pixels map back to the original image as x = (x_in - pad_left) / scale_x,
y = (y_in - pad_top) / scale_y.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.fileio import sha256_file, write_json
from gfocal_pipeline.options import Dtype, Policy

MANIFEST_VERSION = 1
POLICIES = Policy.values()
DTYPES = Dtype.values()


@dataclass(frozen=True)
class Geometry:
    """How one image was placed in the model's input canvas."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    resized_width: int
    resized_height: int
    pad: tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class ImageEntry:
    """One preprocessed image: its COCO id and file, its shard and its `Geometry`."""

    image_id: int
    file_name: str
    shard: str
    geometry: Geometry

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat image record (see the module docstring)."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            **asdict(self.geometry),
            "shard": self.shard,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageEntry:
        values = dict(data)
        head = {key: values.pop(key) for key in ("image_id", "file_name", "shard")}
        return cls(**head, geometry=Geometry(**{**values, "pad": tuple(values["pad"])}))


@dataclass
class Manifest:
    policy: str
    dtype: str
    input_height: int
    input_width: int
    shard_size: int
    coco_root: str
    annotation_file: str
    image_dir: str
    images: list[ImageEntry]
    shards: dict[str, list[int]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    path: Path | None = None
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def layout(self) -> str:
        """float32 inputs are NCHW normalized RGB; uint8 inputs are NHWC BGR (normalized in graph/AIPP)."""
        return "NCHW" if self.dtype == "float32" else "NHWC"

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (batch, 3, self.input_height, self.input_width)
        return (batch, self.input_height, self.input_width, 3)

    @property
    def bytes_per_image(self) -> int:
        return 3 * self.input_height * self.input_width * (4 if self.dtype == "float32" else 1)

    def by_id(self) -> dict[int, ImageEntry]:
        return {entry.image_id: entry for entry in self.images}

    @property
    def sha256(self) -> str:
        """Hash of the manifest file as it was when written or loaded (what its outputs belong to)."""
        if self.path is None:
            raise DatasetError("manifest has not been written to disk yet")
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data.pop("_sha256")
        data["images"] = [entry.to_dict() for entry in self.images]
        data["layout"] = self.layout
        return data

    def write(self, path: str | Path) -> Path:
        self.path = write_json(path, self.to_dict())
        self._sha256 = sha256_file(self.path)
        return self.path


def load_manifest(path: str | Path) -> Manifest:
    """Read `manifest.json`, with a clear error when it is missing or from another version."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {str(path)!r} does not exist; run the preprocess step first")
    try:
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise DatasetError(
                f"manifest {str(path)!r} has version {data.get('version')!r}, expected {MANIFEST_VERSION}; "
                "re-run preprocessing"
            )
        data.pop("layout", None)
        images = [ImageEntry.from_dict(e) for e in data.pop("images")]
        return Manifest(**data, images=images, path=path, _sha256=sha256_file(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"manifest {str(path)!r} is malformed ({exc}); re-run preprocessing") from exc
