"""The bad-input matrix of issue #13 through the `gfocal` CLI: every bad input exits 2 with one line
naming the input and the fix, never a traceback, and leaves nothing a later step would pick up.

Each case runs `gfocal_pipeline.cli.main` in-process (stderr captured); a few run the installed
console script in a subprocess to prove no raw traceback reaches the terminal. The Ascend cases run
the emulated CANN toolkit (tests/emulators) with its fault switches. The rules themselves are tested
next to their modules (test_bad_checkpoints, test_bad_images, backends/test_ascend_*); this module
adds the CLI-level assertions: exit code, message, no traceback, no artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from emulators.models import tiny_dets_model
from emulators.runs import H, W, write_run
from emulators.toolkit import Toolkit, make_toolkit
from support import (
    image_claiming,
    lock_held_by_a_child,
    mounted,
    peak_rss_of_gfocal,
    read_only,
    read_only_tree,
    run_with_file_size_limit,
)
from torch import nn

from gfocal_pipeline import cli
from gfocal_pipeline.demo_data import COCO_CATEGORIES, make_demo_coco
from gfocal_pipeline.models.gfocalv2.checkpoint import random_state_dict

TRACEBACK = "Traceback (most recent call last)"
GFOCAL = Path(sys.executable).parent / "gfocal"  # the installed console script
SIZE = ("--height", "64", "--width", "96")


def artifacts(*folders: Path) -> list[str]:
    """Files under `folders` that a later step would pick up (or a half-written temporary file)."""
    names = {"manifest.json", "done.json", "stats.json"}
    found = []
    for folder in folders:
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            if path.is_dir():
                continue
            name = path.name
            bad = name in names or path.suffix in (".onnx", ".om") or name.endswith(".tmp")
            if bad or (name.startswith(".") and ".tmp" in name):
                found.append(str(path.relative_to(folder)))
    return sorted(found)


def refused(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 2) -> str:
    """Run `gfocal argv` in-process; assert the exit code and no traceback; return stderr."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a bad option value itself
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err[-3000:]
    assert TRACEBACK not in err, err[-3000:]
    return err


def check(err: str, *needles: str) -> None:
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"


def console(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GFOCAL), *map(str, argv)], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


# --------------------------------------------------------------------------------------------------
# gfocal export: bad checkpoints and outputs


class _WritesAFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _zero_bytes(folder: Path, good: Path) -> Path:
    (folder / "empty.pth").write_bytes(b"")
    return folder / "empty.pth"


def _truncated(folder: Path, good: Path) -> Path:
    data = good.read_bytes()
    (folder / "cut.pth").write_bytes(data[: len(data) // 3])
    return folder / "cut.pth"


def _wrong_layout(folder: Path, good: Path) -> Path:
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    torch.save({"meta": {}, "state_dict": other.state_dict()}, folder / "classifier.pth")
    return folder / "classifier.pth"


def _unsafe_pickle(folder: Path, good: Path) -> Path:
    payload = {"meta": {"hook": _WritesAFile(folder / "code-ran")}, "state_dict": {"w": torch.zeros(2)}}
    with open(folder / "evil.pth", "wb") as handle:
        pickle.dump(payload, handle, protocol=2)
    return folder / "evil.pth"


def _nan_weights(folder: Path, good: Path) -> Path:
    state = random_state_dict(0)
    state["bbox_head.gfl_reg.bias"][:] = float("nan")
    torch.save({"meta": {}, "state_dict": state}, folder / "nan.pth")
    return folder / "nan.pth"


def _missing(folder: Path, good: Path) -> Path:
    return folder / "no-such.pth"


def _a_directory(folder: Path, good: Path) -> Path:
    (folder / "ckpt.pth").mkdir()
    return folder / "ckpt.pth"


CHECKPOINTS: dict[str, tuple[Callable[[Path, Path], Path], tuple[str, ...]]] = {
    "ckpt-zero-bytes": (_zero_bytes, ("empty (0 bytes)", "copy it again")),
    "ckpt-truncated": (_truncated, ("truncated or damaged", "copy the file again")),
    "ckpt-wrong-layout": (_wrong_layout, ("does not match the GFocalV2 R50-FPN layout",)),
    "ckpt-unsafe-pickle": (_unsafe_pickle, ("unsafe to unpickle", "nothing in it was run")),
    "ckpt-nan-weights": (_nan_weights, ("non-finite values", "bbox_head.gfl_reg.bias (68 NaN)")),
    "ckpt-missing": (_missing, ("no-such.pth",)),
    "ckpt-is-a-directory": (_a_directory, ("ckpt.pth", "is a directory", "the .pth file in it")),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS), ids=list(CHECKPOINTS))
def test_export_refuses_a_bad_checkpoint(
    case: str, tmp_path: Path, random_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, needles = CHECKPOINTS[case]
    (tmp_path / "in").mkdir()
    checkpoint = make(tmp_path / "in", random_checkpoint)
    out = tmp_path / "out"
    err = refused(capsys, "export", "--checkpoint", checkpoint, "--output", out / "m.onnx", *SIZE)
    check(err, "gfocal export: error:", checkpoint.name, *needles)
    assert artifacts(out, tmp_path / "in") == []
    assert not (tmp_path / "in" / "code-ran").exists()


def test_export_refuses_an_output_that_is_a_directory(
    tmp_path: Path, random_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    out.mkdir()
    err = refused(capsys, "export", "--checkpoint", random_checkpoint, "--output", out, *SIZE)
    check(err, "gfocal export: error:", f"output {str(out)!r} is a directory", "give the path")
    assert artifacts(tmp_path) == []


def test_export_bad_checkpoint_through_the_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "cut.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = console("export", "--checkpoint", bad, "--output", tmp_path / "o" / "m.onnx", *SIZE)
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal export: error:", str(bad))
    assert artifacts(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# gfocal preprocess: bad annotation files, images and sizes


@pytest.fixture(scope="module")
def demo_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo") / "coco", num_images=3)


def _copy_coco(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


ANNOTATION = Path("annotations") / "instances_val2017.json"


def _edit(root: Path, change: Callable[[dict], None]) -> None:
    document = json.loads((root / ANNOTATION).read_text())
    change(document)
    (root / ANNOTATION).write_text(json.dumps(document))


def _malformed(root: Path) -> None:
    (root / ANNOTATION).write_text('{"images": [{"id": 1,')


def _unknown_category(root: Path) -> None:
    def change(document: dict) -> None:
        document["annotations"][0]["category_id"] = 12345

    _edit(root, change)


def _dotdot_file_name(root: Path) -> None:
    def change(document: dict) -> None:
        document["images"][0]["file_name"] = "../escape.jpg"

    (root / "escape.jpg").write_bytes((root / "val2017" / os.listdir(root / "val2017")[0]).read_bytes())
    _edit(root, change)


def _81_categories(root: Path) -> None:
    def change(document: dict) -> None:
        document["categories"].append({"id": 91, "name": "extra", "supercategory": "x"})

    _edit(root, change)


def _truncated_jpeg(root: Path) -> None:
    image = sorted((root / "val2017").iterdir())[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])


def _no_annotation_file(root: Path) -> None:
    (root / ANNOTATION).unlink()


def _not_a_list(root: Path) -> None:
    def change(document: dict) -> None:
        document["images"] = {"id": 1}

    _edit(root, change)


def _image_missing(root: Path) -> None:
    sorted((root / "val2017").iterdir())[0].unlink()


PREPROCESS: dict[str, tuple[Callable[[Path], None], tuple[str, ...], tuple[str, ...]]] = {
    "ann-malformed-json": (_malformed, (), ("instances_val2017.json",)),
    "ann-unknown-category": (_unknown_category, (), ("12345",)),
    "ann-file-name-dotdot": (_dotdot_file_name, (), ("../escape.jpg",)),
    "ann-81-categories": (_81_categories, (), ("81",)),
    "ann-missing": (_no_annotation_file, (), ("instances_val2017.json",)),
    "ann-images-not-a-list": (_not_a_list, (), ("images",)),
    "image-missing": (_image_missing, (), (".jpg",)),
    "image-truncated-jpeg": (_truncated_jpeg, (), ("truncated JPEG", "skip-bad-images")),
    "height-321": (lambda root: None, ("--height", "321"), ("height", "321", "multiple of 32")),
    "coco-root-missing": (lambda root: None, ("--coco-root", "/no/such/coco"), ("/no/such/coco",)),
    "images-dir-dotdot": (lambda root: None, ("--images-dir", "../x"), ("images_dir", "'../x'")),
    "max-images-abc": (lambda root: None, ("--max-images", "abc"), ("--max-images", "'abc'")),
    "dtype-float64": (lambda root: None, ("--dtype", "float64"), ("--dtype", "'float64'", "uint8")),
    "shard-size-0": (lambda root: None, ("--shard-size", "0"), ("shard_size", ">= 1")),
}


@pytest.mark.parametrize("case", list(PREPROCESS), ids=list(PREPROCESS))
def test_preprocess_refuses_bad_input(
    case: str, tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, extra, needles = PREPROCESS[case]
    root = _copy_coco(demo_coco, tmp_path / "coco")
    damage(root)
    run = tmp_path / "run"
    err = refused(capsys, "preprocess", "--coco-root", root, "--run-dir", run, *SIZE, *extra)
    check(err, "gfocal preprocess: error:" if not case.startswith(("max", "dtype")) else "", *needles)
    assert artifacts(run) == []
    assert not (run / "inputs").exists() or not any((run / "inputs").rglob("*.bin"))


def test_truncated_jpeg_is_skipped_and_listed_with_skip_bad_images(
    tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_coco(demo_coco, tmp_path / "coco")
    _truncated_jpeg(root)
    bad = sorted((root / "val2017").iterdir())[0].name
    run = tmp_path / "run"
    assert (
        cli.main(["preprocess", "--coco-root", str(root), "--run-dir", str(run), *SIZE, "--skip-bad-images"])
        == 0
    )
    out = capsys.readouterr()
    assert TRACEBACK not in out.err
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["file_name"] for s in manifest["skipped"]] == [bad]
    assert len(manifest["images"]) == 2


def _cmyk_jpeg() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def test_unusual_valid_images_preprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Positive cases (not bad inputs): grayscale, CMYK, a PNG named .jpg and a 1x1 image all work."""
    rng = np.random.default_rng(0)
    files = {
        "gray.jpg": _encode(".jpg", rng.integers(0, 256, (30, 40), dtype=np.uint8)),
        "cmyk.jpg": _cmyk_jpeg(),
        "png_named.jpg": _encode(".png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "one.jpg": _encode(".jpg", np.full((1, 1, 3), 128, np.uint8)),
    }
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id, (name, data) in enumerate(files.items(), start=1):
        (root / "val2017" / name).write_bytes(data)
        size = (1, 1) if name == "one.jpg" else (40, 30)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]
    (root / ANNOTATION).write_text(
        json.dumps({"images": images, "annotations": [], "categories": categories})
    )
    run = tmp_path / "run"
    assert cli.main(["preprocess", "--coco-root", str(root), "--run-dir", str(run), *SIZE]) == 0, (
        capsys.readouterr().err[-3000:]
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 and not manifest["skipped"]


# --------------------------------------------------------------------------------------------------
# disk full and read-only folders


def test_preprocess_on_a_full_disk(
    tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "full"
    with mounted(run, "size=2m") as ok:  # one 1216x800 float32 input is 11.7 MB
        if ok:
            err = refused(capsys, "preprocess", "--coco-root", demo_coco, "--run-dir", run)
            check(err, "gfocal preprocess: error:", str(run), "free disk space", "uint8")
            assert artifacts(run) == []
            assert not any(run.rglob("*.bin"))
    if not ok:
        run.rmdir()
        result = run_with_file_size_limit(["preprocess", "--coco-root", demo_coco, "--run-dir", run])
        assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
        check(result.stderr, "gfocal preprocess: error:", str(run), "file size limit")
        assert artifacts(run) == []


def test_export_on_a_full_disk(
    tmp_path: Path, random_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ONNX (about 130 MB of weights) does not fit: ENOSPC while writing, named with the free space."""
    out = tmp_path / "full"
    argv = ["export", "--checkpoint", random_checkpoint, "--output", out / "m.onnx", *SIZE]
    with mounted(out, "size=2m") as ok:
        if ok:
            err = refused(capsys, *argv)
            check(err, "gfocal export: error:", str(out), "No space left", "MiB are free", "free space")
            assert artifacts(out) == [] and list(out.iterdir()) == []
    if not ok:  # no tmpfs here: a file-size limit makes the same write fail (EFBIG)
        result = run_with_file_size_limit(argv)
        assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
        check(result.stderr, "gfocal export: error:", str(out), "file size limit")
        assert artifacts(out) == [] and list(out.iterdir()) == []


def test_preprocess_file_size_limit_gives_efbig(tmp_path: Path, demo_coco: Path) -> None:
    """EFBIG (a file-size limit, or a file system's largest file) is named and explained too."""
    run = tmp_path / "run"
    result = run_with_file_size_limit(["preprocess", "--coco-root", demo_coco, "--run-dir", run])
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal preprocess: error:", str(run), "File too large", "file size limit")
    assert artifacts(run) == []


def test_preprocess_into_a_read_only_work_dir(
    tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "ro"
    with read_only(work):
        err = refused(capsys, "preprocess", "--coco-root", demo_coco, "--run-dir", work / "run", *SIZE)
        check(err, "gfocal preprocess: error:", str(work), "writable")
        assert artifacts(work) == []


def test_export_into_a_read_only_folder(
    tmp_path: Path, random_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "ro"
    with read_only(work):
        err = refused(capsys, "export", "--checkpoint", random_checkpoint, "--output", work / "m.onnx", *SIZE)
        check(err, "gfocal export: error:", str(work), "writable")
        assert artifacts(work) == []


# --------------------------------------------------------------------------------------------------
# gfocal infer --backend onnxruntime: bad models


@pytest.fixture
def run16(tmp_path: Path) -> Path:
    write_run(tmp_path / "run")
    return tmp_path / "run"


def _truncated_onnx(folder: Path) -> Path:
    model = tiny_dets_model(folder / "full.onnx", H, W)
    data = model.read_bytes()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    model.unlink()
    return folder / "cut.onnx"


def _other_onnx(folder: Path) -> Path:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(folder / "relu.onnx"))
    return folder / "relu.onnx"


def _image_model_onnx(folder: Path) -> Path:
    """An image model (rank-4 input of the run's size) whose outputs are not the detector's."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input.1"], ["features"])],
        "features",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, H, W])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, H, W])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(folder / "features.onnx"))
    return folder / "features.onnx"


def _other_size_onnx(folder: Path) -> Path:
    """The detector's interface, for 32x32 inputs: the run's inputs are 16x16."""
    return tiny_dets_model(folder / "tiny32.onnx", 2 * H, 2 * W)


def _zero_byte_onnx(folder: Path) -> Path:
    (folder / "empty.onnx").write_bytes(b"")
    return folder / "empty.onnx"


ONNX_MODELS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "onnx-truncated": (_truncated_onnx, ("cut.onnx",)),
    "onnx-of-another-model": (_other_onnx, ("relu.onnx",)),
    "onnx-zero-bytes": (_zero_byte_onnx, ("empty.onnx",)),
    "onnx-image-model-wrong-outputs": (_image_model_onnx, ("features.onnx", "boxes", "Export the portable")),
    "onnx-other-input-size": (_other_size_onnx, ("tiny32.onnx", "32")),
    "onnx-missing": (lambda folder: folder / "none.onnx", ("none.onnx",)),
}


@pytest.mark.parametrize("case", list(ONNX_MODELS), ids=list(ONNX_MODELS))
def test_infer_onnxruntime_refuses_a_bad_model(
    case: str, tmp_path: Path, run16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, needles = ONNX_MODELS[case]
    (tmp_path / "m").mkdir()
    model = make(tmp_path / "m")
    err = refused(capsys, "infer", "--run-dir", run16, "--backend", "onnxruntime", "--model", model)
    check(err, "gfocal infer: error:", *needles)
    assert artifacts(run16 / "outputs") == []


def test_infer_bad_onnx_through_the_console_script(tmp_path: Path, run16: Path) -> None:
    (tmp_path / "m").mkdir()
    model = _truncated_onnx(tmp_path / "m")
    result = console("infer", "--run-dir", run16, "--backend", "onnxruntime", "--model", model)
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal infer: error:", "cut.onnx")
    assert artifacts(run16 / "outputs") == []


def test_infer_without_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    err = refused(capsys, "infer", "--run-dir", tmp_path / "run", "--model", tmp_path / "m.onnx")
    check(err, "gfocal infer: error:", "manifest.json")
    assert artifacts(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--batch-size", "0"), ("batch_size", ">= 1")),
        (("--batch-size", "abc"), ("--batch-size", "'abc'")),
        (("--backend", "tensorrt"), ("--backend", "'tensorrt'")),
    ],
    ids=["batch-size-0", "batch-size-abc", "backend-unknown"],
)
def test_infer_refuses_bad_options(
    args: tuple[str, ...], needles: tuple[str, ...], run16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, "infer", "--run-dir", run16, "--model", run16 / "m.onnx", *args)
    check(err, *needles)
    assert artifacts(run16 / "outputs") == []


# --------------------------------------------------------------------------------------------------
# the Ascend tools (emulated CANN toolkit): convert and msame / ais_bench failures


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Toolkit:
    return make_toolkit(tmp_path_factory.mktemp("cann"))


@pytest.fixture(scope="module")
def om(kit: Toolkit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gfocal_pipeline.backends.atc import convert_onnx

    folder = tmp_path_factory.mktemp("om")
    onnx_file = tiny_dets_model(folder / "tiny.onnx", H, W)
    result = convert_onnx(onnx_file, folder / "cache", output_dir=folder / "model", set_env=kit.set_env)
    return Path(result["om_path"])


CONVERT_FAULTS = {
    "atc_e10001": ("E10001",),
    "atc_e19999": ("E19999",),
    "atc_no_om": ("atc reported success but wrote no model*.om", "free disk space"),
    "npu_smi_no_chip": ("npu-smi info` listed no NPU", "soc_version"),
}


@pytest.mark.parametrize("fault", list(CONVERT_FAULTS), ids=[f"fault-{f}" for f in CONVERT_FAULTS])
def test_convert_tool_failures(
    fault: str,
    kit: Toolkit,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", fault)
    soc = () if fault == "npu_smi_no_chip" else ("--soc-version", "Ascend310P3")
    argv = ["convert", "--run-dir", run, "--onnx", onnx_file, "--cache-dir", tmp_path / "cache", *soc]
    err = refused(capsys, *argv, "--cann-set-env", kit.set_env)
    check(err, "gfocal convert: error:", *CONVERT_FAULTS[fault])
    assert artifacts(run, tmp_path / "cache") == []


def test_convert_tool_hang_is_stopped(
    kit: Toolkit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gfocal_pipeline.backends import atc

    load = atc._load_tool
    monkeypatch.setattr(atc, "_load_tool", lambda set_env, timeout_s, handle: load(set_env, 2.0, handle))
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "atc_hang")
    run = tmp_path / "run"
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    argv = ["convert", "--run-dir", run, "--onnx", onnx_file, "--cache-dir", tmp_path / "cache"]
    err = refused(capsys, *argv, "--soc-version", "Ascend310P3", "--cann-set-env", kit.set_env)
    check(err, "gfocal convert: error:", "atc did not finish within 2 s", "raise the timeout")
    assert artifacts(run, tmp_path / "cache") == []


def test_convert_with_a_missing_set_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    run = tmp_path / "run"
    argv = ["convert", "--run-dir", run, "--onnx", onnx_file, "--cache-dir", tmp_path / "cache"]
    err = refused(capsys, *argv, "--cann-set-env", tmp_path / "none" / "set_env.sh")
    check(err, "gfocal convert: error:", str(tmp_path / "none" / "set_env.sh"))
    assert artifacts(run, tmp_path / "cache") == []


def test_convert_with_a_metacharacter_in_set_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    err = refused(capsys, "convert", "--run-dir", run, "--cann-set-env", "/opt/x;rm -rf ~/set_env.sh")
    check(err, "gfocal convert: error:", "cann_set_env", "shell metacharacters")
    assert artifacts(run) == []


INFER_FAULTS = {
    "msame_not_om": ("msame rejected the model", "not .om", "pass the .om file written by atc"),
    "msame_exit0_no_success": ("msame did not report success",),
    "msame_drop_output": ("missing 1 file(s)", "convert the Ascend ONNX again"),
    "msame_extra_output": ("unexpected 1 file(s)", "check the tool log"),
    "msame_garbage_timing": ("cannot parse msame timing line", "NaN time", "npu-smi info"),
    "msame_fail": ("msame did not report success", "Sample process failed", "check the device"),
    "ais_fail": ("ais_bench did not report success", "acl.mdl.execute failed", "check the device"),
    "ais_no_summary": ("summary.json", "check the ais_bench version"),
    "ais_drop_output": ("ais_bench output folder", "missing 1 file(s)"),
    "ais_extra_output": ("ais_bench output folder", "unexpected 1 file(s)"),
}


@pytest.mark.parametrize("fault", list(INFER_FAULTS), ids=[f"fault-{f}" for f in INFER_FAULTS])
def test_infer_tool_failures(
    fault: str,
    kit: Toolkit,
    om: Path,
    run16: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = "msame" if fault.startswith("msame") else "ais_bench"
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", fault)
    argv = ["infer", "--run-dir", run16, "--backend", backend, "--model", om, "--cann-set-env", kit.set_env]
    err = refused(capsys, *argv)
    check(err, "gfocal infer: error:", *INFER_FAULTS[fault])
    assert artifacts(run16 / "outputs") == []


def test_infer_msame_hang_is_stopped(
    kit: Toolkit,
    om: Path,
    run16: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gfocal_pipeline.backends.msame import MsameBackend

    monkeypatch.setattr(MsameBackend, "default_timeout", lambda self, images: 2.0)
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "msame_hang")
    argv = ["infer", "--run-dir", run16, "--backend", "msame", "--model", om, "--cann-set-env", kit.set_env]
    err = refused(capsys, *argv)
    check(err, "gfocal infer: error:", "msame did not finish within 2 s", "raise the timeout")
    assert artifacts(run16 / "outputs") == []


def test_infer_msame_truncated_om(
    kit: Toolkit, om: Path, run16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = om.read_bytes()
    cut = tmp_path / "cut.om"
    cut.write_bytes(data[: len(data) // 2])
    argv = ["infer", "--run-dir", run16, "--backend", "msame", "--model", cut, "--cann-set-env", kit.set_env]
    err = refused(capsys, *argv)
    check(err, "gfocal infer: error:", "cut.om", "damaged", "convert the ONNX again")
    assert artifacts(run16 / "outputs") == []


def test_infer_msame_fault_through_the_console_script(kit: Toolkit, om: Path, run16: Path) -> None:
    argv = ["infer", "--run-dir", run16, "--backend", "msame", "--model", om, "--cann-set-env", kit.set_env]
    result = console(*argv, env={"GFOCAL_EMULATOR_FAULT": "msame_fail"})
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal infer: error:", "Sample process failed")
    assert artifacts(run16 / "outputs") == []


def test_infer_msame_with_a_missing_model(
    kit: Toolkit, run16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["infer", "--run-dir", run16, "--backend", "msame", "--cann-set-env", kit.set_env]
    err = refused(capsys, *argv, "--model", tmp_path / "none.om")
    check(err, "gfocal infer: error:", "none.om")
    assert artifacts(run16 / "outputs") == []


# --------------------------------------------------------------------------------------------------
# issue #18: every --help, damaged state files, read-only caches, gc, what a step reads is what the
# earlier step recorded, the pixel budget, the demo checkpoint


def _subcommands() -> list[str]:
    """Every `gfocal` subcommand, discovered from the parser (not a hand-kept list)."""
    parser = cli.build_parser()
    return sorted(
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    )


def test_every_subcommand_s_help_exits_0_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    names = _subcommands()
    assert "gate" in names and "gc" in names  # discovery works (gate's help had a bare '%')
    for argv in (["--help"], *([name, "--help"] for name in names)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        out = capsys.readouterr()
        assert info.value.code == 0, (argv, out.err[-3000:])
        assert TRACEBACK not in out.err and out.out.startswith("usage: gfocal"), argv


def test_gate_help_through_the_console_script() -> None:
    result = console("gate", "--help")
    assert result.returncode == 0 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    assert "--fps-tolerance" in result.stdout and "%" in result.stdout


SUMMARIES = {
    "summary-cut-short": '{"run_dir": "/x", "backe',
    "summary-not-a-summary": "[]",
    "summary-empty": "",
}


@pytest.mark.parametrize("latest", [False, True], ids=["run-dir", "latest"])
@pytest.mark.parametrize("case", list(SUMMARIES), ids=list(SUMMARIES))
def test_summary_of_a_damaged_summary_json(
    case: str, latest: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "gfocal_onnxruntime" / "manual__1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(SUMMARIES[case])
    argv = ("summary", "--latest", run.parent) if latest else ("summary", run)
    err = refused(capsys, *argv)
    check(err, "gfocal summary: error:", f"summary {str(run / 'summary.json')!r} is damaged", "summary task")


def test_summary_of_a_run_without_summary_or_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dag" / "running").mkdir(parents=True)
    err = refused(capsys, "summary", tmp_path / "dag" / "running")
    check(err, "gfocal summary: error:", "summary.json' does not exist", "not a finished run directory")
    err = refused(capsys, "summary", "--latest", tmp_path / "dag")
    check(err, "gfocal summary: error:", "no finished run (summary.json)", str(tmp_path / "dag"))
    err = refused(capsys, "summary", "--latest", tmp_path / "no-such-dag")
    check(err, "gfocal summary: error:", "no-such-dag", "is not a directory")


def test_damaged_summary_through_the_console_script(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"run_dir": ')
    result = console("summary", tmp_path)
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal summary: error:", "is damaged")


@pytest.mark.parametrize("dry_run", [False, True], ids=["gc", "gc-dry-run"])
def test_gc_on_a_missing_work_dir_is_an_error(
    dry_run: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "work" / "gfocal_onnxruntime").mkdir(parents=True)
    typo = tmp_path / "wrok"
    err = refused(capsys, "gc", "--work-dir", typo, *(["--dry-run"] if dry_run else []))
    check(err, "gfocal gc: error:", f"work directory {str(typo)!r} does not exist", "--work-dir")
    assert "freed" not in err and not typo.exists()


def _old_run(work: Path, name: str, days: float) -> Path:
    """A finished run directory `days` old with bulk inputs (what gc prunes)."""
    run = work / "gfocal_onnxruntime" / name
    (run / "inputs" / "00000").mkdir(parents=True)
    (run / "inputs" / "00000" / "000000000001.bin").write_bytes(b"\0" * 50_000)
    created = time.time() - days * 86400
    (run / "run.json").write_text(json.dumps({"created": created}))
    (run / "summary.json").write_text("{}")
    _age(run, created)
    return run


def _age(run: Path, when: float) -> None:
    for path in [run, *run.rglob("*")]:
        os.utime(path, (when, when))


def test_gc_keeps_a_run_whose_step_lock_a_live_process_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    _old_run(work, "new", 1)
    busy = _old_run(work, "busy", 9)
    with lock_held_by_a_child(busy, "infer-onnxruntime-00000"):
        _age(busy, time.time() - 9 * 86400)
        capsys.readouterr()
        assert cli.main(["gc", "--work-dir", str(work), "--keep-runs", "1"]) == 0
        out = capsys.readouterr()
        assert json.loads(out.out)["runs"]["in_use"] == [str(busy)], out.err[-3000:]
        assert (busy / "inputs" / "00000" / "000000000001.bin").is_file()
    assert cli.main(["gc", "--work-dir", str(work), "--keep-runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [item["path"] for item in report["runs"]["pruned"]] == [str(busy)]
    assert not (busy / "inputs").exists()


def test_convert_reuses_a_valid_om_from_a_read_only_cache(
    kit: Toolkit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    cache = tmp_path / "cache"
    argv = ["--onnx", onnx_file, "--cache-dir", cache, "--soc-version", "Ascend310P3", "--cann-set-env"]
    assert cli.main(["convert", "--run-dir", str(tmp_path / "r1"), *map(str, argv), str(kit.set_env)]) == 0
    first = json.loads(capsys.readouterr().out)
    with read_only_tree(cache):
        assert (
            cli.main(["convert", "--run-dir", str(tmp_path / "r2"), *map(str, argv), str(kit.set_env)]) == 0
        )
        out = capsys.readouterr()
    second = json.loads(out.out)
    assert TRACEBACK not in out.err and second["cached"] is True and second["om_sha256"] == first["om_sha256"]
    assert (tmp_path / "r2" / "model" / "gfocal.om").read_bytes() == Path(first["om_path"]).read_bytes()


def test_convert_with_a_read_only_cache_lacking_the_om_names_the_cache(
    kit: Toolkit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    onnx_file = tiny_dets_model(tmp_path / "tiny.onnx", H, W)
    argv = ["convert", "--run-dir", tmp_path / "run", "--onnx", onnx_file, "--cache-dir", cache]
    with read_only_tree(cache):
        err = refused(capsys, *argv, "--soc-version", "Ascend310P3", "--cann-set-env", kit.set_env)
    check(err, "gfocal convert: error:", f"OM cache directory {str(cache)!r} is not writable")
    assert artifacts(tmp_path / "run", cache) == []


@pytest.fixture
def scored(tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """(COCO root, run directory): 3 images preprocessed into 3 one-image shards and inferred
    (onnxruntime, a tiny dets model), ready for `gfocal eval`."""
    root = _copy_coco(demo_coco, tmp_path / "coco")
    run = tmp_path / "run"
    model = tiny_dets_model(tmp_path / "tiny.onnx", 64, 96)
    size = (*SIZE, "--shard-size", "1")
    assert cli.main(["preprocess", "--coco-root", str(root), "--run-dir", str(run), *size]) == 0
    assert cli.main(["infer", "--run-dir", str(run), "--model", str(model)]) == 0
    capsys.readouterr()
    return root, run


def test_eval_refuses_an_annotation_file_edited_after_preprocess(
    scored: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, run = scored
    annotation = root / ANNOTATION
    recorded = hashlib.sha256(annotation.read_bytes()).hexdigest()

    def change(document: dict) -> None:
        document["annotations"][0]["bbox"][2] += 3

    _edit(root, change)
    edited = hashlib.sha256(annotation.read_bytes()).hexdigest()
    err = refused(capsys, "eval", "--run-dir", run)
    check(
        err,
        "gfocal eval: error:",
        str(annotation),
        f"sha256 {edited}",
        f"sha256 {recorded}",
        "re-run preprocess",
    )
    assert artifacts(run / "eval") == []


def test_eval_counts_only_the_manifest_s_shards_and_names_stale_ones(
    scored: tuple[Path, Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root, run = scored
    size = (*SIZE, "--shard-size", "1", "--max-images", "2")
    assert cli.main(["preprocess", "--coco-root", str(root), "--run-dir", str(run), *size]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert (
        result["images"] == 2 and result["timing"]["images"] == 2 and len(result["timing"]["shard_fps"]) == 2
    )
    check(caplog.text, "ignoring 1 timing file(s)", "00002.json", "ignoring 1 output folder(s)", "00002")
    assert TRACEBACK not in out.err


def test_eval_names_a_listed_shard_whose_timing_is_missing(
    scored: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = scored
    (run / "timing" / "onnxruntime" / "00001.json").unlink()
    err = refused(capsys, "eval", "--run-dir", run)
    check(err, "gfocal eval: error:", "timing of shard '00001' of backend 'onnxruntime' is missing")
    check(err, "run the inference of shard '00001'")
    assert artifacts(run / "eval") == []


@pytest.mark.parametrize("side", [20000, 50000])
def test_preprocess_refuses_an_image_over_the_pixel_budget_without_decoding_it(
    side: int, tmp_path: Path, demo_coco: Path
) -> None:
    root = _copy_coco(demo_coco, tmp_path / "coco")
    victim = sorted((root / "val2017").iterdir())[0]
    victim.write_bytes(image_claiming(side, side))
    run = tmp_path / "run"
    result, growth = peak_rss_of_gfocal(["preprocess", "--coco-root", root, "--run-dir", run, *SIZE])
    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr[-3000:]
    check(result.stderr, "gfocal preprocess: error:", victim.name, f"{side}x{side} pixels", "max_pixels")
    check(result.stderr, "skip-bad-images")
    assert growth < 256 * 2**20, growth  # decoding the 20000x20000 claim alone allocates 1.2 GB
    assert artifacts(run) == []


def test_an_image_over_the_pixel_budget_is_skipped_and_listed(
    tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_coco(demo_coco, tmp_path / "coco")
    victim = sorted((root / "val2017").iterdir())[0]
    victim.write_bytes(image_claiming(20000, 20000))
    run = tmp_path / "run"
    argv = ["preprocess", "--coco-root", str(root), "--run-dir", str(run), *SIZE, "--skip-bad-images"]
    assert cli.main(argv) == 0
    assert TRACEBACK not in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["file_name"] for s in manifest["skipped"]] == [victim.name]
    assert "its header claims 20000x20000 pixels" in manifest["skipped"][0]["reason"]
    assert len(manifest["images"]) == 2 and manifest["max_pixels"] == 100_000_000


def test_opencv_s_own_limit_without_a_budget_is_a_bad_image(
    tmp_path: Path, demo_coco: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_coco(demo_coco, tmp_path / "coco")
    victim = sorted((root / "val2017").iterdir())[0]
    victim.write_bytes(image_claiming(50000, 50000))
    run = tmp_path / "run"
    argv = ("preprocess", "--coco-root", root, "--run-dir", run, *SIZE, "--max-pixels", "0")
    err = refused(capsys, *argv)
    check(err, "gfocal preprocess: error:", victim.name, "OpenCV refused to decode it")
    assert artifacts(run) == []
    assert cli.main([*map(str, argv), "--skip-bad-images"]) == 0
    skipped = json.loads((run / "manifest.json").read_text())["skipped"]
    assert [s["file_name"] for s in skipped] == [victim.name] and "OpenCV refused" in skipped[0]["reason"]


def test_preprocess_refuses_a_bad_max_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(
        capsys, "preprocess", "--coco-root", tmp_path, "--run-dir", tmp_path / "r", "--max-pixels", "-5"
    )
    check(err, "--max-pixels", "'-5'", "0: no budget")


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A work directory with the demo data generated once, and its checkpoint's sha256."""
    work = tmp_path_factory.mktemp("demo-work")
    assert cli.main(["demo-data", "--work-dir", str(work)]) == 0
    checkpoint = work / "demo" / "gfocal_r50_fpn_1x_RANDOM.pth"
    return work, hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :]


@pytest.mark.parametrize("damage", [_cut, _flipped], ids=["ckpt-cut-short", "ckpt-same-size-corruption"])
def test_demo_data_writes_a_damaged_demo_checkpoint_again(
    damage: Callable[[bytes], bytes],
    demo_work: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    work, good = demo_work
    checkpoint = work / "demo" / "gfocal_r50_fpn_1x_RANDOM.pth"
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    capsys.readouterr()
    assert cli.main(["demo-data", "--work-dir", str(work)]) == 0
    assert TRACEBACK not in capsys.readouterr().err
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == good
    assert f"demo checkpoint {checkpoint} is damaged" in caplog.text and "writing it again" in caplog.text


def test_a_damaged_demo_checkpoint_that_cannot_be_written_again_is_an_error(
    demo_work: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, good = demo_work
    work = tmp_path / "work"
    shutil.copytree(source, work)
    checkpoint = work / "demo" / "gfocal_r50_fpn_1x_RANDOM.pth"
    checkpoint.write_bytes(_flipped(checkpoint.read_bytes()))
    with read_only_tree(work / "demo"):
        err = refused(capsys, "demo-data", "--work-dir", work)
    check(err, "gfocal demo-data: error:", f"demo checkpoint {str(checkpoint)!r} is damaged", "writable")
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() != good


MANIFESTS = {
    "manifest-a-list": "[]",
    "manifest-null": "null",
    "manifest-images-not-a-list": '{"version": 2, "images": 5}',
}


@pytest.mark.parametrize("command", ["eval", "infer"])
@pytest.mark.parametrize("case", list(MANIFESTS), ids=list(MANIFESTS))
def test_a_damaged_manifest_is_named(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(MANIFESTS[case])
    extra = ("--model", tmp_path / "m.onnx") if command == "infer" else ()
    err = refused(capsys, command, "--run-dir", run, *extra)
    check(err, f"gfocal {command}: error:", f"manifest {str(run / 'manifest.json')!r} is malformed", "re-run")
