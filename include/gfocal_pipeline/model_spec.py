"""`ModelSpec`: the facts of one detector that the generic pipeline needs, as validated data.

An adapter (`gfocal_pipeline.models.<name>.spec.SPEC`) declares one; the run writes it into its
artifacts (`run.json`, each `.export.json`) and inference, evaluation, history and alerts read it from
there. Built with pydantic: unknown fields and out-of-range values are refused with the field named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gfocal_pipeline.errors import ConfigError

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(BaseModel):
    """How an image becomes the model's input (the preprocess step and AIPP follow it)."""

    model_config = _FROZEN

    channel_order: Literal["rgb", "bgr"] = "rgb"
    mean: tuple[float, float, float] | None = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] | None = IMAGENET_STD_RGB
    policy: Literal["letterbox", "mmdet", "centered"] = "letterbox"
    height: int = Field(800, ge=64, le=4096, multiple_of=32)
    width: int = Field(1216, ge=64, le=4096, multiple_of=32)
    # the `mmdet` policy's keep-ratio scale (long side, short side) and its padding multiple
    resize_scale: tuple[int, int] = (1333, 800)
    size_divisor: int = Field(32, ge=1, le=256)
    # the value of a padded pixel in the network's input tensor (after normalization): 0 for mmdet's
    # normalized models, 114 for YOLOX (no mean/std)
    pad_value: float = Field(0.0, ge=-1000, le=1000)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("every std value must be > 0")
        return value

    @field_validator("resize_scale")
    @classmethod
    def _positive_scale(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("both sides of resize_scale must be >= 1 pixel")
        return value


class Postprocess(BaseModel):
    """The model's test-time post-processing (host NMS for candidate outputs, in-graph NMS for dets)."""

    model_config = _FROZEN

    score_thr: float = Field(0.05, ge=0, lt=1)
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_per_img: int = Field(100, ge=1, le=10_000)
    nms_pre: int = Field(1000, ge=1)
    class_aware: bool = True


class ModelSpec(BaseModel):
    """One detector as the pipeline sees it: name, classes, input, outputs, post-processing."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")  # the adapter's registry name
    display_name: str
    history_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")  # what the history is keyed on
    om_name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,60}$")  # <run>/model/<om_name>.om
    num_classes: int = Field(80, ge=1, le=10_000)
    # class names in label order (label k scores as the annotation file's category named classes[k]);
    # None: the file's categories sorted by id (mmdet's `cat_ids`), which must number num_classes
    classes: tuple[str, ...] | None = None
    outputs: Literal["candidates", "dets"] = "candidates"  # the portable graph's output convention
    published_ap: float | None = Field(None, ge=0, le=1)
    official_checkpoint: str | None = None
    # file name of its generated RANDOM weights (None: the model has none, e.g. a bring-your-own graph)
    demo_checkpoint: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,80}\.pth$")
    # what the nightly's reference runs: the PyTorch network on the checkpoint, or ONNX Runtime on the
    # CPU on the same graph (a bring-your-own graph: the AP delta then isolates the conversion)
    reference_backend: Literal["torch", "onnxruntime"] = "torch"
    # sha256 of the file the spec was read from (a bring-your-own graph's declaration), else None: part
    # of the caches' keys, so an edited declaration is checked again
    declaration_sha256: str | None = None
    preprocessing: Preprocessing = Preprocessing()
    postprocess: Postprocess = Postprocess()

    @model_validator(mode="after")
    def _classes_match(self) -> ModelSpec:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes lists {len(self.classes)} names but num_classes is {self.num_classes}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes names a class twice")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what the artifacts record)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: object, source: str) -> ModelSpec:
        """Validate a recorded spec; a bad one is a `ConfigError` naming `source` and each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"model spec in {source} is invalid: {problems}") from None

    def describe(self) -> str:
        """One line for `gfocal models` and logs."""
        pre, post = self.preprocessing, self.postprocess
        ap = f", published AP {self.published_ap:.3f}" if self.published_ap is not None else ""
        return (
            f"{self.name}: {self.display_name}; {self.num_classes} classes, {self.outputs} outputs; input "
            f"{pre.height}x{pre.width} {pre.policy} {pre.channel_order.upper()}; NMS score>={post.score_thr} "
            f"IoU {post.nms_iou}, max {post.max_per_img}/image; history {self.history_name!r}{ap}"
        )


def spec_beside(graph: str | os.PathLike[str]) -> ModelSpec | None:
    """The model spec an export recorded beside `graph` (`<name>.export.json`, key `model`); None when
    there is none (a graph exported before specs were recorded, or not by this project)."""
    sidecar = Path(graph).with_suffix(".export.json")
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return ModelSpec.from_dict(recorded, str(sidecar)) if recorded else None
