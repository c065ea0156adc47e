"""The bad-input matrix of issue #13 through the `gfocal` CLI: every bad input exits 2 with one line
naming the input and the fix, never a traceback, and leaves nothing a later step would pick up.

Each case runs `gfocal_pipeline.cli.main` in-process (stderr captured); a few run the installed
console script in a subprocess to prove no raw traceback reaches the terminal. The Ascend cases run
the emulated CANN toolkit (tests/emulators) with its fault switches. The rules themselves are tested
next to their modules (test_bad_checkpoints, test_bad_images, backends/test_ascend_*); this module
adds the CLI-level assertions: exit code, message, no traceback, no artifact.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from emulators.models import tiny_dets_model
from emulators.runs import H, W, write_run
from emulators.toolkit import Toolkit, make_toolkit
from support import mounted, read_only, run_with_file_size_limit
from torch import nn

from gfocal_pipeline import cli
from gfocal_pipeline.checkpoint import random_state_dict
from gfocal_pipeline.demo_data import COCO_CATEGORIES, make_demo_coco

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
    import shutil

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
