"""Models whose pixels are not GFocalV2's: BGR input without mean/std (YOLOX's convention), a
normalized BGR format (caffe-style), padding with 114, the image centred in the canvas.

Each path that turns an image into the network's input is checked against this file's own numpy
arithmetic: host preprocessing (float32 and uint8 with its padding colour), the emulated AIPP that
atc puts in front of an OM, the exported graph's in-graph normalization and the torch reference's. Then
a "colour probe" graph, built here without the project's exporter, goes through both DAGs: it finds the
one object of each picture only when channel order, normalization, padding value and centring are all
as its declaration says, so a run scores AP > 0 only when the whole path followed the declaration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from support import both_dags, xcoms
from torch import nn

from gfocal_pipeline.backends.aipp import aipp_config
from gfocal_pipeline.backends.torch_backend import NormalizedInput
from gfocal_pipeline.coco_classes import COCO_CATEGORIES
from gfocal_pipeline.demo_data import demo_image
from gfocal_pipeline.nets.layers import InputNormalization
from gfocal_pipeline.pixels import DEFAULT_PIXELS, PixelFormat
from gfocal_pipeline.preprocess import preprocess_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulators" / "pylib"))
from gfocal_emulator import aipp as emulated_aipp

YOLOX_LIKE = PixelFormat(channel_order="bgr", mean=None, std=None, pad_value=114.0)
CAFFE_LIKE = PixelFormat(channel_order="bgr", mean=(103.53, 116.28, 123.675), std=(1.0, 1.0, 1.0))
FORMATS = {"imagenet_rgb": DEFAULT_PIXELS, "yolox_like": YOLOX_LIKE, "caffe_like": CAFFE_LIKE}
H, W = 64, 96


def own_network_input(
    img_bgr: np.ndarray, pixels: PixelFormat, centered: bool, size: tuple[int, int] = (H, W)
) -> np.ndarray:
    """The expected float (3, H, W) input, computed here: letterbox scale with floored sizes, bilinear
    resize, the network's channel order, (x - mean) / std in float64, pad value outside the picture."""
    H, W = size
    h, w = img_bgr.shape[:2]
    scale = min(W / w, H / h)
    new_w, new_h = max(1, int(np.floor(w * scale))), max(1, int(np.floor(h * scale)))
    resized = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    if pixels.channel_order == "rgb":
        resized = resized[..., ::-1]
    mean = np.array(pixels.mean if pixels.mean is not None else (0, 0, 0), np.float64)
    std = np.array(pixels.std if pixels.std is not None else (1, 1, 1), np.float64)
    out = np.full((3, H, W), pixels.pad_value, np.float64)
    left, top = ((W - new_w) // 2, (H - new_h) // 2) if centered else (0, 0)
    out[:, top : top + new_h, left : left + new_w] = ((resized - mean) / std).transpose(2, 0, 1)
    return out


def own_raw_padding(pixels: PixelFormat) -> np.ndarray:
    """The uint8 BGR colour of a padded pixel: the raw value that normalizes to the pad value."""
    mean = np.array(pixels.mean if pixels.mean is not None else (0, 0, 0), np.float64)
    std = np.array(pixels.std if pixels.std is not None else (1, 1, 1), np.float64)
    network_order = np.clip(np.round(pixels.pad_value * std + mean), 0, 255)
    return network_order[::-1] if pixels.channel_order == "rgb" else network_order


@pytest.mark.parametrize("centered", [False, True], ids=["letterbox", "centered"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_host_preprocessing_follows_the_pixel_format(name: str, centered: bool) -> None:
    pixels = FORMATS[name]
    policy = "centered" if centered else "letterbox"
    for seed, (w, h) in enumerate([(120, 70), (50, 90)]):
        img = demo_image(seed, width=w, height=h)
        expected = own_network_input(img, pixels, centered)
        got, geometry = preprocess_image(img, policy, "float32", H, W, pixels)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        raw, _ = preprocess_image(img, policy, "uint8", H, W, pixels)
        left, top = geometry.pad[0], geometry.pad[1]
        new_h, new_w = geometry.resized_height, geometry.resized_width
        assert (left > 0 or top > 0) == centered
        inside = raw[top : top + new_h, left : left + new_w]
        assert np.array_equal(inside, cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR))
        outside = np.ones((H, W), bool)
        outside[top : top + new_h, left : left + new_w] = False
        assert np.array_equal(raw[outside], np.broadcast_to(own_raw_padding(pixels), (outside.sum(), 3)))


@pytest.mark.parametrize("name", list(FORMATS))
def test_aipp_turns_uint8_inputs_into_the_networks_input(name: str) -> None:
    """atc's AIPP (as the emulator applies it: swap, then (x - mean - min) * var_reci in fp16) on the
    uint8 input gives the float32 host preprocessing, the padding included."""
    pixels = FORMATS[name]
    img = demo_image(3, width=90, height=40)
    raw, geometry = preprocess_image(img, "centered", "uint8", H, W, pixels)
    on_npu = emulated_aipp.apply(raw[None], emulated_aipp.parse(aipp_config(W, H, pixels)), H, W)[0]
    on_host, _ = preprocess_image(img, "centered", "float32", H, W, pixels)
    top = geometry.pad[1]
    assert top > 0 and geometry.resized_width == W  # padding above and below the picture
    picture = np.s_[:, top : top + geometry.resized_height, :]
    tolerance = 2e-3 * max(1.0, float(np.abs(on_host[picture]).max()))  # fp16 var_reci / min_chn
    np.testing.assert_allclose(on_npu[picture], on_host[picture], atol=tolerance)
    # the padding: the rounded raw colour, so within half a grey level (/ std) of the pad value
    half_level = 0.5 / min(pixels.network_std()) + tolerance
    assert np.abs(on_npu[:, :top, :] - pixels.pad_value).max() <= half_level


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_graph_and_the_torch_reference_normalize_uint8_like_the_host(name: str) -> None:
    pixels = FORMATS[name]
    img = demo_image(5, width=70, height=110)
    raw, geometry = preprocess_image(img, "letterbox", "uint8", H, W, pixels)
    on_host, _ = preprocess_image(img, "letterbox", "float32", H, W, pixels)
    module = InputNormalization(pixels.mean, pixels.std, True, pixels.channel_order)
    in_graph = module.normalize(torch.from_numpy(raw[None]))[0].numpy()
    picture = np.s_[:, : geometry.resized_height, : geometry.resized_width]  # at the top-left
    np.testing.assert_allclose(in_graph[picture], on_host[picture], atol=1e-4)

    class Echo(InputNormalization):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    echoed = NormalizedInput(Echo(pixels.mean, pixels.std, False, pixels.channel_order))
    np.testing.assert_allclose(echoed(torch.from_numpy(raw[None]))[0].numpy(), in_graph, atol=0)


# --- a colour probe through both DAGs ---------------------------------------------------------------

PROBE_H, PROBE_W = 128, 160
OBJECT_BGR = (40, 160, 220)  # the object's colour as cv2 writes it
BACKGROUND_BGR = (20, 60, 100)
SIZES = [(320, 240), (300, 200), (240, 320), (200, 300)]  # (w, h): centring pads top or left


class ColourProbe(nn.Module):
    """dets: one row, the box of the pixels whose network-input value is `target` (+-0.5 per channel),
    score 0.9 when some are and the top-left input pixel holds `pad` (centred padding), else 0."""

    def __init__(self, target: tuple[float, float, float], pad: float) -> None:
        super().__init__()
        self.register_buffer("target", torch.tensor(target, dtype=torch.float32).view(1, 3, 1, 1))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ((x - self.target).abs().amax(dim=1) <= 0.5).float()  # (N, H, W)
        cols, rows = mask.amax(dim=1), mask.amax(dim=2)
        col_ids = torch.arange(x.shape[3], dtype=torch.float32).view(1, -1)
        row_ids = torch.arange(x.shape[2], dtype=torch.float32).view(1, -1)
        x1 = (col_ids + (1 - cols) * 1e4).amin(dim=1)
        x2 = (col_ids * cols).amax(dim=1) + 1
        y1 = (row_ids + (1 - rows) * 1e4).amin(dim=1)
        y2 = (row_ids * rows).amax(dim=1) + 1
        padded = ((x[:, :, 0, 0] - self.pad).abs().amax(dim=1) <= 0.5).float()
        score = 0.9 * cols.amax(dim=1) * padded
        dets = torch.stack([x1, y1, x2, y2, score], dim=1).unsqueeze(1)
        return dets, torch.zeros_like(score, dtype=torch.int64).view(-1, 1)


def _object_box(width: int, height: int) -> list[int]:
    return [width // 4, height // 3, width // 4 + width // 2, height // 3 + height // 2]


COCO_PERSON = [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]
WIDGETS = [{"id": 3, "name": "gadget"}, {"id": 7, "name": " Widget"}]  # the object is a widget


def write_probe_dataset(root: Path, categories: list[dict] = COCO_PERSON, category: int = 1) -> Path:
    """Pictures of one object (a solid rectangle of category id `category`) on a plain background."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        picture = np.empty((height, width, 3), np.uint8)
        picture[...] = BACKGROUND_BGR
        x1, y1, x2, y2 = _object_box(width, height)
        picture[y1:y2, x1:x2] = OBJECT_BGR
        name = f"{image_id:012d}.png"
        cv2.imwrite(str(root / "val2017" / name), picture)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        box = [x1, y1, x2 - x1, y2 - y1]
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": category,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def write_probe(path: Path, declared: dict) -> Path:
    """The probe for YOLOX-like pixels (BGR, no mean/std, pad 114), with `declared` as its declaration."""
    probe = ColourProbe(tuple(float(v) for v in OBJECT_BGR), YOLOX_LIKE.pad_value)
    torch.onnx.export(
        probe.eval(),
        (torch.zeros(1, 3, PROBE_H, PROBE_W),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["dets", "labels"],
        dynamic_axes={name: {0: "batch"} for name in ("images", "dets", "labels")},
    )
    path.with_suffix(".spec.yaml").write_text(yaml.safe_dump(declared))
    return path


def probe_declaration(name: str, classes: list[str] | None = None, **preprocessing: object) -> dict:
    yolox_like = {"channel_order": "bgr", "mean": None, "std": None, "pad_value": 114.0, "policy": "centered"}
    return {
        "name": name,
        "outputs": "dets",
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32"},
        "preprocessing": {**yolox_like, "height": PROBE_H, "width": PROBE_W, **preprocessing},
        "postprocess": {"score_thr": 0.05, "nms_iou": 0.65, "max_per_img": 100},
        **({"classes": classes} if classes else {}),
    }


def test_the_probe_finds_the_object_only_in_its_own_pixel_format() -> None:
    """The probe tells the formats apart (so the DAG runs below can fail): run here on this file's
    own network input of a probe picture, with the right and with wrong pixel formats."""
    probe = ColourProbe(tuple(float(v) for v in OBJECT_BGR), 114.0)
    picture = np.empty((240, 320, 3), np.uint8)
    picture[...] = BACKGROUND_BGR
    picture[80:200, 80:240] = OBJECT_BGR
    scores = {}
    for label, pixels, centered in [
        ("right", YOLOX_LIKE, True),
        ("rgb", PixelFormat("rgb", None, None, 114.0), True),
        ("normalized", PixelFormat("bgr", pad_value=114.0), True),
        ("pad 0", PixelFormat("bgr", None, None, 0.0), True),
        ("top-left", YOLOX_LIKE, False),
    ]:
        x = own_network_input(picture, pixels, centered, (PROBE_H, PROBE_W))
        dets, _ = probe(torch.from_numpy(x[None].astype(np.float32)))
        scores[label] = float(dets[0, 0, 4])
        if label == "right":  # scale 0.5, centred: 4 rows of padding above the picture
            assert dets[0, 0, :4].tolist() == [40.0, 44.0, 120.0, 104.0]
    assert scores == {
        "right": pytest.approx(0.9),
        "rgb": 0.0,
        "normalized": 0.0,
        "pad 0": 0.0,
        "top-left": 0.0,
    }


@pytest.fixture(scope="module")
def probe_runs(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    coco = write_probe_dataset(root / "coco")
    right = write_probe(root / "probe.onnx", probe_declaration("probe_bgr"))
    wrong = write_probe(root / "probe_rgb.onnx", probe_declaration("probe_rgb", channel_order="rgb"))
    named = write_probe(root / "probe_widget.onnx", probe_declaration("probe_widget", ["widget"]))
    widgets = write_probe_dataset(root / "widgets", WIDGETS, category=7)
    work = tmp_path_factory.mktemp("work")
    values: dict = {}
    with both_dags(tmp_path_factory.mktemp("cann")) as (embedded, nightly, toolkit):
        for label, graph, data in (("right", right, coco), ("wrong", wrong, coco), ("named", named, widgets)):
            conf = {"model": "onnx", "checkpoint": str(graph), "coco_root": str(data), "work_dir": str(work)}
            conf.update(height=PROBE_H, width=PROBE_W, policy="centered")
            first = embedded.test(run_conf=conf)
            assert first.state == "success", label
            values[label] = {
                "embedded": xcoms(embedded.dag_id, first.run_id),
                "manifest": xcoms(embedded.dag_id, first.run_id, key="manifest"),
            }
        # float32: the reference (ONNX Runtime on the same float graph) and the OM share the run's
        # inputs; AIPP's uint8 path for this format is checked above against the emulator
        nightly_conf = {**conf, "checkpoint": str(right), "coco_root": str(coco), "outfmt": "TXT"}
        second = nightly.test(run_conf={**nightly_conf, "cann_set_env": str(toolkit.set_env)})
        assert second.state == "success"
        values["right"]["nightly"] = xcoms(nightly.dag_id, second.run_id)
    return values


@pytest.mark.airflow
@pytest.mark.slow
def test_both_dags_follow_a_declared_bgr_unnormalized_centred_format(probe_runs: dict) -> None:
    right = probe_runs["right"]
    ap = right["embedded"]["evaluate"]["stats"]["AP"]
    # every object found; its box within a pixel of the truth after undoing the centring and scale
    assert ap > 0.7
    assert right["manifest"]["preprocess"]["pixels"] == "BGR, no normalization, pad 114"
    # the nightly: the same inputs through atc and msame on the emulated NPU
    summary = right["nightly"]["summary"]
    assert summary["AP_reference"] == pytest.approx(ap, abs=1e-9)
    assert summary["AP_npu"] == pytest.approx(ap, abs=1e-3)
    # the OM's convert.json carries the model spec the run converted (pixels included)
    converted = Path(right["nightly"]["prepare"]["run_dir"]) / "model" / "convert.json"
    recorded = json.loads(converted.read_text())["model"]
    assert recorded["history_name"] == "probe_bgr" and recorded["preprocessing"]["pad_value"] == 114
    # the same graph declared RGB: its pixels are not the ones it looks for, nothing is found
    assert probe_runs["wrong"]["embedded"]["evaluate"]["stats"]["AP"] == 0.0


@pytest.mark.airflow
@pytest.mark.slow
def test_a_graph_of_named_classes_scores_under_those_categories(probe_runs: dict) -> None:
    """One class named "widget" on a file of two categories (gadget id 3, " Widget" id 7): label 0 is
    scored as category 7, so the AP is the one of the same boxes on the COCO-labelled pictures."""
    named = probe_runs["named"]["embedded"]["evaluate"]
    assert named["stats"]["AP"] == pytest.approx(probe_runs["right"]["embedded"]["evaluate"]["stats"]["AP"])
    detections = json.loads(Path(named["detections_path"]).read_text())
    assert {row["category_id"] for row in detections} == {7}
