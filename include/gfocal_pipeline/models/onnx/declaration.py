"""The declaration of a bring-your-own ONNX graph: `<graph>.spec.yaml` (or `.yml` / `.json`) beside it.

```yaml
name: yolox_s_mmdeploy        # the history's key and the OM's name (letters, digits, _ and -)
outputs: dets                 # dets: MMDeploy end2end `dets` (N,K,5) + `labels` (N,K)
                              # candidates: `boxes` (N,K,4) + `scores` (N,K,C), NMS on the host
num_classes: 80               # COCO's 80 by default (class k = k-th category id)
classes: [person, bicycle]    # optional: class names in label order (then num_classes may be left out)
input: {name: input, layout: NCHW, dtype: float32}   # float32 NCHW normalized, or uint8 NHWC BGR
preprocessing: {policy: letterbox, height: 800, width: 1216}   # + channel_order, mean, std, pad_value
postprocess: {score_thr: 0.05, nms_iou: 0.6, max_per_img: 100}
```

Validated with pydantic: an unknown field, a bad value or a missing file is a `ConfigError` naming the
file, the field and the fix. This module imports neither onnx nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.model_spec import ModelSpec, Postprocess, Preprocessing

SPEC_SUFFIXES = (".spec.yaml", ".spec.yml", ".spec.json")
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class InputDeclaration(BaseModel):
    """The graph's one input, as the preprocess step feeds it."""

    model_config = _FROZEN

    name: str | None = None  # None: whatever the graph's single input is called
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"

    @model_validator(mode="after")
    def _fed_as_preprocessed(self) -> InputDeclaration:
        if (self.layout, self.dtype) not in (("NCHW", "float32"), ("NHWC", "uint8")):
            raise ValueError(
                f"{self.layout} {self.dtype} is not an input the pipeline makes: float32 NCHW (normalized "
                "as preprocessing declares) or uint8 NHWC (BGR, the graph normalizes)"
            )
        return self


class GraphDeclaration(BaseModel):
    """What a bring-your-own graph is, in the words of the adapters' `ModelSpec`."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,60}$")
    display_name: str | None = None
    outputs: Literal["dets", "candidates"]
    # None: len(classes) when classes are listed, else COCO's 80
    num_classes: int | None = Field(None, ge=1, le=10_000)
    # class names in label order (label k scores as the annotation file's category of that name);
    # None: the file's categories in id order
    classes: tuple[str, ...] | None = None
    published_ap: float | None = Field(None, ge=0, le=1)
    input: InputDeclaration = InputDeclaration()
    preprocessing: Preprocessing = Preprocessing()
    postprocess: Postprocess = Postprocess()

    @model_validator(mode="after")
    def _classes_counted(self) -> GraphDeclaration:
        if self.classes is not None and self.num_classes not in (None, len(self.classes)):
            raise ValueError(
                f"classes lists {len(self.classes)} names but num_classes is {self.num_classes}: drop "
                "num_classes or make them agree"
            )
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes names a class twice")
        return self

    @property
    def class_count(self) -> int:
        """The graph's number of classes (num_classes, else the length of classes, else 80)."""
        if self.num_classes is not None:
            return self.num_classes
        return len(self.classes) if self.classes is not None else 80

    def model_spec(self, declaration_sha256: str | None = None) -> ModelSpec:
        """The run's `ModelSpec`: reference = ONNX Runtime on this graph, history and OM named `name`."""
        return ModelSpec(
            name="onnx",
            display_name=self.display_name or self.name,
            history_name=self.name,
            om_name=self.name,
            num_classes=self.class_count,
            classes=self.classes,
            outputs=self.outputs,
            published_ap=self.published_ap,
            reference_backend="onnxruntime",
            declaration_sha256=declaration_sha256,
            preprocessing=self.preprocessing,
            postprocess=self.postprocess,
        )


def declaration_path(graph: str | os.PathLike[str]) -> Path:
    """The declaration beside `graph`: `<stem>.spec.yaml`, `.spec.yml` or `.spec.json` (exactly one)."""
    graph = Path(graph)
    found = [graph.with_suffix(suffix) for suffix in SPEC_SUFFIXES if graph.with_suffix(suffix).is_file()]
    if len(found) == 1:
        return found[0]
    names = ", ".join(graph.with_suffix(suffix).name for suffix in SPEC_SUFFIXES)
    if not found:
        raise ConfigError(
            f"ONNX graph {str(graph)!r} has no declaration beside it; write one of {names} giving at least "
            "`name` and `outputs` (dets or candidates), see docs/models.md"
        )
    raise ConfigError(f"ONNX graph {str(graph)!r} has {len(found)} declarations ({names}); keep one")


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
    )


def load_declaration(graph: str | os.PathLike[str]) -> tuple[GraphDeclaration, Path, str]:
    """The validated declaration of `graph`, its path and the sha256 of its text."""
    path = declaration_path(graph)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"declaration {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"declaration {str(path)!r} must be a mapping of fields, got {type(data).__name__}")
    try:
        return GraphDeclaration.model_validate(data), path, digest
    except ValidationError as exc:
        raise ConfigError(f"declaration {str(path)!r} is invalid: {_errors(exc)}") from None
