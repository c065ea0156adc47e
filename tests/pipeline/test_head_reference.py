"""The GFocalV2 head, checked against independent code: mmdet 3.3's GFLHead for the shared parts
(GN towers, classifier, distribution regression with per-level Scale) and the DGQP quality branch
written here from the reference facts (§1.3) with the official top-k on the bin axis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.dense_heads import GFLHead  # the reference extra; a missing install must fail

from gfocal_pipeline.checkpoint import read_state_dict
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, random_state_dict

pytestmark = pytest.mark.reference


def _mmdet_head(checkpoint: Path) -> GFLHead:
    head = GFLHead(
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        reg_max=16,
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128],
        ),
    ).eval()
    state, _ = read_state_dict(checkpoint)
    shared = {
        k.removeprefix("bbox_head."): v
        for k, v in state.items()
        if k.startswith("bbox_head.") and ".reg_conf." not in k
    }
    shared["gfl_cls.weight"] = shared["gfl_cls.weight"][:80]  # GFL v1 has no 81st (padding) channel
    shared["gfl_cls.bias"] = shared["gfl_cls.bias"][:80]
    missing, unexpected = head.load_state_dict(shared, strict=False)
    assert not [k for k in missing if "integral" not in k] and not unexpected
    return head


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights with a peaked regression distribution and a sensitive quality branch, so a
    wrong bin axis, channel order or missing mean would change the scores well beyond tolerance."""
    state = random_state_dict(3)
    state["bbox_head.gfl_reg.weight"] *= 10.0
    state["bbox_head.reg_conf.0.weight"] *= 100.0
    state["bbox_head.reg_conf.2.weight"] *= 100.0
    path = tmp_path_factory.mktemp("sharp") / "sharp.pth"
    torch.save({"state_dict": state}, path)
    return path


def test_head_matches_mmdet_and_the_dgqp_definition(sharp_checkpoint: Path) -> None:
    ours = load_model(sharp_checkpoint).bbox_head
    theirs = _mmdet_head(sharp_checkpoint)
    rng = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(2, 256, h, w, generator=rng) for h, w in ((20, 24), (10, 12), (5, 6), (3, 3), (2, 2))
    ]
    with torch.inference_mode():
        for level, x in enumerate(feats):
            cls_score, bbox_pred = ours.forward_single(x, ours.scales[level])
            logits, ref_pred = theirs.forward_single(x, theirs.scales[level])
            assert torch.allclose(bbox_pred, ref_pred, atol=1e-5), level
            # DGQP as the paper/official code define it: softmax over the 17 bins of each side,
            # top-4 along the bin axis, plus their mean -> 20 channels (side-major) -> reg_conf
            n, _, h, w = ref_pred.shape
            prob = F.softmax(ref_pred.reshape(n, 4, 17, h, w), dim=2)
            top = prob.topk(4, dim=2).values
            stat = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2).reshape(n, 20, h, w)
            quality = ours.reg_conf(stat)
            expected = logits.sigmoid() * quality
            assert cls_score.shape == (n, 81, h, w)
            assert torch.allclose(cls_score[:, :80], expected, atol=1e-6), level
            assert quality.std() > 0.01  # the quality branch really varies here
            # the check can fail: the same statistics in the wrong channel order do not match
            wrong = ours.reg_conf(
                torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2).transpose(1, 2).reshape(n, 20, h, w)
            )
            assert not torch.allclose(cls_score[:, :80], logits.sigmoid() * wrong, atol=1e-4)
