"""A random-weight checkpoint whose classifier is confident for three classes (test only).

Random weights give almost no score above 0.05, so the classifier of a copied state dict is made
confident for three classes (and its box regression less uniform); the network stays random.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gfocal_pipeline.models.gfocalv2.checkpoint import random_state_dict


def confident_checkpoint(path: Path) -> Path:
    state = random_state_dict(0)
    generator = torch.Generator().manual_seed(1)
    cls_weight = state["bbox_head.gfl_cls.weight"]
    state["bbox_head.gfl_cls.weight"] = 0.01 * torch.randn(cls_weight.shape, generator=generator)
    bias = torch.full_like(state["bbox_head.gfl_cls.bias"], -8.0)
    bias[:3] = torch.tensor([-1.5, -1.6, -1.8])
    state["bbox_head.gfl_cls.bias"] = bias
    reg_weight = state["bbox_head.gfl_reg.weight"]
    state["bbox_head.gfl_reg.weight"] = 0.1 * torch.randn(reg_weight.shape, generator=generator)
    torch.save({"meta": {"note": "test weights"}, "state_dict": state}, path)
    return path
