"""The model adapter seam: registry, specs as validated data, the choice of model in a run's options,
and the spec travelling in the artifacts (run.json, .export.json) to the steps that read it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gfocal_pipeline.adapters import check_model_name, load_adapter, model_names, model_spec
from gfocal_pipeline.cli import main
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.model_spec import ModelSpec, spec_beside

SMALL = (64, 96)  # every level holds <= nms_pre (1000) anchors: no top-k boundary to tie on


def test_both_adapters_are_registered_with_their_own_facts() -> None:
    assert {"gfocalv2", "retinanet"} <= set(model_names())
    gfocal, retina = model_spec("gfocalv2"), model_spec("retinanet")
    # the official test_cfg of each config: GFL's NMS IoU is 0.6, RetinaNet's 0.5
    assert (gfocal.postprocess.nms_iou, retina.postprocess.nms_iou) == (0.6, 0.5)
    assert gfocal.history_name == "gfocalv2_r50_fpn_1x"  # the key every existing history row has
    assert retina.history_name != gfocal.history_name and retina.om_name != gfocal.om_name
    assert (gfocal.published_ap, retina.published_ap) == (0.410, 0.365)
    for name in model_names():
        assert load_adapter(name).spec == model_spec(name)


def test_an_unknown_model_names_the_nearest_and_every_choice() -> None:
    with pytest.raises(ConfigError) as info:
        check_model_name("retinanett")
    message = str(info.value)
    assert "'retinanett' is not a registered model adapter (did you mean 'retinanet'?)" in message
    assert "choose one of: gfocalv2, onnx, retinanet, yolox" in message and "gfocal models" in message


def test_a_recorded_spec_is_validated_field_by_field() -> None:
    good = model_spec("retinanet").to_dict()
    assert ModelSpec.from_dict(json.loads(json.dumps(good)), "x") == model_spec("retinanet")
    bad = {**good, "num_classes": 0, "postprocess": {**good["postprocess"], "nms_iou": 1.5}, "extra": 1}
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_dict(bad, "/runs/r/run.json")
    message = str(info.value)
    assert message.startswith("model spec in /runs/r/run.json is invalid: ")
    for field in ("num_classes", "postprocess.nms_iou", "extra"):
        assert f"{field}:" in message


def test_gfocal_models_lists_every_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(model_names())
    assert any("IoU 0.5" in line and "RetinaNet R50-FPN 1x" in line for line in lines)
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gfocalv2"]["om_name"] == "gfocal"


def test_the_run_records_its_model_and_takes_that_models_demo_weights(tmp_path: Path) -> None:
    from gfocal_pipeline.steps import history_record, prepare_step

    prepared = prepare_step({"model": "retinanet", "work_dir": str(tmp_path)}, "dag", "run1", ascend=False)
    assert prepared["model"] == "retinanet" and prepared["weights_random"] is True
    assert Path(prepared["checkpoint"]).name == model_spec("retinanet").demo_checkpoint
    recorded = json.loads((Path(prepared["run_dir"]) / "run.json").read_text())
    assert recorded["model"] == model_spec("retinanet").to_dict()
    # the weights are RetinaNet's layout: its adapter loads them strictly
    load_adapter("retinanet").load_network(prepared["checkpoint"])
    evaluation = {"images": 3, "stats": {"AP": 0.0}, "timing": {}, "dataset_id": "demo"}
    record = history_record(
        dag_id="dag",
        run_id="run1",
        role={"backend": "onnxruntime", "device": "cpu"},
        evaluation=evaluation,
        run_config=prepared,
        export_info={},
        convert_info={},
        ap_delta=None,
    )
    assert record.config.model == "retinanet_r50_fpn_1x"


def test_a_bad_model_in_a_form_is_refused_before_any_work(tmp_path: Path) -> None:
    from gfocal_pipeline.run_config import RunConfig

    with pytest.raises(ConfigError, match="'retina' is not a registered model adapter"):
        RunConfig.from_mapping({"model": "retina", "work_dir": str(tmp_path)})
    assert not (tmp_path / "demo").exists()


@pytest.fixture(scope="module")
def retinanet_portable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, portable graph) of RANDOM RetinaNet weights exported by name."""
    from gfocal_pipeline.export import export_onnx

    work = tmp_path_factory.mktemp("retina")
    checkpoint = load_adapter("retinanet").write_random_checkpoint(work / "r.pth", seed=3)
    graph = work / "r.onnx"
    export_onnx(checkpoint, graph, "portable", *SMALL, model="retinanet", dynamic_batch=True)
    return checkpoint, graph


def test_the_export_records_the_spec_and_onnxruntime_reads_its_nms_from_there(
    retinanet_portable: tuple[Path, Path],
) -> None:
    from gfocal_pipeline.backends.registry import get_backend

    _, graph = retinanet_portable
    assert spec_beside(graph) == model_spec("retinanet")
    backend = get_backend("onnxruntime", model=str(graph))
    assert (backend.score_thr, backend.iou_thr, backend.max_per_img) == (0.05, 0.5, 100)
    assert get_backend("onnxruntime", model=str(graph), iou_thr=0.7).iou_thr == 0.7  # explicit wins


def test_torch_and_onnxruntime_agree_on_retinanet(retinanet_portable: tuple[Path, Path]) -> None:
    """The torch reference runs the adapter's module: the same candidates as the exported graph."""
    from gfocal_pipeline.backends.registry import get_backend
    from gfocal_pipeline.export import sample_inputs

    checkpoint, graph = retinanet_portable
    feeds = np.concatenate(sample_inputs(*SMALL, uint8=False))
    ort = get_backend("onnxruntime", model=str(graph), batch_size=2)
    torch_backend = get_backend("torch", model=str(checkpoint), batch_size=2, adapter="retinanet")
    torch_backend.prepare(SimpleNamespace(input_height=SMALL[0], input_width=SMALL[1], dtype="float32"))
    got, want = torch_backend.run_batch(feeds), ort.run_batch(feeds)
    assert got["scores"].shape == want["scores"].shape and got["scores"].shape[-1] == 80
    assert np.abs(got["scores"] - want["scores"]).max() < 1e-4
    assert np.abs(got["boxes"] - want["boxes"]).max() < 1e-2


def test_an_outside_adapter_registers_with_its_own_pixels_and_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`register_adapter` takes any importable package with a `spec` module; its BGR input without
    mean, its 20 classes and its input size reach the run's options and pixel format."""
    from gfocal_pipeline import adapters
    from gfocal_pipeline.pixels import pixels_of
    from gfocal_pipeline.run_config import RunConfig

    package = tmp_path / "bgr_detector"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "spec.py").write_text(
        "from gfocal_pipeline.model_spec import ModelSpec, Preprocessing\n"
        "SPEC = ModelSpec(name='bgr_detector', display_name='BGR', history_name='bgr', om_name='bgr',\n"
        "    num_classes=20, preprocessing=Preprocessing(channel_order='bgr',\n"
        "    mean=None, std=None, pad_value=114, policy='centered', height=640, width=640))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(adapters._PACKAGES, "bgr_detector", "bgr_detector")
    adapters.model_spec.cache_clear()
    try:
        spec = model_spec("bgr_detector")
        pixels = pixels_of(spec.to_dict())
        assert (pixels.channel_order, pixels.mean, pixels.std, pixels.pad_value) == ("bgr", None, None, 114)
        assert pixels.pad_bgr_u8() == (114, 114, 114) and spec.num_classes == 20
        values = {"model": "bgr_detector", "checkpoint": str(tmp_path / "w.pth"), "work_dir": str(tmp_path)}
        (tmp_path / "w.pth").write_bytes(b"")
        model = RunConfig.from_mapping(values).to_dict()
        assert (model["policy"], model["height"], model["width"]) == ("centered", 640, 640)
    finally:
        adapters.model_spec.cache_clear()
    assert pixels_of(model_spec("gfocalv2").to_dict()).pad_bgr_u8() == (104, 116, 124)


def test_gfocal_infer_runs_the_torch_reference_of_the_adapter_asked_for(
    retinanet_portable: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run directory made by `gfocal preprocess` records no model: `--adapter` picks RetinaNet's."""
    from gfocal_pipeline.demo_data import make_demo_coco

    checkpoint, _ = retinanet_portable
    coco = make_demo_coco(tmp_path / "coco", num_images=2, seed=1)
    run = tmp_path / "run"
    size = ["--height", str(SMALL[0]), "--width", str(SMALL[1])]
    assert main(["preprocess", "--coco-root", str(coco), "--run-dir", str(run), *size]) == 0
    common = ["infer", "--run-dir", str(run), "--backend", "torch", "--model", str(checkpoint)]
    assert main(common) == 2  # GFocalV2's layout: the RetinaNet checkpoint is refused, named
    assert "does not match the GFocalV2 R50-FPN layout" in capsys.readouterr().err
    assert main([*common, "--adapter", "retinanet"]) == 0
    assert main(["infer", "--run-dir", str(run), "--adapter", "retinanet"]) == 2
    assert "--adapter only applies to --backend torch" in capsys.readouterr().err


def test_the_onnx_model_needs_the_path_of_a_graph(tmp_path: Path) -> None:
    """No generated weights for a bring-your-own graph: the default checkpoint is refused, naming why."""
    from gfocal_pipeline.run_config import RunConfig
    from gfocal_pipeline.workspace import demo_paths

    for given in ({}, {"checkpoint": str(demo_paths(tmp_path)["checkpoint"])}):
        with pytest.raises(ConfigError, match=r"pass the path of the \.onnx file as 'checkpoint'"):
            RunConfig.from_mapping({"model": "onnx", "work_dir": str(tmp_path), **given})
