"""YOLOX ONNX export: both variants, priors as graph constants, parity through the generic machinery
(one prior per location, strides 8/16/32, every prior a candidate), mutants refused.

One model with calibrated random weights is exported once per variant and size; ONNX Runtime's
candidates are checked against PyTorch's decode of every prior. Mutants a port can introduce must be
refused: priors with a 0.5 offset (the graph's prior constants replaced) and a wrong P3 stride (traced
from a mutated module through the whole export, which must keep the refused graph aside).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from adapter_exports import export_matrix, portable_key, run_graph
from onnx import numpy_helper

from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.export import _nms_free_copy, _verdict, rejected_path, sample_inputs
from gfocal_pipeline.models.yolox import YOLOX, YOLOX_S, YoloxDeploy, build_yolox
from gfocal_pipeline.models.yolox.deploy import grid_priors
from gfocal_pipeline.models.yolox.export import YoloxExport, export_yolox, parity
from gfocal_pipeline.models.yolox.parity import (
    candidates_per_image,
    compare_yolox_candidates,
    yolox_level_blocks,
)
from gfocal_pipeline.models.yolox.spec import SPEC as MODEL_SPEC
from gfocal_pipeline.models.yolox.weights import randomize
from gfocal_pipeline.nets.ascend_nms import NMS_OP
from gfocal_pipeline.nets.levels import level_sizes
from gfocal_pipeline.parity import ParityReport
from gfocal_pipeline.pixels import pixels_of
from gfocal_pipeline.postprocess import multiclass_nms

SPEC = YOLOX_S
# portable exports: True for uint8 NHWC BGR input (only permuted and cast in the graph), dynamic batch
PORTABLE = {(256, 256): False, (192, 256): True}
SIZES = list(PORTABLE)
SQUARE = SIZES[0]  # the ascend export and the mutants
SEED = 0
OWN_SIZE, OWN_SEEDS = (640, 640), (0, 1, 2)  # the registered model's input and the seeds checked there


@pytest.fixture(scope="module")
def model() -> YOLOX:
    net = build_yolox()
    randomize(net, SEED)
    return net


@pytest.fixture(scope="module")
def exports(model: YOLOX, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return export_matrix(export_yolox, model, tmp_path_factory.mktemp("yolox"), PORTABLE, SQUARE)


@pytest.fixture(scope="module")
def own_nets() -> dict[int, YOLOX]:
    """YOLOX-s with the random weights of each of `OWN_SEEDS`."""
    nets = {seed: build_yolox() for seed in OWN_SEEDS}
    for seed, net in nets.items():
        randomize(net, seed)
    return nets


@pytest.fixture(scope="module")
def own_size(
    own_nets: dict[int, YOLOX], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], object]:
    """Both variants at the model's own 640x640 for each of `OWN_SEEDS`' random weights (where the
    boxes of P4/P5, exp(log wh) * stride, reach 1e5 px and two classes may tie exactly)."""
    out, found = tmp_path_factory.mktemp("yolox640"), {}
    for (seed, net), variant in itertools.product(own_nets.items(), ("portable", "ascend")):
        found[variant, seed] = export_yolox(net, out / f"{variant}{seed}.onnx", variant, *OWN_SIZE)
    return found


def _feed(size: tuple[int, int], uint8: bool) -> np.ndarray:
    return sample_inputs(*size, uint8, pixels_of(MODEL_SPEC.to_dict()))[1]


def test_candidates_per_image_are_every_prior() -> None:
    assert yolox_level_blocks(320, 320) == [(1600, 1600, 0), (400, 400, 1600), (100, 100, 2000)]
    assert candidates_per_image(320, 320) == 2100
    assert candidates_per_image(640, 640) == 8400  # mmdet's YOLOX-s at its test size
    assert candidates_per_image(4096, 4096) == sum(
        4096 * 4096 // s**2 for s in SPEC.strides
    )  # nms_pre cuts none


def test_candidate_count_is_checked() -> None:
    k = candidates_per_image(320, 320)
    reference = (np.zeros((1, k, 4)), np.zeros((1, k, 80)))
    short = compare_yolox_candidates((np.zeros((1, k - 1, 4)), np.zeros((1, k - 1, 80))), reference, 320, 320)
    assert "the graph returned 2099 candidates per image, expected 2100 for 320x320" in short.count_mismatch
    assert short.numeric_error == math.inf and not short.levels


def _constants(graph: onnx.ModelProto) -> list[np.ndarray]:
    values = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    for node in graph.graph.node:
        values += [numpy_helper.to_array(a.t) for a in node.attribute if node.op_type == "Constant"]
    return values


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_priors_are_constants_of_the_graph(exports: dict, size: tuple[int, int]) -> None:
    graph = onnx.load(exports[portable_key(size)].onnx_path)
    assert "Range" not in {n.op_type for n in graph.graph.node}  # nothing generated from shapes
    constants = [c for c in _constants(graph) if c.ndim == 2 and c.shape[-1] == 2]
    for priors in grid_priors(level_sizes(*size, SPEC.strides)):
        assert any(c.shape == priors.shape and np.array_equal(c, priors.numpy()) for c in constants)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_portable_graph_matches_pytorch(model: YOLOX, exports: dict, size: tuple[int, int]) -> None:
    (h, w), uint8 = size, PORTABLE[size]
    result, k = exports[portable_key(size)], candidates_per_image(h, w)
    graph = onnx.load(result.onnx_path)
    onnx.checker.check_model(graph, full_check=True)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"} and result.opset == 17
    layout = (["batch", h, w, 3], "uint8") if uint8 else ([1, 3, h, w], "float32")
    assert (result.input_name, result.input_shape, result.input_dtype) == ("input.1", *layout)
    assert result.output_names == ["boxes", "scores"] and result.candidates_per_image == k
    assert result.parity["unexplained"] == 0 and result.parity_max_abs_err <= 1e-3
    assert [lv["anchors"] for lv in result.parity_levels] == [b[0] for b in yolox_level_blocks(h, w)]
    assert result.model == MODEL_SPEC.to_dict()
    # the exporter's pictures, twice through the dynamic batch axis for uint8
    feed = _feed(size, uint8)
    x = np.concatenate([feed, feed[:, ::-1].copy()]) if uint8 else feed
    boxes, scores = run_graph(graph, x)
    assert boxes.shape == (len(x), k, 4) and scores.shape == (len(x), k, 80)
    assert int((scores > 0).sum(-1).max()) == 1  # one label per prior
    with torch.inference_mode():
        mine = YoloxDeploy(model, h, w, normalize_in_graph=uint8)(torch.from_numpy(x))
    report = compare_yolox_candidates((boxes, scores), (mine[0].numpy(), mine[1].numpy()), h, w)
    assert report.unexplained == 0 and report.numeric_error <= 1e-3, report.describe()
    # the host NMS keeps the same detections from either runtime's candidates
    post = MODEL_SPEC.postprocess
    for image in range(len(x)):
        a = multiclass_nms(boxes[image], scores[image], post.score_thr, post.nms_iou, post.max_per_img)
        b = multiclass_nms(
            mine[0][image].numpy(), mine[1][image].numpy(), post.score_thr, post.nms_iou, post.max_per_img
        )
        assert len(a) == len(b) == post.max_per_img and np.array_equal(a.labels, b.labels)
        assert np.abs(a.scores - b.scores).max() < 1e-5 and np.abs(a.boxes - b.boxes).max() < 1e-3


def test_ascend_graph_ends_in_the_nms_op_with_the_spec_attributes(exports: dict) -> None:
    result = exports["ascend"]
    graph = onnx.load(result.onnx_path)
    nms = [n for n in graph.graph.node if n.op_type == NMS_OP]
    assert len(nms) == 1 and nms[0].domain == "" and len(nms[0].output) == 4
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attrs == {
        "score_threshold": pytest.approx(MODEL_SPEC.postprocess.score_thr),
        "iou_threshold": pytest.approx(MODEL_SPEC.postprocess.nms_iou),
        "max_size_per_class": MODEL_SPEC.postprocess.max_per_img,
        "max_total_size": MODEL_SPEC.postprocess.max_per_img,
    }
    assert result.opset == 11 and graph.opset_import[0].version == 11
    assert result.output_names == ["dets", "labels"]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output]
    assert dims == [[1, 100, 5], [1, 100]]
    producers = {o: n for n in graph.graph.node for o in n.output}
    for name in nms[0].input:  # fp16 inputs, as the other adapters' ascend graphs
        assert producers[name].op_type == "Cast"
        assert onnx.helper.get_attribute_value(producers[name].attribute[0]) == onnx.TensorProto.FLOAT16
    assert result.parity["unexplained"] == 0 and result.parity_max_abs_err <= 1e-3  # cut before NMS


def test_ascend_nms_inputs_equal_the_portable_outputs(exports: dict) -> None:
    cut, _ = _nms_free_copy(onnx.load(exports["ascend"].onnx_path))
    feed, k = _feed(SQUARE, uint8=False), candidates_per_image(*SQUARE)
    boxes, scores = run_graph(onnx.load(exports[portable_key(SQUARE)].onnx_path), feed)
    nms_boxes, nms_scores = run_graph(cut, feed)
    assert nms_boxes.shape == (1, k, 1, 4) and nms_scores.shape == (1, k, 81)
    assert np.abs(nms_boxes[:, :, 0] - boxes).max() < 1e-4
    assert np.abs(nms_scores[..., :80] - scores).max() < 1e-6
    assert not nms_scores[..., 80].any()  # the appended background column


@pytest.mark.parametrize("seed", OWN_SEEDS)
@pytest.mark.parametrize("variant", ["portable", "ascend"])
def test_both_variants_pass_parity_at_640_with_random_weights(
    own_size: dict, variant: str, seed: int
) -> None:
    """The registered size: boxes are compared relative to stride + box size, the one label per prior
    against PyTorch's scores of every class (the spec's parity facts)."""
    result = own_size[variant, seed]
    assert result.parity["unexplained"] == 0 and result.parity["boundary_ties"] == 0
    assert result.parity_max_abs_err <= 1e-4  # relative boxes ~2e-5, scores ~2e-5 (threshold 1e-3)
    assert [lv["anchors"] for lv in result.parity_levels] == [6400, 1600, 400]
    assert {lv["box_unit"] for lv in result.parity_levels} == {"size"}
    assert result.candidates_per_image == 8400


def _level_of_priors(size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """PyTorch's side of a synthetic `size` x `size` YOLOX input: boxes (1,K,4) 3 strides wide around
    each prior and the scores of every class (1,K,80), classes 0 and 1 tied exactly on every prior."""
    priors = torch.cat(grid_priors(level_sizes(size, size, SPEC.strides))).numpy().astype(np.float64)
    strides = np.repeat(SPEC.strides, [h * w for h, w in level_sizes(size, size, SPEC.strides)])
    half = 1.5 * strides[:, None]
    boxes = np.concatenate([priors - half, priors + half], axis=1)[None]
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.3, (1, len(priors), 80))
    scores[..., 0] = scores[..., 1] = 0.6
    return boxes, scores, len(priors)


def _one_label(scores: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The graph's scores: each row's score in the column `label` only."""
    out = np.zeros_like(scores)
    rows = np.arange(scores.shape[1])
    out[0, rows, label] = scores[0, rows, label]
    return out


def _unmatched(report: ParityReport) -> int:
    return sum(lv.unmatched for lv in report.levels)


def test_one_label_comparison_allows_a_near_tie_and_refuses_a_wrong_label() -> None:
    boxes, scores, k = _level_of_priors()
    either = np.arange(k) % 2  # the graph broke each exact 0/1 tie its own way
    report = compare_yolox_candidates((boxes, _one_label(scores, either)), (boxes, scores), 64, 64)
    assert report.unexplained == 0 and report.numeric_error == 0.0, report.describe()
    wrong = either.copy()
    wrong[:5] = 7  # not the best class of these priors: unmatched (and their priors missing)
    report = compare_yolox_candidates((boxes, _one_label(scores, wrong)), (boxes, scores), 64, 64)
    assert _unmatched(report) == 5 and report.unexplained == 10
    two = _one_label(scores, either)
    two[0, :3, 5] = 0.2  # a second label on three rows: no longer one label per prior
    assert _unmatched(compare_yolox_candidates((boxes, two), (boxes, scores), 64, 64)) == 3
    low = _one_label(scores, either)
    low[0, :4] *= 0.99  # the right label with a wrong score
    assert _unmatched(compare_yolox_candidates((boxes, low), (boxes, scores), 64, 64)) == 4


def test_boxes_are_compared_relative_to_stride_and_box_size() -> None:
    boxes, scores, k = _level_of_priors()
    graph_scores = _one_label(scores, np.zeros(k, dtype=np.int64))
    big = boxes.copy()
    big[0, -1] = [-1e5, -1e5, 1e5, 1e5]  # a P5 box 2e5 px wide, as random weights give at 640
    moved = big.copy()
    moved[0, -1] += 20.0  # 20 px = 1e-4 of its size: float noise of exp(wh) * stride, matched
    report = compare_yolox_candidates((moved, graph_scores), (big, scores), 64, 64)
    assert report.unexplained == 0 and report.boxes == pytest.approx(20 / (32 + 2e5))
    shifted = boxes.copy()
    shifted[0, :, :] += 0.5 * 8  # every box moved by half a P3 stride: no prior's box
    report = compare_yolox_candidates((shifted, graph_scores), (boxes, scores), 64, 64)
    assert all(lv.unmatched == lv.kept for lv in report.levels), report.describe()
    assert "of stride + box size" in report.describe()


# --- mutants: graphs a port could produce, checked against the correct PyTorch module -----------


def _assert_refused(message: str, variant: str) -> None:
    """The refusal names the graph, the reason, every level and the fix."""
    assert f"ONNX Runtime and PyTorch disagree on the YOLOX-s {variant} graph: " in message
    assert "are no top-k tie (> max_unexplained 0)" in message or "(> parity_threshold 0.001)" in message
    for level in ("P3:", "P4:", "P5:"):
        assert level in message
    assert "P6:" not in message and "check the opset and the model code" in message


def _replace_constants(graph: onnx.ModelProto, right: list[np.ndarray], wrong: list[np.ndarray]) -> int:
    """Replace, in place, each Constant node equal to one of `right` by its `wrong`; how many were."""
    replaced = 0
    for node in (n for n in graph.graph.node if n.op_type == "Constant"):
        value = node.attribute[0].t
        for old, new in zip(right, wrong, strict=True):
            if tuple(value.dims) == old.shape and np.array_equal(numpy_helper.to_array(value), old):
                value.CopyFrom(numpy_helper.from_array(new, value.name))
                replaced += 1
    return replaced


def test_priors_with_a_half_stride_offset_are_refused(model: YOLOX, exports: dict) -> None:
    correct = exports[portable_key(SQUARE)]
    assert correct.parity["unexplained"] == 0  # the control: same graph, same pictures, same check
    graph = copy.deepcopy(onnx.load(correct.onnx_path))
    sizes = level_sizes(*SQUARE, SPEC.strides)
    right = [p.numpy() for p in grid_priors(sizes)]
    wrong = [p.numpy() for p in grid_priors(sizes, dataclasses.replace(SPEC, center_offset=0.5))]
    assert _replace_constants(graph, right, wrong) == len(right)
    module = YoloxExport(YoloxDeploy(model, *SQUARE)).eval()
    report = parity(module, graph, _feed(SQUARE, uint8=False))
    refusal, fix = _verdict(report, 1e-3, 0)
    assert refusal and "check the opset and the model code" in fix, report.describe()
    assert all(lv.unexplained > 0 for lv in report.levels)  # every level's boxes moved by stride / 2


def test_priors_with_a_half_stride_offset_are_refused_at_640(own_nets: dict, own_size: dict) -> None:
    """At the registered size too, where boxes are compared relative to their size."""
    graph = onnx.load(own_size["portable", OWN_SEEDS[0]].onnx_path)
    sizes = level_sizes(*OWN_SIZE, SPEC.strides)
    right = [p.numpy() for p in grid_priors(sizes)]
    wrong = [p.numpy() for p in grid_priors(sizes, dataclasses.replace(SPEC, center_offset=0.5))]
    assert _replace_constants(graph, right, wrong) == len(right)
    module = YoloxExport(YoloxDeploy(own_nets[OWN_SEEDS[0]], *OWN_SIZE)).eval()
    report = parity(module, graph, _feed(OWN_SIZE, uint8=False))
    refusal, _ = _verdict(report, 1e-3, 0)
    assert refusal and all(lv.unexplained > 0 for lv in report.levels), report.describe()


def test_a_wrong_p3_stride_is_refused_and_the_graph_kept(
    model: YOLOX, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole export: the graph is traced with P3's priors on a stride-16 grid."""
    real_export, real_priors = torch.onnx.export, YoloxExport.priors

    def wrong_priors(self: YoloxExport) -> list[torch.Tensor]:
        priors = real_priors(self)
        return [priors[0] * 2, *priors[1:]]

    def export(*args: object, **kwargs: object) -> object:
        with monkeypatch.context() as patch:
            patch.setattr(YoloxExport, "priors", wrong_priors)
            return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    target = tmp_path / "y.onnx"
    with pytest.raises(ExportError) as info:
        export_yolox(model, target, "ascend", 128, 128)
    _assert_refused(str(info.value), "ascend")
    assert f"The target {target} was not written; the refused graph is kept at" in str(info.value)
    assert not target.exists() and rejected_path(target).is_file()
    assert not target.with_suffix(".export.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"variant": "tensorrt"}, r"unknown variant 'tensorrt'"),
        ({"height": 250}, r"height 250 .* multiple of 32"),
    ],
)
def test_bad_arguments(model: YOLOX, tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ExportError, match=pattern):
        export_yolox(model, tmp_path / "x.onnx", **{"height": 128, "width": 128, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_the_registered_adapter_exports_through_export_onnx(tmp_path: Path) -> None:
    """`export_onnx(model="yolox")` through the registry: the checkpoint's hash and the spec are
    recorded beside the graph, where ONNX Runtime reads its NMS settings from."""
    from gfocal_pipeline import adapters
    from gfocal_pipeline.export import export_onnx
    from gfocal_pipeline.fileio import sha256_file
    from gfocal_pipeline.model_spec import spec_beside

    assert "yolox" in adapters.model_names() and adapters.model_spec("yolox") == MODEL_SPEC
    checkpoint = adapters.load_adapter("yolox").write_random_checkpoint(tmp_path / "w.pth", seed=SEED)
    result = export_onnx(checkpoint, tmp_path / "y.onnx", "portable", 128, 160, model="yolox")
    assert result.checkpoint_sha256 == sha256_file(checkpoint) and result.parity["unexplained"] == 0
    assert result.candidates_per_image == 16 * 20 + 8 * 10 + 4 * 5
    assert spec_beside(tmp_path / "y.onnx") == MODEL_SPEC
