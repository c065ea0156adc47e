"""Export parity on real graphs: valid checkpoints with exact top-k ties pass, broken graphs are refused.

The checkpoints are drawn like a foreign checkpoint in the official layout (not the project's own
random generator): their collapsed activations and the letterbox padding make many anchors share the
boundary key of a level, which each runtime's TopK breaks differently. The mutants are graphs with a
deliberate error a port can introduce (a half-pixel prior offset, a wrong stride, a ReLU before P7);
each is exported and checked against the correct PyTorch model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import gfocal_pipeline.models.gfocalv2.decode as decode_module
import gfocal_pipeline.models.gfocalv2.export as export_module
from gfocal_pipeline.errors import ExportError
from gfocal_pipeline.export import PARITY_PICTURES, export_onnx, rejected_path, sample_inputs
from gfocal_pipeline.models.gfocalv2 import DeployModel
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model
from gfocal_pipeline.models.gfocalv2.export import parity
from gfocal_pipeline.nets.fpn import FPN

SMALL = (320, 320)  # P3 has 1600 anchors: a real top-k boundary at a small size
FULL = (800, 1216)


def foreign_state_dict(seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Weights drawn as in the issue: float tensors N(0, scale) (>= 2-D) and N(0, 2*scale) (1-D), BN
    running_var U[0.5, 1.5), each Scale 1 + 0.2 U(0,1), integral.project untouched, classifier bias
    linspace(-4, 1, 81)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in load_model_template().items():
        if not tensor.is_floating_point() or key.endswith("integral.project"):
            value = tensor.clone()
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif key.endswith(".scale"):
            value = 1 + 0.2 * torch.rand((), generator=generator)
        elif key == "bbox_head.gfl_cls.bias":
            value = torch.linspace(-4, 1, tensor.numel())
        else:
            std = scale if tensor.dim() >= 2 else 2 * scale
            value = std * torch.randn(tensor.shape, generator=generator)
        state[key] = value.to(tensor.dtype).reshape(tensor.shape).contiguous()
    return state


def load_model_template() -> dict[str, torch.Tensor]:
    from gfocal_pipeline.models.gfocalv2 import build_model

    return build_model().state_dict()


def write_foreign_checkpoint(path: Path, seed: int, scale: float = 0.05) -> Path:
    """mmcv layout {'meta', 'state_dict'} with numpy values in meta, as official checkpoints have."""
    meta = {"epoch": np.int64(12), "iter": np.int64(87960), "mmdet_version": "2.6.0", "hist": np.arange(3)}
    torch.save({"meta": meta, "state_dict": foreign_state_dict(seed, scale)}, path)
    return path


@pytest.fixture(scope="module")
def foreign_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed 2: on the portrait parity picture, 70 anchors of P4 share the 1000th key (measured)
    return write_foreign_checkpoint(tmp_path_factory.mktemp("foreign") / "foreign.pth", seed=2)


# --- mutations: each yields while the PyTorch model (and so the traced graph) carries the error ---


@contextlib.contextmanager
def prior_offset(deploy: DeployModel) -> Iterator[None]:
    """Anchor centers shifted by +0.5 px (a half-pixel convention mixed up in a port)."""
    original = decode_module.anchor_centers
    decode_module.anchor_centers = lambda *a, **k: original(*a, **k) + 0.5
    try:
        yield
    finally:
        decode_module.anchor_centers = original


@contextlib.contextmanager
def wrong_stride(deploy: DeployModel) -> Iterator[None]:
    """P5's stride taken as 16 instead of 32 (a level table off by one)."""
    original = decode_module.STRIDES
    decode_module.STRIDES = (8, 16, 16, 64, 128)
    try:
        yield
    finally:
        decode_module.STRIDES = original


@contextlib.contextmanager
def relu_before_p7(deploy: DeployModel) -> Iterator[None]:
    """A ReLU between P6 and the conv making P7 (the official `relu_before_extra_convs=False`)."""
    fpn: FPN = deploy.model.neck
    original = fpn.forward

    def forward(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = original(inputs)
        outs[-1] = fpn.fpn_convs[-1](F.relu(outs[-2]))
        return outs

    fpn.forward = forward
    try:
        yield
    finally:
        del fpn.forward


MUTATIONS: dict[str, Callable[[DeployModel], contextlib.AbstractContextManager[None]]] = {
    "prior +0.5px": prior_offset,
    "wrong stride": wrong_stride,
    "relu before P7": relu_before_p7,
}


def traced_graph(deploy: DeployModel, feed: np.ndarray, path: Path, opset: int) -> onnx.ModelProto:
    """The graph `torch.onnx.export` makes of `deploy` as it is now (mutated or not)."""
    with torch.no_grad(), contextlib.redirect_stdout(None):
        torch.onnx.export(
            deploy,
            (torch.from_numpy(feed),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input.1"],
            output_names=list(deploy.output_names),
            do_constant_folding=True,
        )
    return onnx.load(str(path))


def _deploy(checkpoint: Path, variant: str, size: tuple[int, int]) -> DeployModel:
    return DeployModel(load_model(checkpoint), variant, *size).eval()


# --- the acceptance: the foreign checkpoint exports, with ties reported -------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["portable", "ascend"])
def test_foreign_checkpoint_exports_at_full_size(
    foreign_checkpoint: Path, tmp_path: Path, variant: str
) -> None:
    result = export_onnx(foreign_checkpoint, tmp_path / f"{variant}.onnx", variant, *FULL)
    assert Path(result.onnx_path).is_file()
    assert result.parity["unexplained"] == 0 and not result.unexplained_allowed
    # the point of the fix: this checkpoint has exact ties at the top-k boundary, and they are recognized
    assert result.parity["boundary_ties"] > 0
    assert result.parity_max_abs_err <= 1e-3
    # the parity pictures: a landscape and a portrait one, both leaving letterbox padding on the right
    assert [w / h > 1 for w, h in PARITY_PICTURES] == [True, False]
    levels = {lv["level"]: lv for lv in result.parity_levels}
    assert levels["P3"]["kept"] == 1000 and levels["P3"]["anchors"] == 100 * 152
    assert levels["P7"]["boundary_key"] is None  # 7x10 anchors, all kept
    sidecar = json.loads(Path(result.onnx_path).with_suffix(".export.json").read_text())
    assert sidecar["parity"]["boundary_ties"] == result.parity["boundary_ties"]
    assert not rejected_path(result.onnx_path).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutants_refused_at_full_size(foreign_checkpoint: Path, tmp_path: Path, mutation: str) -> None:
    deploy = _deploy(foreign_checkpoint, "portable", FULL)
    feed = sample_inputs(*FULL, uint8=False)[1]
    with MUTATIONS[mutation](deploy):
        graph = traced_graph(deploy, feed, tmp_path / "mutant.onnx", 17)
    report = parity(deploy, graph, feed)
    assert report.unexplained > 0 or report.numeric_error > 1e-3, report.describe()


# --- property-style at a small size: seeds x weight scales x variants ---------------------------

CASES = [(1, 0.03), (3, 0.05), (4, 0.08)]


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, float], Path]:
    folder = tmp_path_factory.mktemp("small")
    return {case: write_foreign_checkpoint(folder / f"s{case[0]}_{case[1]}.pth", *case) for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["portable", "ascend"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}-scale{c[1]}")
def test_correct_graph_passes_and_mutants_fail(
    small_checkpoints: dict, tmp_path: Path, case: tuple[int, float], variant: str
) -> None:
    deploy = _deploy(small_checkpoints[case], variant, SMALL)
    feed = sample_inputs(*SMALL, uint8=False)[case[0] % len(PARITY_PICTURES)]
    opset = 17 if variant == "portable" else 11
    good = parity(deploy, traced_graph(deploy, feed, tmp_path / "good.onnx", opset), feed)
    assert good.unexplained == 0 and good.numeric_error <= 1e-3, good.describe()
    for name, mutation in MUTATIONS.items():
        with mutation(deploy):
            graph = traced_graph(deploy, feed, tmp_path / "mutant.onnx", opset)
        bad = parity(deploy, graph, feed)
        assert bad.unexplained > 0 or bad.numeric_error > 1e-3, f"{name} passed:\n{bad.describe()}"


# --- the gate's verdicts through export_onnx: refusal message, rejected graph, max_unexplained ---


def mutate_tracing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """From now on the graphs `export_onnx` traces carry mutation `name`; its PyTorch reference does not."""
    real = torch.onnx.export

    def export(model: DeployModel, *args: object, **kwargs: object) -> object:
        with MUTATIONS[name](model):
            return real(model, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


def test_refused_graph_is_kept_beside_the_target_with_a_diagnosis(
    foreign_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mutate_tracing(monkeypatch, "wrong stride")
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(foreign_checkpoint, target, "portable", *SMALL, parity_threshold=1e9)
    message = str(info.value)
    assert "unexplained" in message and "max_unexplained 0" in message
    for level in ("P3:", "P4:", "P5:", "P6:", "P7:"):
        assert level in message
    assert "largest gap" in message and str(rejected_path(target)) in message
    assert not target.exists() and rejected_path(target).is_file()
    assert not target.with_suffix(".export.json").exists()
    onnx.checker.check_model(onnx.load(str(rejected_path(target))))
    # a later export that passes supersedes the refused graph
    monkeypatch.undo()
    export_onnx(foreign_checkpoint, target, "portable", *SMALL)
    assert target.is_file() and not rejected_path(target).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_numeric_error_refused_by_threshold_and_max_unexplained_does_not_hide_it(
    foreign_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mutate_tracing(monkeypatch, "prior +0.5px")
    with pytest.raises(ExportError, match=r"differ from PyTorch by 0\.5 .*parity_threshold 0\.001"):
        export_onnx(foreign_checkpoint, tmp_path / "m.onnx", "portable", *SMALL, max_unexplained=10**6)
    assert not (tmp_path / "m.onnx").exists()


def test_max_unexplained_lets_a_run_through_and_is_recorded(
    foreign_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a ReLU before P7 changes only P7: its candidates are no anchor of PyTorch's
    mutate_tracing(monkeypatch, "relu before P7")
    with pytest.raises(ExportError, match=r"P7: .* [1-9]\d* unexplained"):
        export_onnx(foreign_checkpoint, tmp_path / "m.onnx", "portable", *SMALL, parity_threshold=1e9)
    result = export_onnx(
        foreign_checkpoint,
        tmp_path / "m.onnx",
        "portable",
        *SMALL,
        parity_threshold=1e9,
        max_unexplained=10**6,
    )
    assert result.unexplained_allowed and result.max_unexplained == 10**6
    assert result.parity["unexplained"] > 0 and result.to_xcom()["unexplained_allowed"] is True
    sidecar = json.loads((tmp_path / "m.export.json").read_text())
    assert sidecar["unexplained_allowed"] is True and sidecar["max_unexplained"] == 10**6


class _InfScores:
    """An ONNX Runtime session whose `scores` output has +Inf on two candidates of each image."""

    def __init__(self, session: object) -> None:
        self.session = session

    def get_inputs(self) -> list:
        return self.session.get_inputs()

    def run(self, names: None, feed: dict) -> list[np.ndarray]:
        boxes, scores = self.session.run(names, feed)
        scores = scores.copy()
        scores[:, :2, 0] = np.inf
        return [boxes, scores]


def test_non_finite_outputs_are_refused_with_counts_per_output(
    foreign_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN in PyTorch's reference and Inf in ONNX Runtime's output: counted per output and refused
    whatever the thresholds (NaN compares false with every bound, so it must never read as 0 error).
    Both sides in one export; `test_parity.py` has each side alone. NaN *weights* are refused earlier,
    at load (`test_bad_checkpoints.py`)."""
    real_reference, real_session = export_module.reference_anchors, export_module._session

    def reference(deploy: DeployModel, feed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = real_reference(deploy, feed)
        boxes = boxes.copy()
        boxes[:, :5, 0] = np.nan
        return boxes, scores

    monkeypatch.setattr(export_module, "reference_anchors", reference)
    monkeypatch.setattr(export_module, "_session", lambda graph: _InfScores(real_session(graph)))
    target = tmp_path / "n.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(
            foreign_checkpoint, target, "portable", *SMALL, parity_threshold=1e9, max_unexplained=10**6
        )
    message = str(info.value)
    # two parity pictures, batch 1: 2 x 2 Inf scores, 2 x 5 NaN boxes
    counts = "onnxruntime boxes 0, onnxruntime scores 4, pytorch boxes 10, pytorch scores 0"
    assert "14 output value(s) are NaN or Inf" in message
    assert f"non-finite values (NaN/Inf) per output: {counts}" in message
    assert "No threshold lets NaN/Inf through" in message and "re-export" in message
    assert "0 unexplained" not in message and "max error" not in message  # nothing was compared
    assert not target.exists() and not target.with_suffix(".export.json").exists()
    assert rejected_path(target).is_file()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"parity_threshold": 0}, r"parity_threshold 0 must be a finite number > 0"),
        ({"parity_threshold": "x"}, r"parity_threshold 'x'"),
        ({"parity_threshold": float("inf")}, r"parity_threshold inf must be a finite number"),
        ({"parity_threshold": float("nan")}, r"parity_threshold nan must be a finite number"),
        ({"max_unexplained": -1}, r"max_unexplained -1 must be an integer >= 0"),
        ({"max_unexplained": 1.5}, r"max_unexplained 1.5"),
    ],
)
def test_bad_gate_arguments(foreign_checkpoint: Path, tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ExportError, match=pattern):
        export_onnx(foreign_checkpoint, tmp_path / "x.onnx", "portable", *SMALL, **kwargs)
    assert list(tmp_path.iterdir()) == []
