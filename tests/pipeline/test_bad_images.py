"""Image files preprocessing must refuse (truncated JPEG/PNG, a header claiming more pixels than the
budget, OpenCV's own refusals), files it must accept (grayscale, CMYK, EXIF-rotated, PNG named .jpg,
1x1, bytes after the EOI), and model sizes that are not multiples of 32."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import image_claiming

from gfocal_pipeline import steps
from gfocal_pipeline.demo_data import COCO_CATEGORIES
from gfocal_pipeline.errors import DatasetError
from gfocal_pipeline.layout import input_file_name
from gfocal_pipeline.manifest import load_manifest
from gfocal_pipeline.preprocess import (
    header_size,
    materialize_shard,
    preprocess,
    preprocess_image,
    read_image,
)

RNG = np.random.default_rng(3)


def jpeg(h: int = 48, w: int = 64, channels: int = 3, progressive: bool = False) -> bytes:
    shape = (h, w) if channels == 1 else (h, w, channels)
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, data = cv2.imencode(".jpg", RNG.integers(0, 256, size=shape, dtype=np.uint8), flags)
    assert ok
    return data.tobytes()


def png(h: int = 48, w: int = 64) -> bytes:
    ok, data = cv2.imencode(".png", RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    assert ok
    return data.tobytes()


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def with_exif(data: bytes, orientation: int = 6, thumbnail: bytes = b"") -> bytes:
    """`data` with an APP1 EXIF segment (orientation tag, then `thumbnail` bytes) after the SOI."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    return data[:2] + segment(0xE1, b"Exif\x00\x00" + tiff + thumbnail) + data[2:]


def _huffman_codes(bits: list[int], values: list[int]) -> dict[int, tuple[int, int]]:
    """Canonical JPEG Huffman codes: symbol -> (code, length)."""
    codes, code, index = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[index]] = (code, length)
            code, index = code + 1, index + 1
        code <<= 1
    return codes


def cmyk_jpeg(colours: list[tuple[int, int, int, int]]) -> bytes:
    """A baseline 4-component (Adobe CMYK) JPEG, 8 pixels high, one flat 8x8 block per colour."""
    dc_bits, dc_values = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], list(range(12))
    ac_bits, ac_values = [1] + [0] * 15, [0x00]  # only the end-of-block symbol
    dc_codes, eob = _huffman_codes(dc_bits, dc_values), _huffman_codes(ac_bits, ac_values)[0x00]
    bits: list[int] = []

    def put(code: int, length: int) -> None:
        bits.extend((code >> shift) & 1 for shift in range(length - 1, -1, -1))

    previous = [0, 0, 0, 0]
    for colour in colours:
        for component, value in enumerate(colour):
            dc = 8 * (value - 128)  # flat block, quantizer 1
            diff, previous[component] = dc - previous[component], dc
            size = abs(diff).bit_length()
            put(*dc_codes[size])
            if size:
                put(diff if diff > 0 else diff + (1 << size) - 1, size)
            put(*eob)
    bits.extend([1] * (-len(bits) % 8))
    scan = bytearray()
    for start in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[start : start + 8])), 2)
        scan += bytes([byte, 0x00]) if byte == 0xFF else bytes([byte])
    components = b"".join(bytes([i, 0x11, 0]) for i in range(1, 5))
    return b"".join(
        [
            b"\xff\xd8",
            segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)),  # transform 0: CMYK
            segment(0xDB, b"\x00" + bytes([1] * 64)),
            segment(0xC0, struct.pack(">BHHB", 8, 8, 8 * len(colours), 4) + components),
            segment(0xC4, b"\x00" + bytes(dc_bits + dc_values)),
            segment(0xC4, b"\x10" + bytes(ac_bits + ac_values)),
            segment(0xDA, b"\x04" + b"".join(bytes([i, 0x00]) for i in range(1, 5)) + b"\x00\x3f\x00"),
            bytes(scan),
            b"\xff\xd9",
        ]
    )


def coco(root: Path, files: dict[str, bytes]) -> Path:
    """A COCO root holding `files`, listed as 64x48 (preprocessing uses, and warns about, the real size)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id, (name, data) in enumerate(files.items(), start=1):
        (root / "val2017" / name).write_bytes(data)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
    categories = [{"id": i, "name": name, "supercategory": sup} for i, name, sup in COCO_CATEGORIES]
    document = {"images": images, "annotations": [], "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    return root


# --------------------------------------------------------------------------------------------------
# truncated files


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (jpeg()[: len(jpeg()) // 2], "truncated JPEG"),
        (jpeg()[:-2], "truncated JPEG"),  # only the EOI marker missing
        (jpeg()[:-1], "truncated JPEG"),
        (jpeg(progressive=True)[:-700], "truncated JPEG"),  # cut in a later scan
        (with_exif(jpeg(), thumbnail=jpeg(8, 8))[:-300], "truncated JPEG"),  # the thumbnail has its EOI
        (with_exif(jpeg(), thumbnail=jpeg(8, 8))[:60], "truncated JPEG"),  # cut inside the EXIF segment
        (png()[:-12], "truncated PNG"),  # no IEND chunk
        (png()[: len(png()) // 2], "truncated PNG"),
        (b"", "cannot decode"),
        (b"this is not an image", "cannot decode"),
    ],
)
def test_read_image_reports_truncated_and_undecodable_files(tmp_path: Path, data: bytes, kind: str) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    img, reason = read_image(path)
    assert img is None and kind in reason


def test_opencv_alone_would_accept_a_truncated_jpeg(tmp_path: Path) -> None:
    """Why the marker check exists: OpenCV decodes half a JPEG (libjpeg only warns on stderr)."""
    path = tmp_path / "half.jpg"
    path.write_bytes(jpeg(64, 64)[:-400])
    assert cv2.imread(str(path), cv2.IMREAD_COLOR) is not None
    assert read_image(path)[0] is None


@pytest.mark.parametrize("skip", [False, True])
def test_truncated_images_are_named_or_skipped(tmp_path: Path, skip: bool) -> None:
    files = {
        "a.jpg": jpeg(),
        "b_cut.jpg": jpeg()[:-200],
        "c.jpg": jpeg(),
        "d_cut.png": png()[:-12],
    }
    root = coco(tmp_path / "coco", files)
    run = tmp_path / "run"
    if not skip:
        with pytest.raises(DatasetError, match="skip_bad_images") as err:
            preprocess(root, run, height=64, width=96, workers=2)
        message = str(err.value)
        assert "2 image(s)" in message and "b_cut.jpg (truncated JPEG" in message
        assert "d_cut.png (truncated PNG" in message
        assert not (run / "manifest.json").exists()
        return
    manifest = preprocess(root, run, height=64, width=96, workers=2, skip_bad_images=True)
    assert [e.file_name for e in manifest.images] == ["a.jpg", "c.jpg"]
    skipped = {s["file_name"]: s["reason"] for s in load_manifest(run / "manifest.json").skipped}
    assert set(skipped) == {"b_cut.jpg", "d_cut.png"}
    assert "0xFFD9" in skipped["b_cut.jpg"] and "IEND" in skipped["d_cut.png"]
    # ... and the run's summary names them too (summary.json and the printed table)
    summary = steps.summary_step(run, {})
    assert summary["skipped"]["count"] == 2
    assert {s["file_name"] for s in summary["skipped"]["images"]} == {"b_cut.jpg", "d_cut.png"}
    assert "b_cut.jpg: truncated JPEG" in steps.format_summary(summary)
    assert json.loads((run / "summary.json").read_text())["skipped"] == summary["skipped"]


# --------------------------------------------------------------------------------------------------
# the pixel budget: checked from the header, before decoding


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_header_size_reads_what_the_header_claims(ext: str) -> None:
    assert header_size(image_claiming(20000, 12345, ext)) == (20000, 12345)
    real = jpeg(37, 23) if ext == ".jpg" else png(37, 23)
    assert header_size(real) == (23, 37)


def test_header_size_skips_an_exif_thumbnail_and_knows_progressive_frames() -> None:
    # the thumbnail's own SOF (8x8) sits inside the APP1 payload: the frame header that counts follows it
    assert header_size(with_exif(jpeg(40, 70), orientation=1, thumbnail=jpeg(8, 8))) == (70, 40)
    assert header_size(jpeg(50, 70, progressive=True)) == (70, 50)  # SOF2
    assert header_size(b"this is not an image") is None and header_size(b"") is None


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("side", [20000, 50000])
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(
    tmp_path: Path, ext: str, side: int
) -> None:
    path = tmp_path / f"bomb{ext}"
    path.write_bytes(image_claiming(side, side, ext))
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        img, reason = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img is None and peak < 10 * 2**20, peak  # decoding 20000x20000 would allocate 1.2 GB
    assert f"its header claims {side}x{side} pixels" in reason
    assert "over the pixel budget of 100 megapixels" in reason and "max_pixels" in reason


def test_the_budget_is_configurable_and_counts_width_times_height(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(48, 64))  # 3072 pixels
    assert read_image(path, max_pixels=3072)[0] is not None
    img, reason = read_image(path, max_pixels=3071)
    assert img is None and "64x48 pixels" in reason and "budget of 0.003071 megapixels" in reason
    assert read_image(path, max_pixels=None)[0] is not None


def test_opencv_s_own_limit_is_a_bad_image_not_an_exception(tmp_path: Path) -> None:
    """Without a budget a 50000x50000 claim reaches OpenCV, whose limit (2^30 pixels) raises cv2.error."""
    path = tmp_path / "huge.jpg"
    path.write_bytes(image_claiming(50000, 50000))
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    img, reason = read_image(path, max_pixels=None)
    assert (
        img is None
        and reason.startswith("OpenCV refused to decode it")
        and "CV_IO_MAX_IMAGE_PIXELS" in reason
    )


@pytest.mark.parametrize("skip", [False, True])
def test_over_budget_images_are_named_or_skipped(tmp_path: Path, skip: bool) -> None:
    files = {
        "a.jpg": jpeg(),
        "bomb.jpg": image_claiming(20000, 20000),
        "c.png": png(),
        "huge.jpg": image_claiming(50000, 50000),
    }
    root = coco(tmp_path / "coco", files)
    run = tmp_path / "run"
    if not skip:
        with pytest.raises(DatasetError) as err:
            preprocess(root, run, height=64, width=96, workers=2)
        message = str(err.value)
        assert "2 image(s)" in message and "bomb.jpg (its header claims 20000x20000 pixels" in message
        assert "huge.jpg (its header claims 50000x50000 pixels" in message and "skip_bad_images" in message
        assert not (run / "manifest.json").exists() and not (run / "inputs").exists()
        return
    manifest = preprocess(root, run, height=64, width=96, workers=2, skip_bad_images=True)
    assert [e.file_name for e in manifest.images] == ["a.jpg", "c.png"]
    skipped = {s["file_name"]: s["reason"] for s in load_manifest(run / "manifest.json").skipped}
    assert set(skipped) == {"bomb.jpg", "huge.jpg"} and "20000x20000" in skipped["bomb.jpg"]
    assert load_manifest(run / "manifest.json").max_pixels == 100_000_000


def test_a_raised_budget_is_recorded_and_used_to_rebuild_a_shard(tmp_path: Path) -> None:
    root = coco(tmp_path / "coco", {"a.jpg": jpeg(48, 64)})
    with pytest.raises(DatasetError, match="over the pixel budget"):
        preprocess(root, tmp_path / "run", height=64, width=96, max_pixels=1000)
    manifest = preprocess(root, tmp_path / "run", height=64, width=96, max_pixels=None, write_inputs=False)
    assert load_manifest(tmp_path / "run" / "manifest.json").max_pixels is None
    built = materialize_shard(load_manifest(tmp_path / "run" / "manifest.json"), "00000", tmp_path / "shard")
    assert [p.name for p in built.iterdir()] == [input_file_name(manifest.images[0].image_id)]
    with pytest.raises(DatasetError, match="max_pixels=0 must be a positive integer"):
        preprocess(root, tmp_path / "run", max_pixels=0)


# --------------------------------------------------------------------------------------------------
# files that must work


def test_unusual_but_valid_files_decode_like_cv2_imread(tmp_path: Path) -> None:
    colours = [(0, 0, 0, 0), (255, 0, 128, 30), (10, 200, 60, 255)]
    ok, gray_png = cv2.imencode(".png", RNG.integers(0, 256, size=(5, 3), dtype=np.uint8))
    assert ok
    files = {
        "gray.jpg": jpeg(37, 23, channels=1),
        "progressive.jpg": jpeg(50, 70, progressive=True),
        "cmyk.jpg": cmyk_jpeg(colours),
        "rotated.jpg": with_exif(jpeg(40, 70)),
        "thumbnail.jpg": with_exif(jpeg(40, 70), orientation=1, thumbnail=jpeg(8, 8)),
        "png_named.jpg": png(31, 17),
        "gray.png": gray_png.tobytes(),
        "one.jpg": jpeg(1, 1),
        "one.png": png(1, 1),
        "trailer.jpg": jpeg() + b"\x00" * 100 + b"camera trailer after the EOI",
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        img, reason = read_image(path)
        assert reason == "" and img is not None, name
        np.testing.assert_array_equal(img, cv2.imread(str(path), cv2.IMREAD_COLOR), err_msg=name)
    assert read_image(tmp_path / "rotated.jpg")[0].shape == (70, 40, 3)  # EXIF orientation applied
    cmyk = read_image(tmp_path / "cmyk.jpg")[0]
    assert cmyk.shape == (8, 24, 3) and len({tuple(cmyk[4, x]) for x in (4, 12, 20)}) == 3

    root = coco(tmp_path / "coco", files)
    manifest = preprocess(root, tmp_path / "run", dtype="uint8", height=64, width=96, workers=2)
    assert len(manifest.images) == len(files) and not manifest.skipped
    one = next(e for e in manifest.images if e.file_name == "one.png").geometry
    assert (one.width, one.height, one.resized_width, one.resized_height) == (1, 1, 64, 64)


# --------------------------------------------------------------------------------------------------
# model input sizes


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ({"height": 321}, "height=321 is not a multiple of 32.*height=320 or height=352"),
        ({"width": 1000}, "width=1000 is not a multiple of 32.*width=992 or width=1024"),
        ({"height": 16}, "height=16 must be an integer >= 32 and a multiple of 32"),
        ({"width": 96.0}, "width=96.0 must be an integer"),
    ],
)
def test_model_sizes_must_be_multiples_of_32(tmp_path: Path, size: dict, message: str) -> None:
    root = coco(tmp_path / "coco", {"a.jpg": jpeg()})
    with pytest.raises(DatasetError, match=message):
        preprocess(root, tmp_path / "run", **size)
    assert not (tmp_path / "run" / "manifest.json").exists() and not (tmp_path / "run" / "inputs").exists()
    with pytest.raises(DatasetError, match=message):
        preprocess_image(np.zeros((48, 64, 3), np.uint8), **size)
