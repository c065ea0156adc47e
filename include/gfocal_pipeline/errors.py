"""Exception types. Each message names the offending input and how to fix it."""

from __future__ import annotations


class GfocalError(Exception):
    """Base class of every error the library raises on bad input or a failed step."""


class CheckpointError(GfocalError):
    """The checkpoint is missing, unreadable, unsafe or does not match the model layout."""


class ExportError(GfocalError):
    """ONNX export failed or produced a graph that does not match PyTorch."""


class DatasetError(GfocalError):
    """The COCO root, annotation file, manifest or preprocessed inputs are unusable."""


class BackendError(GfocalError):
    """An inference backend or an external tool (atc, msame, ais_bench) failed."""


class EvaluationError(GfocalError):
    """Outputs cannot be evaluated (missing images, mismatched manifest, ...)."""


class ConfigError(GfocalError):
    """A run parameter is invalid; the message names it and the accepted values."""
