"""RetinaNet ONNX export: both variants, anchors as graph constants, tie-aware parity, mutants refused.

One model with realistic random weights (`retinanet_weights`) is exported once per variant and size;
ONNX Runtime's candidates are checked against PyTorch's decode of every anchor, with 9 anchors per
location. Mutants a port can introduce must be refused by the same check: a wrong anchor table
(octave_base_scale, stride; the graph's anchor constants replaced) and swapped delta order (traced from
the mutated module through the whole export).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from adapter_exports import export_matrix, portable_key, run_graph
from onnx import numpy_helper

import gfocal_pipeline.models.retinanet.deploy as retina_deploy
from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.export import (
    ALL_ANCHORS,
    ExportResult,
    _nms_free_copy,
    rejected_path,
    sample_inputs,
)
from gfocal_pipeline.models.retinanet import RETINANET_R50_FPN_1X, RetinaNet, RetinaNetDeploy, build_retinanet
from gfocal_pipeline.models.retinanet.anchors import AnchorGenerator
from gfocal_pipeline.models.retinanet.deploy import decode_candidates
from gfocal_pipeline.models.retinanet.export import (
    RetinaNetExport,
    check_parity,
    export_retinanet,
    trace,
)
from gfocal_pipeline.models.retinanet.parity import (
    candidates_per_image,
    compare_retinanet_candidates,
    retinanet_level_blocks,
)
from gfocal_pipeline.models.retinanet.spec import RetinaNetSpec
from gfocal_pipeline.models.retinanet.weights import randomize
from gfocal_pipeline.nets.ascend_nms import NMS_OP
from gfocal_pipeline.nets.levels import level_sizes
from gfocal_pipeline.parity import compare_candidates

SPEC = RETINANET_R50_FPN_1X
# portable exports (P3 and P4 keep nms_pre of more anchors at both sizes): True for the other input the
# GFocalV2 export offers, uint8 NHWC BGR normalized in the graph, with a dynamic batch axis
PORTABLE = {(256, 256): False, (192, 288): True}
SIZES = list(PORTABLE)
SQUARE = SIZES[0]  # the ascend export and the mutants
SMALL = (192, 256)  # the tie case: P3 has 6912 anchors
SEED = 0


@pytest.fixture(scope="module")
def model() -> RetinaNet:
    net = build_retinanet()
    randomize(net, SEED)
    return net


@pytest.fixture(scope="module")
def exports(model: RetinaNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    return export_matrix(export_retinanet, model, tmp_path_factory.mktemp("retinanet"), PORTABLE, SQUARE)


def test_candidates_per_image_has_nine_anchors_per_location() -> None:
    # 320x320: 40x40, 20x20, 10x10, 5x5, 3x3 locations x 9 -> 1000 + 1000 + 900 + 225 + 81
    assert retinanet_level_blocks(320, 320) == [
        (14400, 1000, 0),
        (3600, 1000, 1000),
        (900, 900, 2000),
        (225, 225, 2900),
        (81, 81, 3125),
    ]
    assert candidates_per_image(320, 320) == 3206
    assert candidates_per_image(256, 384) == 1000 + 1000 + 864 + 216 + 54
    assert candidates_per_image(800, 1216) == 4 * 1000 + 7 * 10 * 9


def test_candidate_count_is_checked_with_nine_anchors_per_location() -> None:
    k, anchors = candidates_per_image(320, 320), sum(b[0] for b in retinanet_level_blocks(320, 320))
    reference = (np.zeros((1, anchors, 4)), np.zeros((1, anchors, 80)))
    short = compare_retinanet_candidates(
        (np.zeros((1, k - 9, 4)), np.zeros((1, k - 9, 80))), reference, 320, 320
    )
    assert short.count_mismatch == (
        "the graph returned 3197 candidates per image, expected 3206 for 320x320 with 9 anchors per "
        "location (PyTorch decoded 19206 of 19206 anchors)"
    )
    assert short.numeric_error == math.inf and not short.levels
    # GFocalV2's comparison cuts levels of H*W anchors: it cannot take RetinaNet's candidates
    right_k = (np.zeros((1, k, 4)), np.zeros((1, k, 80)))
    assert "expected 1534 for 320x320" in compare_candidates(right_k, reference, 320, 320).count_mismatch


def test_frozen_anchors_equal_the_generated_ones(model: RetinaNet) -> None:
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(3))  # P3: 1728 anchors
    frozen = RetinaNetExport(RetinaNetDeploy(model, 96, 128)).anchors()
    with torch.inference_mode():
        heads = model(x)
        generated = decode_candidates(*heads, 96, 128)  # = RetinaNetDeploy(model, 96, 128)(x)
        traced = decode_candidates(*heads, 96, 128, SPEC, frozen)  # what RetinaNetExport traces
    assert all(torch.equal(a, b) for a, b in zip(generated, traced, strict=True))


def _constants(graph: onnx.ModelProto) -> list[np.ndarray]:
    values = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    for node in graph.graph.node:
        values += [numpy_helper.to_array(a.t) for a in node.attribute if node.op_type == "Constant"]
    return values


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_anchors_are_constants_of_the_graph(exports: dict[str, ExportResult], size: tuple[int, int]) -> None:
    graph = onnx.load(exports[portable_key(size)].onnx_path)
    assert "Range" not in {n.op_type for n in graph.graph.node}  # nothing generated from shapes
    constants = [c.reshape(-1, 4) for c in _constants(graph) if c.size % 4 == 0 and c.size >= 4 * 9]
    for anchors in AnchorGenerator(SPEC).grid_anchors(level_sizes(*size)):
        assert any(c.shape == anchors.shape and np.array_equal(c, anchors.numpy()) for c in constants)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_portable_graph_matches_pytorch(
    model: RetinaNet, exports: dict[str, ExportResult], size: tuple[int, int]
) -> None:
    (h, w), uint8 = size, PORTABLE[size]
    result, k = exports[portable_key(size)], candidates_per_image(h, w)
    graph = onnx.load(result.onnx_path)
    onnx.checker.check_model(graph, full_check=True)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"} and result.opset == 17
    layout = (["batch", h, w, 3], "uint8") if uint8 else ([1, 3, h, w], "float32")
    assert (result.input_name, result.input_shape, result.input_dtype) == ("input.1", *layout)
    assert result.output_names == ["boxes", "scores"] and result.candidates_per_image == k
    assert result.parity["unexplained"] == 0 and result.parity_max_abs_err <= 1e-3
    assert [lv["anchors"] for lv in result.parity_levels] == [b[0] for b in retinanet_level_blocks(h, w)]
    # inputs of its own, not the exporter's pictures; two images through the dynamic batch axis
    rng = np.random.default_rng(h + w)
    x = (
        rng.integers(0, 256, (2, h, w, 3), np.uint8)
        if uint8
        else rng.standard_normal((1, 3, h, w), np.float32)
    )
    boxes, scores = run_graph(graph, x)
    assert boxes.shape == (len(x), k, 4) and scores.shape == (len(x), k, 80)
    with torch.inference_mode():
        deploy = RetinaNetDeploy(model, h, w, normalize_in_graph=uint8)
        heads = model(deploy.normalize(torch.from_numpy(x)) if uint8 else torch.from_numpy(x))
        kept = decode_candidates(*heads, h, w)  # = deploy(x)
        every = decode_candidates(*heads, h, w, dataclasses.replace(SPEC, nms_pre=ALL_ANCHORS))
    report = compare_retinanet_candidates((boxes, scores), (every[0].numpy(), every[1].numpy()), h, w)
    assert report.unexplained == 0 and report.numeric_error <= 1e-3, report.describe()
    assert np.abs(boxes - kept[0].numpy()).max() < 1e-3 and np.abs(scores - kept[1].numpy()).max() < 1e-5
    assert boxes[..., 0::2].max() <= w and boxes[..., 1::2].max() <= h and boxes.min() >= 0


def test_ascend_graph_ends_in_the_nms_op_with_the_spec_attributes(exports: dict[str, ExportResult]) -> None:
    result = exports["ascend"]
    graph = onnx.load(result.onnx_path)
    nms = [n for n in graph.graph.node if n.op_type == NMS_OP]
    assert len(nms) == 1 and nms[0].domain == "" and len(nms[0].output) == 4  # as the GFocalV2 variant
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attrs == {
        "score_threshold": pytest.approx(SPEC.score_thr),
        "iou_threshold": pytest.approx(SPEC.nms_iou),
        "max_size_per_class": SPEC.max_per_img,
        "max_total_size": SPEC.max_per_img,
    }
    assert result.opset == 11 and graph.opset_import[0].version == 11
    assert result.output_names == ["dets", "labels"]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output]
    assert dims == [[1, SPEC.max_per_img, 5], [1, SPEC.max_per_img]]
    producers = {o: n for n in graph.graph.node for o in n.output}
    for name in nms[0].input:  # fp16 inputs, as in the seed
        assert producers[name].op_type == "Cast"
        assert onnx.helper.get_attribute_value(producers[name].attribute[0]) == onnx.TensorProto.FLOAT16
    assert result.parity["unexplained"] == 0 and result.parity_max_abs_err <= 1e-3  # cut before NMS


def test_ascend_nms_inputs_equal_the_portable_outputs(exports: dict[str, ExportResult]) -> None:
    cut, _ = _nms_free_copy(onnx.load(exports["ascend"].onnx_path))
    feed, k = sample_inputs(*SQUARE, uint8=False)[1], candidates_per_image(*SQUARE)
    boxes, scores = run_graph(onnx.load(exports[portable_key(SQUARE)].onnx_path), feed)
    nms_boxes, nms_scores = run_graph(cut, feed)
    assert nms_boxes.shape == (1, k, 1, 4) and nms_scores.shape == (1, k, 81)
    assert np.abs(nms_boxes[:, :, 0] - boxes).max() < 1e-4
    assert np.abs(nms_scores[..., :80] - scores).max() < 1e-6
    assert not nms_scores[..., 80].any()  # the appended background column


# --- exact top-k ties: element-wise comparison fails, the tie-aware check does not -------------


@pytest.fixture(scope="module")
def flat_p3(model: RetinaNet) -> RetinaNetExport:
    """The model with P3 zeroed: the head then sees one constant map there, so every interior location
    of P3 scores the same per anchor shape, and many anchors share P3's nms_pre boundary key."""
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.neck.fpn_convs[0].conv.weight.zero_()
        flat.neck.fpn_convs[0].conv.bias.zero_()
    return RetinaNetExport(RetinaNetDeploy(flat, *SMALL)).eval()


def test_topk_ties_pass_the_tie_aware_check(flat_p3: RetinaNetExport, tmp_path: Path) -> None:
    feed = sample_inputs(*SMALL, uint8=False)[0]
    graph = trace(flat_p3, feed, tmp_path / "flat.onnx")
    got = run_graph(graph, feed)
    with torch.inference_mode():
        heads = flat_p3.deploy.model(torch.from_numpy(feed))
        mine = [t.numpy() for t in decode_candidates(*heads, *SMALL)]  # = flat_p3(feed)
        every = decode_candidates(*heads, *SMALL, dataclasses.replace(SPEC, nms_pre=ALL_ANCHORS))
    reference = (every[0].numpy(), every[1].numpy())
    keys = reference[1][0, : retinanet_level_blocks(*SMALL)[0][0]].max(-1)
    boundary = np.sort(keys)[-SPEC.nms_pre]
    assert np.sum(np.abs(keys - boundary) <= 1e-5 + 1e-4 * boundary) > 100  # a big tie group on P3
    assert np.abs(got[0] - mine[0]).max() > 1.0  # the runtimes kept different tied anchors
    report = compare_retinanet_candidates(tuple(got), reference, *SMALL)
    torch_side = compare_retinanet_candidates(tuple(mine), reference, *SMALL)
    for side in (report, torch_side):
        assert side.unexplained == 0 and side.numeric_error <= 1e-3, side.describe()
    assert report.levels[0].level == "P3" and report.levels[0].boundary_key is not None
    assert report.ties + torch_side.ties > 0


# --- mutants: graphs a port could produce, checked against the correct PyTorch module -----------


def _assert_refused(message: str, variant: str, size: tuple[int, int]) -> None:
    """The refusal names the graph, the reason, every level (P3 with its top-k boundary), the fix."""
    assert f"ONNX Runtime and PyTorch disagree on the RetinaNet R50-FPN 1x {variant} graph: " in message
    assert "are no top-k tie (> max_unexplained 0)" in message or "(> parity_threshold 0.001)" in message
    p3 = retinanet_level_blocks(*size)[0][0]
    for level in (f"P3: 1000 of {p3} anchors kept", "P4:", "P5:", "P6:", "P7:"):
        assert level in message
    assert "check the opset and the model code" in message


def with_anchors(graph: onnx.ModelProto, spec: RetinaNetSpec, size: tuple[int, int]) -> onnx.ModelProto:
    """A copy of `graph` whose anchor constants are those of `spec`: a port's wrong anchor table."""
    mutant = copy.deepcopy(graph)
    right = [a.numpy() for a in AnchorGenerator(SPEC).grid_anchors(level_sizes(*size))]
    wrong = [a.numpy() for a in AnchorGenerator(spec).grid_anchors(level_sizes(*size))]
    replaced = 0
    for node in (n for n in mutant.graph.node if n.op_type == "Constant"):
        value = node.attribute[0].t
        for old, new in zip(right, wrong, strict=True):
            if tuple(value.dims) == old.shape and np.array_equal(numpy_helper.to_array(value), old):
                value.CopyFrom(numpy_helper.from_array(new, value.name))
                replaced += 1
    assert replaced == len(right)  # every level's table, as `test_anchors_are_constants_of_the_graph`
    return mutant


ANCHOR_MUTANTS = {
    "octave_base_scale 3": dataclasses.replace(SPEC, octave_base_scale=3.0),
    "P3 stride 16": dataclasses.replace(SPEC, strides=(16, *SPEC.strides[1:])),
}


@pytest.mark.parametrize("mutant", sorted(ANCHOR_MUTANTS))
def test_anchor_mutants_are_refused(model: RetinaNet, exports: dict[str, ExportResult], mutant: str) -> None:
    correct = exports[portable_key(SQUARE)]
    assert correct.parity["unexplained"] == 0  # the control: same graph, same pictures, same check
    graph = with_anchors(onnx.load(correct.onnx_path), ANCHOR_MUTANTS[mutant], SQUARE)
    module = RetinaNetExport(RetinaNetDeploy(model, *SQUARE)).eval()
    with pytest.raises(ExportError) as info:
        check_parity(module, graph, [sample_inputs(*SQUARE, uint8=False)[1]])
    _assert_refused(str(info.value), "portable", SQUARE)


@contextlib.contextmanager
def swapped_deltas() -> Iterator[None]:
    """Deltas read as (dw, dh, dx, dy): the regression channels mixed up in a port."""
    real = retina_deploy.delta2bbox
    retina_deploy.delta2bbox = lambda anchors, deltas, *a: real(anchors, deltas[..., [2, 3, 0, 1]], *a)
    try:
        yield
    finally:
        retina_deploy.delta2bbox = real


def test_swapped_delta_order_is_refused_and_the_graph_kept(
    model: RetinaNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole export: the graph is traced from the mutated module, the reference is not."""
    real = torch.onnx.export

    def export(*args: object, **kwargs: object) -> object:
        with swapped_deltas():
            return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    target = tmp_path / "r.onnx"
    with pytest.raises(ExportError) as info:
        export_retinanet(model, target, "ascend", 128, 128)
    _assert_refused(str(info.value), "ascend", (128, 128))
    assert f"The target {target} was not written; the refused graph is kept at" in str(info.value)
    assert not target.exists() and rejected_path(target).is_file()
    assert not target.with_suffix(".export.json").exists()


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"variant": "tensorrt"}, r"unknown variant 'tensorrt'"),
        ({"height": 250}, r"height 250 .* multiple of 32"),
        ({"max_unexplained": -1}, r"max_unexplained -1"),
    ],
)
def test_bad_arguments(model: RetinaNet, tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ExportError, match=pattern):
        export_retinanet(model, tmp_path / "x.onnx", **{"height": 128, "width": 128, **kwargs})
    assert list(tmp_path.iterdir()) == []
