"""YOLOX-s checked against mmdet 3.3 built from its shipped config (the `reference` extra).

One random checkpoint in mmdet's layout drives both implementations: backbone and neck features, head
outputs, priors, the test pipeline's pixels and the final detections of `predict` must agree. Mutant
priors (a 0.5 offset, a wrong stride) must make the same comparison fail, so it can fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mmdet  # the reference extra; a missing install must fail, not skip
import numpy as np
import pytest
import torch
import yaml
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config

from gfocal_pipeline import adapters
from gfocal_pipeline.checkpoint import layout_mismatch
from gfocal_pipeline.demo_data import demo_image
from gfocal_pipeline.models.yolox import YOLOX, YOLOX_S, YoloxDeploy, build_yolox
from gfocal_pipeline.models.yolox.deploy import decode_candidates, grid_priors
from gfocal_pipeline.models.yolox.spec import SPEC as MODEL_SPEC
from gfocal_pipeline.models.yolox.weights import randomize
from gfocal_pipeline.pixels import pixels_of
from gfocal_pipeline.postprocess import Detections, multiclass_nms
from gfocal_pipeline.preprocess import preprocess_image

pytestmark = pytest.mark.reference

CONFIGS = Path(mmdet.__file__).parent / ".mim" / "configs" / "yolox"
CONFIG = CONFIGS / "yolox_s_8xb8-300e_coco.py"
SPEC = YOLOX_S
SEED = 0
# (pictures (seed, w, h), canvas height, width): the exporter's pictures at the spec's policy with
# resize_scale shrunk to the canvas; a square batch of two and a non-square single image
CASES = [(((0, 640, 480), (1, 360, 640)), 320, 320), (((0, 640, 480),), 256, 320)]


@pytest.fixture(scope="module")
def models() -> tuple[YOLOX, torch.nn.Module]:
    """mmdet's YOLOX from the shipped config (random init, eval) and ours loaded from its state_dict."""
    register_all_modules()
    cfg = Config.fromfile(str(CONFIG))
    torch.manual_seed(SEED)
    theirs = MODELS.build(cfg.model)
    randomize(theirs, SEED)  # calibrated, non-trivial BN running statistics
    theirs.eval()
    ours = build_yolox()
    state = theirs.state_dict()
    assert layout_mismatch(ours, state) == []
    ours.load_state_dict(state, strict=True)  # strict: every key of mmdet's checkpoint consumed
    return ours, theirs


def _pixels(side: int):
    return dataclasses.replace(pixels_of(MODEL_SPEC.to_dict()), resize_scale=(side, side))


def _inputs(pictures: tuple[tuple[int, int, int], ...], h: int, w: int) -> torch.Tensor:
    """Real preprocessed images: the spec's pixel format and `mmdet` policy, float32 NCHW BGR."""
    arrays = [
        preprocess_image(demo_image(seed, width=pw, height=ph), "mmdet", "float32", h, w, _pixels(min(h, w)))[
            0
        ]
        for seed, pw, ph in pictures
    ]
    return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class Case:
    x: torch.Tensor
    ours_feats: list[torch.Tensor]
    their_feats: list[torch.Tensor]
    ours_head: tuple[list[torch.Tensor], ...]
    their_head: tuple[list[torch.Tensor], ...]
    candidates: tuple[torch.Tensor, torch.Tensor]  # YoloxDeploy(x)

    @property
    def height(self) -> int:
        return self.x.shape[2]

    @property
    def width(self) -> int:
        return self.x.shape[3]


def _make_case(models: tuple[YOLOX, torch.nn.Module], param: tuple) -> Case:
    ours, theirs = models
    pictures, h, w = param
    x = _inputs(pictures, h, w)
    with torch.inference_mode():
        their_feats = list(theirs.extract_feat(x))
        their_head = tuple(list(t) for t in theirs.bbox_head(their_feats))
        ours_feats = ours.features(x)
        ours_head = ours.bbox_head(ours_feats)
        candidates = YoloxDeploy(ours, h, w)(x)
    return Case(x, ours_feats, their_feats, ours_head, their_head, candidates)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{len(c[0])}x{c[1]}x{c[2]}")
def case(request: pytest.FixtureRequest, models: tuple[YOLOX, torch.nn.Module]) -> Case:
    return _make_case(models, request.param)


@pytest.fixture(scope="module")
def single(models: tuple[YOLOX, torch.nn.Module]) -> Case:
    """The non-square single-image case again, for the mutants (a module fixture takes no param subset)."""
    return _make_case(models, CASES[1])


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (at least 1)."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def test_spec_matches_the_shipped_config() -> None:
    model = Config.fromfile(str(CONFIG)).model
    backbone, neck, head = model.backbone, model.neck, model.bbox_head
    assert (backbone.type, backbone.get("arch", "P5"), backbone.use_depthwise) == ("CSPDarknet", "P5", False)
    assert (SPEC.deepen_factor, SPEC.widen_factor) == (backbone.deepen_factor, backbone.widen_factor)
    assert (list(SPEC.out_indices), list(SPEC.spp_kernel_sizes)) == (
        list(backbone.out_indices),
        list(backbone.spp_kernal_sizes),
    )
    for part in (backbone, neck, head):
        assert part.norm_cfg == {"type": "BN", "momentum": SPEC.bn_momentum, "eps": SPEC.bn_eps}
        assert part.act_cfg == {"type": "Swish"}
    assert (neck.type, list(SPEC.neck_in_channels), SPEC.neck_out_channels, SPEC.neck_csp_blocks) == (
        "YOLOXPAFPN",
        neck.in_channels,
        neck.out_channels,
        neck.num_csp_blocks,
    )
    assert not neck.use_depthwise and neck.upsample_cfg == {"scale_factor": 2, "mode": "nearest"}
    assert (SPEC.num_classes, SPEC.feat_channels, SPEC.stacked_convs, list(SPEC.strides)) == (
        head.num_classes,
        head.feat_channels,
        head.stacked_convs,
        list(head.strides),
    )
    assert head.in_channels == SPEC.neck_out_channels and not head.use_depthwise
    test_cfg = model.test_cfg
    assert (SPEC.score_thr, SPEC.nms_iou) == (test_cfg.score_thr, test_cfg.nms.iou_threshold)
    assert test_cfg.nms.type == "nms" and "max_per_img" not in test_cfg and "nms_pre" not in test_cfg
    pre = model.data_preprocessor
    assert pre.get("mean") is None and pre.get("std") is None and not pre.get("bgr_to_rgb", False)
    assert pre.pad_size_divisor == SPEC.size_divisor
    resize, pad = Config.fromfile(str(CONFIG)).test_pipeline[1:3]
    assert (resize.type, tuple(resize.scale), resize.keep_ratio) == ("Resize", SPEC.resize_scale, True)
    assert (pad.type, pad.pad_to_square, pad.pad_val) == ("Pad", True, {"img": (SPEC.pad_value,) * 3})
    prep, post = MODEL_SPEC.preprocessing, MODEL_SPEC.postprocess
    assert (prep.channel_order, prep.mean, prep.std, prep.pad_value, prep.policy) == (
        "bgr",
        None,
        None,
        114,
        "mmdet",
    )
    assert (prep.resize_scale, prep.height, prep.width, prep.size_divisor) == ((640, 640), 640, 640, 32)
    assert (post.score_thr, post.nms_iou, post.max_per_img, post.class_aware) == (0.01, 0.65, 100, True)
    assert post.nms_pre >= (prep.height // 8) * (prep.width // 8)  # every prior is a candidate


def test_the_published_facts_are_mmdet_metafile_s() -> None:
    entries = yaml.safe_load((CONFIGS / "metafile.yml").read_text())["Models"]
    entry = next(m for m in entries if m["Config"].endswith("/yolox_s_8xb8-300e_coco.py"))
    box_ap = entry["Results"][0]["Metrics"]["box AP"]
    assert SPEC.published_ap == pytest.approx(box_ap / 100) == MODEL_SPEC.published_ap
    assert SPEC.official_checkpoint == entry["Weights"].rsplit("/", 1)[1] == MODEL_SPEC.official_checkpoint


def test_the_adapter_registers_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(adapters._PACKAGES, "yolox", "gfocal_pipeline.models.yolox")
    adapters.model_spec.cache_clear()
    adapters.load_adapter.cache_clear()
    try:
        assert adapters.model_spec("yolox") == MODEL_SPEC
        assert adapters.load_adapter("yolox").spec == MODEL_SPEC
    finally:
        adapters.model_spec.cache_clear()
        adapters.load_adapter.cache_clear()


def test_preprocessing_matches_mmdet_test_pipeline() -> None:
    """The spec's pixels under the `mmdet` policy = mmdet's Resize (keep ratio) + Pad (square, 114)."""
    from mmdet.datasets.transforms import Pad, Resize

    for seed, (w, h) in enumerate(((640, 480), (360, 640))):
        picture = demo_image(seed, width=w, height=h)
        ref = Resize(scale=(320, 320), keep_ratio=True)({"img": picture.copy(), "img_shape": (h, w)})
        ref = Pad(pad_to_square=True, pad_val={"img": (114.0, 114.0, 114.0)})(ref)["img"]
        mine, _ = preprocess_image(picture, "mmdet", "float32", 320, 320, _pixels(320))
        assert ref.shape == (320, 320, 3)
        assert np.array_equal(mine, ref.transpose(2, 0, 1).astype(np.float32))  # BGR planes, 0..255
        raw, _ = preprocess_image(picture, "mmdet", "uint8", 320, 320, _pixels(320))
        assert np.array_equal(raw, ref)  # uint8: the same bytes, padding 114


def test_in_graph_normalization_matches_mmdet_preprocessor(models: tuple[YOLOX, torch.nn.Module]) -> None:
    images = torch.randint(
        0, 256, (2, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        ref = models[1].data_preprocessor({"inputs": list(images.permute(0, 3, 1, 2)), "data_samples": None})
        mine = YoloxDeploy(models[0], 64, 96, normalize_in_graph=True).normalize(images)
    assert mine.shape == ref["inputs"].shape == (2, 3, 64, 96)
    assert torch.equal(mine, ref["inputs"])  # BGR kept, no mean/std


def test_state_dict_keys_equal_mmdet(models: tuple[YOLOX, torch.nn.Module]) -> None:
    ours, theirs = models
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)  # same keys, same order
    assert all(mine[k].shape == ref[k].shape for k in ref)
    assert ref["backbone.stem.conv.conv.weight"].shape == (32, 12, 3, 3)  # Focus: 4 phases x BGR
    assert ref["backbone.stage4.1.conv2.conv.weight"].shape == (512, 1024, 1, 1)  # SPP: 4 x 256
    assert ref["bbox_head.multi_level_conv_cls.2.weight"].shape == (80, 128, 1, 1)
    assert not any(k.startswith("backbone.stage2.1.blocks.3.") for k in ref)  # round(9 x 0.33) = 3
    bn = dict(theirs.named_modules())["neck.out_convs.0.bn"]
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    for key in (k for k in ref if k.endswith("running_var")):  # statistics are not trivial
        assert ref[key].std() > 0.01 and ref[key.replace("var", "mean")].std() > 0.01, key


def test_features_match_mmdet(case: Case) -> None:
    assert len(case.ours_feats) == len(case.their_feats) == 3
    for level, (a, b) in enumerate(zip(case.ours_feats, case.their_feats, strict=True)):
        assert (
            a.shape == b.shape == (case.x.shape[0], 128, case.height // 8 >> level, case.width // 8 >> level)
        )
        assert a.abs().max() > 0.05  # features are not trivially zero
        assert _close(a, b) <= 1e-5, f"level {level}: relative max abs diff {_close(a, b)}"


def test_head_outputs_match_mmdet(case: Case) -> None:
    for kind, mine, ref in zip(("cls", "reg", "obj"), case.ours_head, case.their_head, strict=True):
        for level, (a, b) in enumerate(zip(mine, ref, strict=True)):
            assert a.shape == b.shape, (kind, level)
            assert _close(a, b) <= 1e-5, f"{kind} level {level}: relative max abs diff {_close(a, b)}"


def _their_priors(theirs: torch.nn.Module, case: Case) -> list[torch.Tensor]:
    sizes = [tuple(f.shape[2:]) for f in case.their_feats]
    return theirs.bbox_head.prior_generator.grid_priors(sizes, device="cpu", with_stride=True)


def test_priors_match_mmdet_point_generator(models: tuple[YOLOX, torch.nn.Module], case: Case) -> None:
    ref = _their_priors(models[1], case)
    mine = grid_priors([tuple(f.shape[2:]) for f in case.their_feats])
    for stride, a, b in zip(SPEC.strides, mine, ref, strict=True):
        assert torch.equal(a, b[:, :2]) and bool((b[:, 2:] == stride).all())


def _their_detections(theirs: torch.nn.Module, case: Case) -> list[Detections]:
    """mmdet's `predict` (extract_feat, head, predict_by_feat with the config's test_cfg) on the
    images' own canvas (no rescale), ordered by score as the host NMS orders its output."""
    samples = []
    for _ in range(case.x.shape[0]):
        sample = DetDataSample()
        shape = (case.height, case.width)
        sample.set_metainfo(
            {"img_shape": shape, "ori_shape": shape, "pad_shape": shape, "scale_factor": (1.0, 1.0)}
        )
        samples.append(sample)
    with torch.inference_mode():
        results = theirs.predict(case.x, samples, rescale=False)
    found = []
    for r in (s.pred_instances for s in results):
        order = np.argsort(-r.scores.numpy(), kind="stable")
        found.append(Detections(r.bboxes.numpy()[order], r.scores.numpy()[order], r.labels.numpy()[order]))
    return found


def _our_detections(boxes: torch.Tensor, scores: torch.Tensor, max_per_img: int) -> list[Detections]:
    """The project's generic host NMS on each image's portable candidates, with the spec's settings."""
    post = MODEL_SPEC.postprocess
    return [
        multiclass_nms(
            b.numpy(), s.numpy(), post.score_thr, post.nms_iou, max_per_img, class_aware=post.class_aware
        )
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


def _top(dets: list[Detections], k: int) -> list[Detections]:
    return [Detections(d.boxes[:k], d.scores[:k], d.labels[:k]) for d in dets]


def test_candidates_hold_one_label_per_prior(case: Case) -> None:
    boxes, scores = case.candidates
    assert boxes.shape == (case.x.shape[0], scores.shape[1], 4) and scores.shape[2] == 80
    assert int((scores > 0).sum(-1).max()) == 1  # one nonzero column per prior
    cls, obj = (torch.cat([t.permute(0, 2, 3, 1).flatten(1, 2) for t in h], 1) for h in case.their_head[::2])
    best, label = cls.sigmoid().max(-1)
    assert torch.equal(scores.argmax(-1), label)
    assert torch.allclose(scores.max(-1).values, best * obj[..., 0].sigmoid(), atol=1e-6, rtol=0)


def test_detections_match_mmdet_predict(models: tuple[YOLOX, torch.nn.Module], case: Case) -> None:
    theirs = _their_detections(models[1], case)
    scores = case.candidates[1].max(-1).values
    thr = MODEL_SPEC.postprocess.score_thr
    # mmdet keeps score >= thr, the host NMS score > thr: no score sits on the threshold
    assert not bool((scores == thr).any())
    assert all(len(d) > MODEL_SPEC.postprocess.max_per_img for d in theirs)  # mmdet applies no cap
    assert all(len(set(d.labels.tolist())) > 10 for d in theirs)  # many classes: class-aware NMS works
    # every survivor (no cap: mmdet's own output), then the spec's max_per_img (COCO's maxDets)
    everything = _our_detections(*case.candidates, max_per_img=10_000)
    assert _mismatch(everything, theirs) is None, _mismatch(everything, theirs)
    capped = _our_detections(*case.candidates, max_per_img=MODEL_SPEC.postprocess.max_per_img)
    assert _mismatch(capped, _top(theirs, MODEL_SPEC.postprocess.max_per_img)) is None
    # NMS suppressed something (the comparison is not of the thresholded candidates alone)
    assert all(len(d) < int((s >= thr).sum()) for d, s in zip(theirs, scores, strict=True))
    # the deploy module is the network plus `decode_candidates` on the head outputs
    boxes, one_label = decode_candidates(*case.ours_head)
    assert torch.equal(boxes, case.candidates[0]) and torch.equal(one_label, case.candidates[1])


MUTANTS = {
    "prior offset 0.5": dataclasses.replace(SPEC, center_offset=0.5),
    "P3 stride 16": dataclasses.replace(SPEC, strides=(16, *SPEC.strides[1:])),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_prior_mutants_fail_the_comparison(
    models: tuple[YOLOX, torch.nn.Module], single: Case, mutant: str
) -> None:
    theirs = _their_detections(models[1], single)
    with torch.inference_mode():
        boxes, scores = decode_candidates(*single.their_head, MUTANTS[mutant])
    assert _mismatch(_our_detections(*single.candidates, 10_000), theirs) is None  # the unmutated control
    assert _mismatch(_our_detections(boxes, scores, 10_000), theirs) is not None
