"""RetinaNet R50-FPN 1x checked against mmdet 3.3 built from its shipped config (the `reference` extra).

One random checkpoint in mmdet's layout drives both implementations: the features, head outputs,
anchors and final detections must agree. Mutants (wrong octave scale, swapped deltas, wrong stride)
must make the same comparison fail, so it can fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mmdet  # the reference extra; a missing install must fail, not skip
import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config, ConfigDict

from gfocal_pipeline.checkpoint import layout_mismatch
from gfocal_pipeline.models.retinanet import RETINANET_R50_FPN_1X, RetinaNet, RetinaNetDeploy, build_retinanet
from gfocal_pipeline.models.retinanet import deploy as retina_deploy
from gfocal_pipeline.models.retinanet.anchors import AnchorGenerator
from gfocal_pipeline.models.retinanet.deploy import decode_candidates
from gfocal_pipeline.models.retinanet.spec import RetinaNetSpec
from gfocal_pipeline.models.retinanet.weights import randomize
from gfocal_pipeline.postprocess import Detections, multiclass_nms

pytestmark = pytest.mark.reference

CONFIG = Path(mmdet.__file__).parent / ".mim" / "configs" / "retinanet" / "retinanet_r50_fpn_1x_coco.py"
SPEC = RETINANET_R50_FPN_1X
SEED = 0
# (batch, height, width): both sizes have more than nms_pre anchors on P3 and P4
CASES = [(1, 320, 416), (2, 512, 640)]


@pytest.fixture(scope="module")
def models() -> tuple[RetinaNet, torch.nn.Module]:
    """mmdet's RetinaNet from the shipped config (random init, eval) and ours loaded from its state_dict."""
    register_all_modules()
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None  # no download of ImageNet weights
    torch.manual_seed(SEED)
    theirs = MODELS.build(cfg.model)
    randomize(theirs, SEED)
    theirs.eval()
    ours = build_retinanet()
    state = theirs.state_dict()
    assert layout_mismatch(ours, state) == []
    ours.load_state_dict(state, strict=True)  # strict: every key of mmdet's checkpoint consumed
    return ours, theirs


@dataclass(frozen=True)
class Case:
    x: torch.Tensor
    ours_feats: list[torch.Tensor]
    their_feats: list[torch.Tensor]
    ours_head: tuple[list[torch.Tensor], list[torch.Tensor]]
    their_head: tuple[list[torch.Tensor], list[torch.Tensor]]
    candidates: tuple[torch.Tensor, torch.Tensor]  # RetinaNetDeploy(x)

    @property
    def height(self) -> int:
        return self.x.shape[2]

    @property
    def width(self) -> int:
        return self.x.shape[3]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "x".join(map(str, c)))
def case(request: pytest.FixtureRequest, models: tuple[RetinaNet, torch.nn.Module]) -> Case:
    ours, theirs = models
    n, h, w = request.param
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h))
    with torch.inference_mode():
        their_feats = list(theirs.extract_feat(x))
        their_head = theirs.bbox_head(their_feats)
        ours_feats = ours.features(x)
        ours_head = ours.bbox_head(ours_feats)
        candidates = RetinaNetDeploy(ours, h, w)(x)
    return Case(x, ours_feats, their_feats, ours_head, (list(their_head[0]), list(their_head[1])), candidates)


def _sizes(case: Case) -> list[tuple[int, int]]:
    return [tuple(f.shape[2:]) for f in case.their_feats]


def test_spec_matches_the_shipped_config() -> None:
    model = Config.fromfile(str(CONFIG)).model
    head, anchors, coder = model.bbox_head, model.bbox_head.anchor_generator, model.bbox_head.bbox_coder
    assert (SPEC.num_classes, SPEC.feat_channels, SPEC.stacked_convs) == (
        head.num_classes,
        head.feat_channels,
        head.stacked_convs,
    )
    assert SPEC.fpn_extra_source == model.neck.add_extra_convs
    assert not model.neck.get("relu_before_extra_convs", False)
    assert list(SPEC.strides) == anchors.strides and list(SPEC.ratios) == anchors.ratios
    assert (SPEC.octave_base_scale, SPEC.scales_per_octave) == (
        anchors.octave_base_scale,
        anchors.scales_per_octave,
    )
    assert SPEC.center_offset == anchors.get("center_offset", 0.0)
    assert (list(SPEC.target_means), list(SPEC.target_stds)) == (coder.target_means, coder.target_stds)
    test_cfg = model.test_cfg
    assert (SPEC.nms_pre, SPEC.min_bbox_size, SPEC.score_thr, SPEC.nms_iou, SPEC.max_per_img) == (
        test_cfg.nms_pre,
        test_cfg.min_bbox_size,
        test_cfg.score_thr,
        test_cfg.nms.iou_threshold,
        test_cfg.max_per_img,
    )
    pre = model.data_preprocessor
    assert (list(SPEC.mean_rgb), list(SPEC.std_rgb), SPEC.size_divisor) == (
        pre.mean,
        pre.std,
        pre.pad_size_divisor,
    )
    assert pre.bgr_to_rgb  # mean/std are in RGB order, the loaded image is BGR


def test_in_graph_normalization_matches_mmdet_preprocessor(models: tuple[RetinaNet, torch.nn.Module]) -> None:
    images = torch.randint(
        0, 256, (2, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        ref = models[1].data_preprocessor({"inputs": list(images.permute(0, 3, 1, 2)), "data_samples": None})
        mine = RetinaNetDeploy(models[0], 64, 96, normalize_in_graph=True).normalize(images)
    assert mine.shape == ref["inputs"].shape == (2, 3, 64, 96)
    assert torch.allclose(mine, ref["inputs"], atol=1e-5, rtol=0)


def test_state_dict_keys_equal_mmdet(models: tuple[RetinaNet, torch.nn.Module]) -> None:
    ours, theirs = models
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)  # same keys, same order
    assert all(mine[k].shape == ref[k].shape for k in ref)
    assert ref["neck.fpn_convs.3.conv.weight"].shape == (256, 2048, 3, 3)  # P6 from C5 ('on_input')
    assert ref["bbox_head.retina_cls.weight"].shape == (9 * 80, 256, 3, 3)


def test_features_match_mmdet(case: Case) -> None:
    assert len(case.ours_feats) == len(case.their_feats) == 5
    for level, (a, b) in enumerate(zip(case.ours_feats, case.their_feats, strict=True)):
        assert a.shape == b.shape, level
        assert a.abs().max() > 0.05  # features are not trivially zero
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"P{level + 3}: max abs diff {diff}"


def test_head_outputs_match_mmdet(case: Case) -> None:
    for kind, mine, ref in zip(("cls", "reg"), case.ours_head, case.their_head, strict=True):
        for level, (a, b) in enumerate(zip(mine, ref, strict=True)):
            assert a.shape == b.shape, (kind, level)
            diff = (a - b).abs().max().item()
            assert diff <= 1e-5, f"{kind} P{level + 3}: max abs diff {diff}"


def _their_anchors(theirs: torch.nn.Module, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    return theirs.bbox_head.prior_generator.grid_priors(sizes, device="cpu")


def _anchors_differ(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    return any(
        a.shape != b.shape or not torch.allclose(a, b, atol=1e-4) for a, b in zip(ours, ref, strict=True)
    )


def test_anchors_match_mmdet_prior_generator(models: tuple[RetinaNet, torch.nn.Module], case: Case) -> None:
    sizes = _sizes(case)
    mine = AnchorGenerator(SPEC).grid_anchors(sizes)
    ref = _their_anchors(models[1], sizes)
    assert [len(a) for a in mine] == [h * w * 9 for h, w in sizes]
    assert not _anchors_differ(mine, ref)


def _their_detections(theirs: torch.nn.Module, case: Case) -> list[Detections]:
    """mmdet's `predict_by_feat` with the config's test_cfg, on the images' own canvas (no rescale)."""
    metas = [{"img_shape": (case.height, case.width), "scale_factor": (1.0, 1.0)}] * case.x.shape[0]
    with torch.inference_mode():
        results = theirs.bbox_head.predict_by_feat(
            *case.their_head, batch_img_metas=metas, cfg=ConfigDict(theirs.test_cfg), rescale=False
        )
    found = []
    for r in results:
        order = np.argsort(-r.scores.numpy(), kind="stable")
        found.append(Detections(r.bboxes.numpy()[order], r.scores.numpy()[order], r.labels.numpy()[order]))
    return found


def _our_detections(
    boxes: torch.Tensor, scores: torch.Tensor, spec: RetinaNetSpec = SPEC
) -> list[Detections]:
    """The project's host NMS on each image's portable candidates."""
    return [
        multiclass_nms(b.numpy(), s.numpy(), spec.score_thr, spec.nms_iou, spec.max_per_img)
        for b, s in zip(boxes, scores, strict=True)
    ]


def _mismatch(ours: list[Detections], theirs: list[Detections]) -> str | None:
    """Why two batches of detections differ (None: same boxes, labels and scores)."""
    for image, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if len(a) != len(b):
            return f"image {image}: {len(a)} detections, mmdet {len(b)}"
        if not np.array_equal(a.labels, b.labels):
            return f"image {image}: labels differ"
        if not np.allclose(a.scores, b.scores, atol=1e-5, rtol=0):
            return f"image {image}: scores differ by {np.abs(a.scores - b.scores).max()}"
        if not np.allclose(a.boxes, b.boxes, atol=1e-3, rtol=0):
            return f"image {image}: boxes differ by {np.abs(a.boxes - b.boxes).max()}"
    return None


def _check_preconditions(case: Case) -> None:
    """Where the selections of the two codes provably agree.

    mmdet 3 takes, per level, the top `nms_pre` (anchor, class) pairs above score_thr; the deploy graph
    (as mmdet 2 and its ONNX export) takes the top `nms_pre` anchors by their best class. With at most
    `nms_pre` pairs above score_thr per level both keep every pair that NMS can see. mmdet also drops
    boxes with no area (min_bbox_size 0) before NMS, which the host NMS does not: none must be scored.
    """
    sizes = _sizes(case)
    assert sizes[0][0] * sizes[0][1] * 9 > SPEC.nms_pre  # the nms_pre selection is exercised
    boxes, scores = case.candidates
    for cls_score in case.their_head[0]:
        n = cls_score.shape[0]
        above = (cls_score.sigmoid().reshape(n, -1) > SPEC.score_thr).sum(dim=1)
        assert int(above.max()) <= SPEC.nms_pre, f"{above.tolist()} pairs above score_thr on one level"
    scored = scores.max(dim=-1).values > SPEC.score_thr
    wh = boxes[..., 2:] - boxes[..., :2]
    assert bool((wh[scored] > SPEC.min_bbox_size).all()), "a scored candidate has no area"


def test_detections_match_mmdet_predict(models: tuple[RetinaNet, torch.nn.Module], case: Case) -> None:
    _check_preconditions(case)
    theirs = _their_detections(models[1], case)
    ours = _our_detections(*case.candidates)
    assert all(len(d) == SPEC.max_per_img for d in theirs)  # NMS and the max_per_img cut both act
    assert _mismatch(ours, theirs) is None, _mismatch(ours, theirs)
    # the deploy graph is the model plus `decode_candidates` on the head outputs
    boxes, scores = decode_candidates(*case.ours_head, case.height, case.width)
    assert torch.equal(boxes, case.candidates[0]) and torch.equal(scores, case.candidates[1])


MUTANT_SPECS = {
    "octave_base_scale": dataclasses.replace(SPEC, octave_base_scale=3.0),
    "stride": dataclasses.replace(SPEC, strides=(16, *SPEC.strides[1:])),
}


@pytest.fixture(scope="module")
def small_case(models: tuple[RetinaNet, torch.nn.Module]) -> Case:
    """The first case again, for the mutants (module-scoped fixtures cannot take a param subset)."""
    theirs = models[1]
    n, h, w = CASES[0]
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h))
    with torch.inference_mode():
        their_feats = list(theirs.extract_feat(x))
        their_head = theirs.bbox_head(their_feats)
    head = (list(their_head[0]), list(their_head[1]))
    return Case(x, their_feats, their_feats, head, head, decode_candidates(*head, h, w))


@pytest.mark.parametrize("mutant", sorted(MUTANT_SPECS))
def test_anchor_mutants_fail_the_comparison(
    models: tuple[RetinaNet, torch.nn.Module], small_case: Case, mutant: str
) -> None:
    spec = MUTANT_SPECS[mutant]
    sizes = _sizes(small_case)
    assert _anchors_differ(AnchorGenerator(spec).grid_anchors(sizes), _their_anchors(models[1], sizes))
    with torch.inference_mode():
        boxes, scores = decode_candidates(*small_case.their_head, small_case.height, small_case.width, spec)
    theirs = _their_detections(models[1], small_case)
    assert _mismatch(_our_detections(*small_case.candidates), theirs) is None  # the unmutated control
    assert _mismatch(_our_detections(boxes, scores, spec), theirs) is not None


def test_swapped_delta_order_fails_the_comparison(
    models: tuple[RetinaNet, torch.nn.Module], small_case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = retina_deploy.delta2bbox

    def swapped(anchors: torch.Tensor, deltas: torch.Tensor, *args: object) -> torch.Tensor:
        return real(anchors, deltas[..., [2, 3, 0, 1]], *args)  # read as (dw, dh, dx, dy)

    monkeypatch.setattr(retina_deploy, "delta2bbox", swapped)
    with torch.inference_mode():
        boxes, scores = decode_candidates(*small_case.their_head, small_case.height, small_case.width)
    theirs = _their_detections(models[1], small_case)
    assert _mismatch(_our_detections(*small_case.candidates), theirs) is None  # the unmutated control
    assert _mismatch(_our_detections(boxes, scores), theirs) is not None
