"""`PixelFormat`: how a model wants its pixels (channel order, mean/std or none, pad value, the
`mmdet` policy's keep-ratio scale), as one hashable value the preprocess step, AIPP, the in-graph
normalization and the torch reference share.

The preprocessed files keep one layout whatever the model: float32 inputs are NCHW in the network's
channel order, normalized; uint8 inputs are the NHWC BGR bytes of the resized cv2 image, normalized
on the device (AIPP, or inside the exported graph). Only their padding depends on the model: a padded
uint8 pixel holds the raw colour that normalizes to the model's pad value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gfocal_pipeline.constants import MEAN_RGB, MMDET_SCALE, SIZE_DIVISOR, STD_RGB
from gfocal_pipeline.errors import ConfigError

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class PixelFormat:
    """The model-specific half of preprocessing (the run options add size, policy and dtype).

    `mean` / `std` are per network-input channel, in `channel_order` (None: no mean / no scaling).
    `pad_value` is a padded pixel's value in the network's input tensor (after normalization).
    """

    channel_order: str = "rgb"
    mean: Triple | None = MEAN_RGB
    std: Triple | None = STD_RGB
    pad_value: float = 0.0
    resize_scale: tuple[int, int] = MMDET_SCALE
    size_divisor: int = SIZE_DIVISOR

    def __post_init__(self) -> None:
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order={self.channel_order!r} must be 'rgb' or 'bgr'")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"{name}={value!r} must be three numbers (one per channel) or None")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"std={self.std!r}: every value must be > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PixelFormat:
        """From a recorded dict (a spec's `preprocessing`, a manifest's `pixels`); {}/None: ImageNet RGB."""
        data = data or {}
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        for name in ("mean", "std"):
            if fields.get(name) is not None:
                fields[name] = tuple(float(v) for v in fields[name])
        if "resize_scale" in fields:
            fields["resize_scale"] = tuple(int(v) for v in fields["resize_scale"])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the manifest and the caches' keys record them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def swaps_channels(self) -> bool:
        """Whether the network's channel order differs from cv2's BGR (plane i comes from BGR 2-i)."""
        return self.channel_order == "rgb"

    def source_planes(self) -> tuple[int, int, int]:
        """For each network channel, the index of the cv2 (BGR) plane it comes from."""
        return (2, 1, 0) if self.swaps_channels else (0, 1, 2)

    def network_mean(self) -> Triple:
        return self.mean if self.mean is not None else (0.0, 0.0, 0.0)

    def network_std(self) -> Triple:
        return self.std if self.std is not None else (1.0, 1.0, 1.0)

    def pad_bgr_u8(self) -> tuple[int, int, int]:
        """The raw BGR colour of a padded uint8 pixel: pad_value * std + mean per network channel,
        rounded and clipped to 0..255, in cv2's plane order. ImageNet RGB, pad 0: (104, 116, 124)."""
        raw = [
            min(255, max(0, round(self.pad_value * std + mean)))
            for mean, std in zip(self.network_mean(), self.network_std(), strict=True)
        ]
        by_plane = [0, 0, 0]
        for channel, plane in enumerate(self.source_planes()):
            by_plane[plane] = raw[channel]
        return (by_plane[0], by_plane[1], by_plane[2])

    def normalization(self) -> str:
        """Channel order and normalization in words (what AIPP or the graph does to uint8 input)."""
        if self.mean is None and self.std is None:
            return f"{self.channel_order.upper()}, no normalization"
        return f"{self.channel_order.upper()}, mean {self.mean} std {self.std}"

    def describe(self) -> str:
        """One line for logs and the preprocess XCom."""
        return f"{self.normalization()}, pad {self.pad_value:g}"


DEFAULT_PIXELS = PixelFormat()


def pixels_of(spec: dict[str, Any] | None) -> PixelFormat:
    """The pixel format of a recorded model spec (`run.json`'s or `.export.json`'s "model" dict);
    ImageNet RGB (GFocalV2's) for a run or graph that records none."""
    return PixelFormat.from_dict((spec or {}).get("preprocessing"))
