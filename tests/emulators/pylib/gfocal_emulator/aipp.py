"""Static AIPP as the NPU applies it: swap -> crop -> (no CSC here) -> normalize, on uint8 input.

Normalization per output channel i: (x - mean_chn_i - min_chn_i) * var_reci_chn_i, where i counts
channels after the swap. `min_chn_i` and `var_reci_chn_i` are kept in fp16 by the hardware, so they
are rounded to fp16 here too. Only what the emulator needs is supported (RGB888_U8, static mode).
"""

from __future__ import annotations

import re

import numpy as np

_LINE = re.compile(r"^\s*(\w+)\s*:\s*([^\s#]+)")


class AippError(Exception):
    pass


def parse(text: str) -> dict[str, str]:
    block = re.search(r"aipp_op\s*\{(.*?)\}", text, re.DOTALL)
    if block is None:
        raise AippError("no aipp_op block")
    entries = {}
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise AippError(f"bad AIPP line {line!r}")
        entries[match.group(1)] = match.group(2)
    return entries


def _flag(cfg: dict[str, str], key: str) -> bool:
    return cfg.get(key, "false").lower() in ("true", "1")


def check(cfg: dict[str, str], height: int, width: int) -> None:
    if cfg.get("aipp_mode") != "static":
        raise AippError(f"aipp_mode {cfg.get('aipp_mode')!r} not supported by the emulator (static only)")
    if cfg.get("input_format") != "RGB888_U8":
        raise AippError(f"input_format {cfg.get('input_format')!r} not supported by the emulator")
    if _flag(cfg, "csc_switch"):
        raise AippError("csc_switch true is not supported by the emulator")
    src_w, src_h = int(cfg.get("src_image_size_w", width)), int(cfg.get("src_image_size_h", height))
    if not _flag(cfg, "crop") and (src_w, src_h) != (width, height):
        raise AippError(f"src_image_size {src_w}x{src_h} differs from the model input {width}x{height}")


def source_shape(cfg: dict[str, str], height: int, width: int) -> tuple[int, int, int]:
    return int(cfg.get("src_image_size_h", height)), int(cfg.get("src_image_size_w", width)), 3


def apply(images: np.ndarray, cfg: dict[str, str], height: int, width: int) -> np.ndarray:
    """(B, src_h, src_w, 3) uint8 -> (B, 3, height, width) float32."""
    x = images.astype(np.float32)
    if _flag(cfg, "rbuv_swap_switch"):
        x = x[..., ::-1]
    if _flag(cfg, "crop"):
        top, left = int(cfg.get("load_start_pos_h", 0)), int(cfg.get("load_start_pos_w", 0))
        x = x[:, top : top + height, left : left + width]
    out = np.empty((x.shape[0], 3, height, width), np.float32)
    for i in range(3):
        mean = float(cfg.get(f"mean_chn_{i}", 0))
        low = float(np.float16(cfg.get(f"min_chn_{i}", 0.0)))
        scale = float(np.float16(cfg.get(f"var_reci_chn_{i}", 1.0)))
        out[:, i] = (x[..., i] - mean - low) * scale
    return out
