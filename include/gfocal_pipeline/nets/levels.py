"""Feature-map sizes of the P3..P7 levels of a ResNet/FPN network for an input size."""

from __future__ import annotations

DEFAULT_STRIDES = (8, 16, 32, 64, 128)


def level_sizes(height: int, width: int, strides: tuple[int, ...] = DEFAULT_STRIDES) -> list[tuple[int, int]]:
    """Feature map sizes of P3..P7 for an input of `height`x`width` (conv arithmetic of the network)."""
    sizes = []
    h, w = height, width
    # stem conv + maxpool + layer2 give /8; each further level halves with ceil (3x3, stride 2, pad 1)
    for _ in range(3):
        h, w = (h + 1) // 2, (w + 1) // 2
    for _ in strides:
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes
