"""Preprocessing: seed-identical float32 bytes, uint8 variant, mmdet geometry, shards, errors, idempotency.

The reference below re-implements the ModelZoo seed (`gfocal_preprocess.py`) from its documented
steps: mmcv.imread (cv2, BGR) -> scale = min(W/w, H/h), floor sizes -> mmcv.imresize (cv2 bilinear)
-> mmcv.imnormalize(to_rgb=True) -> mmcv.impad to (H, W) with zeros -> HWC->CHW -> tofile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from gfocal_pipeline.dataset import load_coco
from gfocal_pipeline.demo_data import COCO_CATEGORIES, make_demo_coco
from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.layout import RunLayout, input_file_name
from gfocal_pipeline.manifest import load_manifest
from gfocal_pipeline.preprocess import preprocess, preprocess_image

# img_norm_cfg of gfocal_r50_fpn_1x (RGB order), as float32 arrays like the ModelZoo scripts
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
N = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo"), num_images=N, seed=0)


def mmcv_imnormalize(img: np.ndarray) -> np.ndarray:
    """mmcv.imnormalize(img, MEAN, STD, to_rgb=True) as mmcv implements it (cv2, in place)."""
    out = img.copy().astype(np.float32)
    mean = np.float64(MEAN.reshape(1, -1))
    stdinv = 1 / np.float64(STD.reshape(1, -1))
    cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    cv2.subtract(out, mean, out)
    cv2.multiply(out, stdinv, out)
    return out


def seed_bytes(path: Path, height: int, width: int) -> bytes:
    """The seed's .bin for one image, written with numpy arithmetic instead of mmcv's cv2 calls."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = math.floor(w * scale), math.floor(h * scale)
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normalized = (img[:, :, ::-1].astype(np.float32) - MEAN) / STD
    padded = np.zeros((height, width, 3), dtype=np.float32)
    padded[:new_h, :new_w] = normalized
    return padded.transpose(2, 0, 1).astype("<f4").tobytes()


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_numpy_reference_equals_mmcv_imnormalize_for_every_pixel_value() -> None:
    values = np.arange(256, dtype=np.uint8)
    img = np.stack([values, np.roll(values, 85), np.roll(values, 170)], axis=-1)[None]
    expected = (img[:, :, ::-1].astype(np.float32) - MEAN) / STD
    assert np.array_equal(mmcv_imnormalize(img), expected)


@pytest.mark.parametrize(("height", "width", "count"), [(800, 1216, 6), (256, 320, N)])
def test_float32_letterbox_is_byte_identical_to_the_seed(
    demo: Path, tmp_path: Path, height: int, width: int, count: int
) -> None:
    manifest = preprocess(demo, tmp_path, height=height, width=width, max_images=count, workers=2)
    layout = RunLayout.at(tmp_path)
    images = load_coco(demo, max_images=count).images
    assert any(im.height > im.width for im in images), "portrait images are covered"
    assert manifest.layout == "NCHW" and manifest.bytes_per_image == 3 * height * width * 4
    for image, entry in zip(images, manifest.images, strict=True):
        path = layout.input_shard(entry.shard) / input_file_name(image.image_id)
        assert path.stat().st_size == 3 * height * width * 4
        assert path.read_bytes() == seed_bytes(image.path, height, width), image.file_name
        scale = min(width / image.width, height / image.height)
        new_w, new_h = math.floor(image.width * scale), math.floor(image.height * scale)
        geometry = entry.geometry
        assert (entry.image_id, geometry.width, geometry.height) == (
            image.image_id,
            image.width,
            image.height,
        )
        assert geometry.scale_x == geometry.scale_y == scale
        assert (geometry.resized_width, geometry.resized_height) == (new_w, new_h)
        assert geometry.pad == (0, 0, width - new_w, height - new_h)
    if (height, width) == (800, 1216):
        assert path.stat().st_size == 11_673_600


def test_uint8_is_the_bgr_image_that_normalizes_to_the_float32_input(demo: Path, tmp_path: Path) -> None:
    h, w = 256, 320
    f32 = preprocess(demo, tmp_path / "f32", height=h, width=w, workers=1)
    u8 = preprocess(demo, tmp_path / "u8", dtype="uint8", height=h, width=w, workers=1)
    assert u8.layout == "NHWC" and u8.input_shape() == (1, h, w, 3)
    assert [e.image_id for e in u8.images] == [e.image_id for e in f32.images]
    pad_bgr = np.rint(MEAN[::-1]).astype(np.uint8)
    for a, b in zip(f32.images, u8.images, strict=True):
        assert a == b  # same geometry
        name = input_file_name(a.image_id)
        raw = (tmp_path / "u8" / "inputs" / b.shard / name).read_bytes()
        assert len(raw) == 3 * h * w
        img = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        ref = np.fromfile(tmp_path / "f32" / "inputs" / a.shard / name, "<f4").reshape(3, h, w)
        rh, rw = a.geometry.resized_height, a.geometry.resized_width
        normalized = ((img[:, :, ::-1].astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
        np.testing.assert_allclose(normalized[:, :rh, :rw], ref[:, :rh, :rw], rtol=0, atol=1e-5)
        pad = np.concatenate([img[rh:].reshape(-1, 3), img[:, rw:].reshape(-1, 3)])
        assert pad.size and (pad == pad_bgr).all()
        outside = np.ones((h, w), bool)
        outside[:rh, :rw] = False
        assert np.abs(normalized[:, outside]).max() < 0.01  # the padding normalizes to ~0

    full = preprocess(demo, tmp_path / "full", dtype="uint8", max_images=1, workers=1)
    entry = full.images[0]
    assert (tmp_path / "full" / "inputs" / entry.shard / input_file_name(entry.image_id)).stat().st_size == (
        2_918_400
    )


@pytest.mark.parametrize(
    ("w", "h"), [(640, 480), (480, 640), (500, 375), (333, 500), (1333, 800), (2000, 500), (100, 100)]
)
def test_mmdet_geometry_follows_the_official_rescale(w: int, h: int) -> None:
    rng = np.random.default_rng(w * h)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    array, geometry = preprocess_image(img, "mmdet", "uint8", 1344, 1344)
    factor = min(1333 / max(w, h), 800 / min(w, h))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    assert max(new_w, new_h) <= 1333 and min(new_w, new_h) <= 800
    assert (geometry.resized_width, geometry.resized_height) == (new_w, new_h)
    assert (geometry.scale_x, geometry.scale_y) == (new_w / w, new_h / h)
    assert geometry.pad == (0, 0, 1344 - new_w, 1344 - new_h)
    assert array.shape == (1344, 1344, 3)
    np.testing.assert_array_equal(array[:new_h, :new_w], cv2.resize(img, (new_w, new_h)))
    assert (array[new_h:] == [104, 116, 124]).all() and (array[:, new_w:] == [104, 116, 124]).all()

    floats, same = preprocess_image(img, "mmdet", "float32", 1344, 1344)
    assert same == geometry and floats.shape == (3, 1344, 1344)
    assert not floats[:, new_h:].any() and not floats[:, :, new_w:].any()


def test_mmdet_needs_a_canvas_that_holds_the_padded_image() -> None:
    portrait = np.zeros((640, 480, 3), np.uint8)  # -> 800x1067, padded to 800x1088 (w x h)
    with pytest.raises(DatasetError, match=r"height 1088 and width 800.*height>=1088"):
        preprocess_image(portrait, "mmdet", "float32", 800, 1216)
    _, geometry = preprocess_image(portrait, "mmdet", "uint8", 1088, 800)
    assert (geometry.resized_width, geometry.resized_height) == (800, 1067)


def test_mmdet_set_that_does_not_fit_fails_before_any_work(demo: Path, tmp_path: Path) -> None:
    need_h = need_w = 0
    for image in load_coco(demo).images:
        factor = min(1333 / max(image.width, image.height), 800 / min(image.width, image.height))
        need_w = max(need_w, math.ceil(int(image.width * factor + 0.5) / 32) * 32)
        need_h = max(need_h, math.ceil(int(image.height * factor + 0.5) / 32) * 32)
    with pytest.raises(DatasetError, match=f"height={need_h} width={need_w}"):
        preprocess(demo, tmp_path, policy="mmdet")
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "inputs").exists()


def test_mmdet_run_records_official_scales(demo: Path, tmp_path: Path) -> None:
    manifest = preprocess(
        demo, tmp_path, policy="mmdet", dtype="uint8", height=1344, width=1344, max_images=4
    )
    for image, entry in zip(load_coco(demo, max_images=4).images, manifest.images, strict=True):
        factor = min(1333 / max(image.width, image.height), 800 / min(image.width, image.height))
        new_w, new_h = int(image.width * factor + 0.5), int(image.height * factor + 0.5)
        assert (entry.geometry.scale_x, entry.geometry.scale_y) == (new_w / image.width, new_h / image.height)
        raw = np.fromfile(tmp_path / "inputs" / entry.shard / input_file_name(entry.image_id), np.uint8)
        resized = cv2.resize(cv2.imread(str(image.path)), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(raw.reshape(1344, 1344, 3)[:new_h, :new_w], resized)


def test_shards_manifest_round_trip_and_identical_reruns(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="gfocal_pipeline.preprocess"):
        manifest = preprocess(demo, run, height=64, width=96, shard_size=5, workers=2)
    assert f"{N}/{N} images" in caplog.text

    ids = [image.image_id for image in load_coco(demo).images]
    assert list(manifest.shards) == ["00000", "00001", "00002", "00003"]
    assert [len(v) for v in manifest.shards.values()] == [5, 5, 5, 1]
    assert [i for shard in manifest.shards.values() for i in shard] == ids
    assert [e.image_id for e in manifest.images] == ids
    expected_files = set()
    for shard, members in manifest.shards.items():
        for image_id in members:
            assert manifest.by_id()[image_id].shard == shard
            expected_files.add(f"inputs/{shard}/{input_file_name(image_id)}")
    first = digest_tree(run)
    assert set(first) == expected_files | {"manifest.json"}

    loaded = load_manifest(run / "manifest.json")
    assert loaded.to_dict() == manifest.to_dict()
    assert loaded.sha256 == manifest.sha256
    assert json.loads((run / "manifest.json").read_text())["coco_root"] == str(demo)

    preprocess(demo, run, height=64, width=96, shard_size=5, workers=1)
    assert digest_tree(run) == first
    preprocess(demo, run, height=64, width=96, shard_size=3, max_images=7, workers=1)
    assert len(list((run / "inputs").rglob("*.bin"))) == 7
    preprocess(demo, run, height=64, width=96, shard_size=5, workers=2)
    assert digest_tree(run) == first


# --------------------------------------------------------------------------------------------------
# Byte identity with a straightforward reference, on awkward images (odd sizes, grayscale, PNG, 1x1)


def write_coco(root: Path, files: dict[str, bytes]) -> Path:
    """A COCO root holding `files` (name -> encoded bytes), their real sizes in the annotation file."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id, (name, data) in enumerate(files.items(), start=1):
        (root / "val2017" / name).write_bytes(data)
        h, w = cv2.imread(str(root / "val2017" / name), cv2.IMREAD_COLOR).shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    categories = [{"id": i, "name": name, "supercategory": sup} for i, name, sup in COCO_CATEGORIES]
    document = {"images": images, "annotations": [], "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    return root


def encoded(ext: str, img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, img)
    assert ok
    return data.tobytes()


def odd_images() -> dict[str, bytes]:
    """Sizes and kinds chosen so consecutive images cover more, then less, of the canvas."""
    rng = np.random.default_rng(7)

    def pic(h: int, w: int, channels: int = 3) -> np.ndarray:
        return rng.integers(0, 256, size=(h, w, channels)[: 2 if channels == 1 else 3], dtype=np.uint8)

    return {
        "a_landscape.jpg": encoded(".jpg", pic(480, 640)),
        "b_portrait_odd.jpg": encoded(".jpg", pic(333, 101)),
        "c_one_pixel.jpg": encoded(".jpg", pic(1, 1)),
        "d_gray.jpg": encoded(".jpg", pic(97, 131, 1)),
        "e_wide.png": encoded(".png", pic(7, 300)),
        "f_png_named_jpg.jpg": encoded(".png", pic(211, 157)),
        "g_gray16.png": encoded(".png", rng.integers(0, 65536, size=(45, 29), dtype=np.uint16)),
        "h_one_pixel.png": encoded(".png", pic(1, 1)),
        "i_tall.jpg": encoded(".jpg", pic(500, 33)),
        "j_square.jpg": encoded(".jpg", pic(64, 64)),
    }


def reference_input(path: Path, policy: str, dtype: str, height: int, width: int) -> bytes:
    """The documented recipe step by step: decode (cv2, BGR), size, bilinear resize, (BGR->RGB,
    (x - mean) / std in float32, zero padding, HWC->CHW) or (uint8 BGR, padding round(mean))."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    if policy == "letterbox":
        scale = min(width / w, height / h)
        new_w, new_h = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    else:
        factor = min(1333 / max(w, h), 800 / min(w, h))
        new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if dtype == "float32":
        padded = np.zeros((height, width, 3), dtype=np.float32)
        padded[:new_h, :new_w] = (resized[:, :, ::-1].astype(np.float32) - MEAN) / STD
        return padded.transpose(2, 0, 1).astype("<f4").tobytes()
    padded = np.empty((height, width, 3), dtype=np.uint8)
    padded[:, :] = np.rint(MEAN[::-1]).astype(np.uint8)
    padded[:new_h, :new_w] = resized
    return padded.tobytes()


@pytest.fixture(scope="module")
def odd_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco(tmp_path_factory.mktemp("odd"), odd_images())


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@pytest.mark.parametrize(("policy", "height", "width"), [("letterbox", 96, 160), ("mmdet", 1344, 1344)])
@pytest.mark.parametrize("workers", [1, 2])
def test_inputs_are_byte_identical_to_a_straightforward_reference(
    odd_coco: Path, tmp_path: Path, policy: str, dtype: str, height: int, width: int, workers: int
) -> None:
    """One worker reuses one canvas across every size in turn: its padding must be reset exactly."""
    manifest = preprocess(odd_coco, tmp_path, policy, dtype, height, width, shard_size=4, workers=workers)
    assert len(manifest.images) == len(odd_images()) and not manifest.skipped
    for entry in manifest.images:
        source = odd_coco / "val2017" / entry.file_name
        written = (manifest.input_dir(entry.shard) / input_file_name(entry.image_id)).read_bytes()
        assert written == reference_input(source, policy, dtype, height, width), entry.file_name
        array, geometry = preprocess_image(cv2.imread(str(source)), policy, dtype, height, width)
        assert array.tobytes() == written and geometry == entry.geometry


def test_float32_of_the_default_size_is_byte_identical_on_mixed_sizes(demo: Path, tmp_path: Path) -> None:
    manifest = preprocess(demo, tmp_path, max_images=8, workers=1)
    for entry in manifest.images:
        written = (manifest.input_dir(entry.shard) / input_file_name(entry.image_id)).read_bytes()
        assert written == reference_input(
            demo / "val2017" / entry.file_name, "letterbox", "float32", 800, 1216
        )


@pytest.fixture
def corrupt(demo: Path, tmp_path: Path) -> tuple[Path, int, str]:
    root = tmp_path / "coco"
    shutil.copytree(demo, root)
    victim = load_coco(root).images[6]
    victim.path.write_bytes(b"this is not a JPEG")
    return root, victim.image_id, victim.file_name


def test_corrupt_image_is_named(corrupt: tuple[Path, int, str], tmp_path: Path) -> None:
    root, _, file_name = corrupt
    with pytest.raises(DatasetError, match="skip_bad_images") as err:
        preprocess(root, tmp_path / "run", height=64, width=96, workers=2)
    assert file_name in str(err.value)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_skip_bad_images_records_and_excludes_them(corrupt: tuple[Path, int, str], tmp_path: Path) -> None:
    root, bad_id, file_name = corrupt
    manifest = preprocess(root, tmp_path / "run", height=64, width=96, shard_size=4, skip_bad_images=True)
    assert [(s["image_id"], s["file_name"]) for s in manifest.skipped] == [(bad_id, file_name)]
    assert "decode" in manifest.skipped[0]["reason"]
    ids = [image.image_id for image in load_coco(root).images if image.image_id != bad_id]
    assert [e.image_id for e in manifest.images] == ids
    assert [i for members in manifest.shards.values() for i in members] == ids
    assert [len(v) for v in manifest.shards.values()] == [4, 4, 4, 3]
    assert load_manifest(tmp_path / "run" / "manifest.json").skipped == manifest.skipped
    assert not list((tmp_path / "run").rglob(input_file_name(bad_id)))


def test_worker_errors_reach_the_caller(tmp_path: Path) -> None:
    """The annotation claims landscape, the file is portrait: mmdet's check fails inside a worker."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id, (w, h) in ((1, (640, 480)), (2, (480, 640))):
        cv2.imwrite(str(root / "val2017" / f"{image_id:012d}.jpg"), np.full((h, w, 3), 90, np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480})
    categories = [{"id": i, "name": name, "supercategory": sup} for i, name, sup in COCO_CATEGORIES]
    data = {"images": images, "annotations": [], "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"000000000002\.jpg.*height>=1088"):
        preprocess(root, tmp_path / "run", policy="mmdet", dtype="uint8", height=800, width=1344, workers=2)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"shard_size": 0}, "shard_size"),
        ({"shard_size": -2}, "shard_size"),
        ({"policy": "stretch"}, "policy"),
        ({"dtype": "float16"}, "dtype"),
        ({"workers": 0}, "workers"),
        ({"height": 0}, "height"),
    ],
)
def test_bad_options(demo: Path, tmp_path: Path, option: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        preprocess(demo, tmp_path, **option)
    assert not (tmp_path / "inputs").exists()


def test_dataset_errors_surface_through_preprocess(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        preprocess(tmp_path / "missing", tmp_path / "run")


def test_preprocess_image_rejects_non_images() -> None:
    with pytest.raises(DatasetError, match="uint8 BGR image"):
        preprocess_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(DatasetError, match="uint8 BGR image"):
        preprocess_image(np.zeros((10, 10), np.uint8))
