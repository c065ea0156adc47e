"""The dataset manifest: what was preprocessed, how, and into which shard (keyed by COCO image id).

`manifest.json`:
    {"version": 2, "policy": "letterbox"|"mmdet", "dtype": "float32"|"uint8",
     "layout": "NCHW"|"NHWC", "input_height": 800, "input_width": 1216, "shard_size": 8,
     "coco_root": ..., "annotation_file": ..., "image_dir": ...,
     "annotation_sha256": ..., "inputs_root": folder of the shard folders (null: inputs/ beside it),
     "per_task_inputs": true when no inputs were written (each inference task builds its shard),
     "images": [{"image_id", "file_name", "width", "height", "scale_x", "scale_y",
                 "resized_width", "resized_height", "pad": [left, top, right, bottom], "shard",
                 "sha256" (of the image file)}],
     "shards": {"00000": [image ids in order], ...},
     "skipped": [{"file_name", "image_id", "reason"}],
     "max_pixels": the pixel budget the images were checked with (null: none; absent: the default),
     "pixels": the model's pixel format (`pixels.PixelFormat`: channel order, mean/std, pad value,
               resize scale; absent: ImageNet RGB, GFocalV2's)}

Boxes in input pixels map back to the original image as x = (x_in - pad_left) / scale_x,
y = (y_in - pad_top) / scale_y.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gfocal_pipeline.constants import DEFAULT_MAX_PIXELS
from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.fileio import sha256_file, write_json
from gfocal_pipeline.options import Dtype, Policy
from gfocal_pipeline.pixels import DEFAULT_PIXELS, PixelFormat

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no image hashes, inputs always beside the manifest
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
    sha256: str = ""  # of the source image file: a changed image changes its shard's digest

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat image record (see the module docstring)."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            **asdict(self.geometry),
            "shard": self.shard,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageEntry:
        values = dict(data)
        head = {key: values.pop(key) for key in ("image_id", "file_name", "shard")}
        sha = str(values.pop("sha256", ""))
        return cls(**head, geometry=Geometry(**{**values, "pad": tuple(values["pad"])}), sha256=sha)


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
    annotation_sha256: str = ""
    inputs_root: str | None = None  # folder of the `<shard>/` input folders; None: `inputs/` beside it
    per_task_inputs: bool = False  # no inputs written: each inference task builds its shard's
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # the pixel budget preprocessing checked images with
    pixels: dict[str, Any] | None = None  # the model's PixelFormat as a dict; None: ImageNet RGB
    version: int = MANIFEST_VERSION
    path: Path | None = None
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def pixel_format(self) -> PixelFormat:
        """How the inputs were normalized and padded (the model's pixel format)."""
        return PixelFormat.from_dict(self.pixels)

    @property
    def layout(self) -> str:
        """float32 inputs are NCHW normalized in the network's channel order; uint8 inputs are NHWC BGR
        (normalized in the graph or by AIPP)."""
        return "NCHW" if self.dtype == "float32" else "NHWC"

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (batch, 3, self.input_height, self.input_width)
        return (batch, self.input_height, self.input_width, 3)

    @property
    def bytes_per_image(self) -> int:
        return 3 * self.input_height * self.input_width * (4 if self.dtype == "float32" else 1)

    @property
    def inputs_folder(self) -> Path:
        """The folder of the shards' input folders (in the inputs cache, or beside the manifest)."""
        if self.inputs_root:
            return Path(self.inputs_root)
        if self.path is None:
            raise DatasetError("manifest has not been written to disk yet")
        return self.path.parent / "inputs"

    def input_dir(self, shard: str) -> Path:
        """The folder holding `shard`'s `.bin` inputs."""
        return self.inputs_folder / shard

    def shard_digest(self, shard: str) -> str:
        """sha256 of what one shard's inputs are made of: its images (id, file hash, geometry) and
        the policy, dtype and input size. Outputs record it, so a changed image invalidates exactly
        the outputs of its shard."""
        entries = [entry.to_dict() for entry in self.images if entry.shard == shard]
        shape: list[Any] = [self.policy, self.dtype, self.input_height, self.input_width]
        if self.pixel_format != DEFAULT_PIXELS:  # ImageNet RGB adds nothing: older digests stay valid
            shape.append(self.pixel_format.to_dict())
        text = json.dumps([shape, entries], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def dataset_id(self) -> str:
        """Which data a run was scored on: the annotation file's sha256 + a hash of the image set
        (ids and file hashes). Two datasets of the same size never share a history baseline."""
        images = sorted((entry.image_id, entry.sha256) for entry in self.images)
        digest = hashlib.sha256(json.dumps(images, separators=(",", ":")).encode()).hexdigest()
        return f"ann:{self.annotation_sha256[:16] or 'unknown'}+img:{digest[:16]}"

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
        if not isinstance(data, dict):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        if data.get("version") not in READABLE_VERSIONS:
            raise DatasetError(
                f"manifest {str(path)!r} has version {data.get('version')!r}, expected {MANIFEST_VERSION}; "
                "re-run preprocessing"
            )
        data.pop("layout", None)
        images = [ImageEntry.from_dict(e) for e in data.pop("images")]
        data["version"] = MANIFEST_VERSION
        return Manifest(**data, images=images, path=path, _sha256=sha256_file(path))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DatasetError(f"manifest {str(path)!r} is malformed ({exc}); re-run preprocessing") from exc
