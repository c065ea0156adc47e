"""The bad-input matrix of issue #13 through the operators: the trigger form's values are validated
once by the prepare task (`RunConfig`), so a wrong type, a bad bound or a path with shell
metacharacters or `..` fails the run at once (no retry), naming the parameter, before any run
directory exists; a bad data set or a read-only work directory fails the preprocess task with the
project's error naming the file. Issue #18's cases: an image over the pixel budget, a read-only
inputs cache, a corrupted cached input, an annotation file edited after preprocessing, a stale
timing shard, retention of a missing work directory or of a run whose step lock is held, and a
damaged demo checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from emulators.models import tiny_dets_model
from support import image_claiming, lock_held_by_a_child, read_only, read_only_tree

from gfocal_pipeline import steps
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import ConfigError, DatasetError, EvaluationError, GfocalError
from operators.pipeline import CocoEvalOperator, CocoPreprocessOperator, PrepareRunOperator
from operators.retention import RetentionOperator

DAG_ID = "gfocal_ascend"
CONTEXT = {"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": "manual__1"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo") / "coco", num_images=2)


@pytest.fixture
def base(tmp_path: Path, coco: Path, random_checkpoint: Path) -> dict[str, Any]:
    """Valid form values with existing data (so no demo data is generated) and a fresh work dir."""
    (tmp_path / "work").mkdir()
    return {"checkpoint": str(random_checkpoint), "coco_root": str(coco), "work_dir": str(tmp_path / "work")}


def prepare_refuses(config: dict[str, Any], work_dir: Path) -> str:
    """The prepare task fails without retry; nothing is created under the work directory."""
    with pytest.raises(AirflowFailException) as info:
        PrepareRunOperator(task_id="prepare", config=config, ascend=True).execute(context=CONTEXT)
    message = str(info.value)
    assert message.startswith("ConfigError: ")
    assert "Traceback" not in message
    assert not (work_dir / DAG_ID).exists()
    assert list(work_dir.iterdir()) == []
    return message


def test_valid_form_values_prepare_the_run(base: dict[str, Any], tmp_path: Path) -> None:
    prepared = PrepareRunOperator(task_id="prepare", config=base, ascend=True).execute(context=CONTEXT)
    assert Path(prepared["run_dir"]) == tmp_path / "work" / DAG_ID / "manual__1"
    assert (Path(prepared["run_dir"]) / "run.json").is_file()


WRONG_VALUES: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "max-images-abc": ("max_images", "abc", ("'max_images'", "an integer", "'abc'")),
    "max-images-0": ("max_images", 0, ("'max_images'", ">= 1")),
    "batch-size-0": ("batch_size", 0, ("'batch_size'", ">= 1")),
    "batch-size-1.5": ("batch_size", 1.5, ("'batch_size'", "whole number")),
    "batch-size-8-with-msame": ("batch_size", 8, ("'batch_size'", "msame")),
    "dtype-float64": ("dtype", "float64", ("'dtype'", "'float64'", "float32, uint8")),
    "height-800px": ("height", "800px", ("'height'", "an integer", "'800px'")),
    "height-321": ("height", 321, ("'height'", "321", "multiple of 32")),
    "width-true": ("width", True, ("'width'", "an integer", "True")),
    "shard-size-negative": ("shard_size", -1, ("'shard_size'", ">= 1")),
    "parity-threshold-nan": ("parity_threshold", "nan", ("'parity_threshold'", "finite")),
    "policy-unknown": ("policy", "stretch", ("'policy'", "letterbox, mmdet")),
    "soc-version-bad": ("soc_version", "310P3", ("'soc_version'", "Ascend310P3")),
    "device-256": ("device", 256, ("'device'", "<= 255")),
    "cache-inputs-yes": ("cache_inputs", "yes", ("'cache_inputs'", "true or false")),
    "checkpoint-empty-list": ("checkpoint", [], ("'checkpoint'", "non-empty string")),
}


@pytest.mark.parametrize("case", list(WRONG_VALUES), ids=list(WRONG_VALUES))
def test_wrong_type_or_bound_fails_prepare(case: str, base: dict[str, Any], tmp_path: Path) -> None:
    name, value, needles = WRONG_VALUES[case]
    message = prepare_refuses({**base, name: value}, tmp_path / "work")
    for needle in needles:
        assert needle in message, message


def test_unknown_parameter_fails_prepare(base: dict[str, Any], tmp_path: Path) -> None:
    message = prepare_refuses({**base, "max_imgs": 3}, tmp_path / "work")
    assert "unknown run parameter(s) ['max_imgs']" in message and "'max_images'" in message


# every path-like option of RunConfig: absolute paths and paths inside the COCO root
PATHS = ("checkpoint", "coco_root", "work_dir", "cann_set_env")
SUBPATHS = ("images_dir", "annotations")
UNSAFE = {
    "semicolon": "x;rm -rf ~",
    "command-substitution": "x$(id)",
    "backticks": "x`id`",
    "pipe": "x|tee y",
    "newline": "x\nid",
    "dotdot": "../../etc",
}


def _unsafe_value(name: str, kind: str, tmp_path: Path) -> str:
    tail = UNSAFE[kind]
    if name in SUBPATHS:
        return tail if kind == "dotdot" else f"val2017/{tail}"
    return f"{tmp_path}/data/{tail}"


@pytest.mark.parametrize("kind", list(UNSAFE), ids=list(UNSAFE))
@pytest.mark.parametrize("name", [*PATHS, *SUBPATHS])
def test_unsafe_path_fails_prepare_naming_the_parameter(
    name: str, kind: str, base: dict[str, Any], tmp_path: Path
) -> None:
    value = _unsafe_value(name, kind, tmp_path)
    config = {**base, name: value}
    work = tmp_path / "work"
    if name == "work_dir":  # the refused work dir is not created either
        assert not Path(value).exists()
    message = prepare_refuses(config, work)
    assert f"parameter {name!r} = {value!r}" in message, message
    assert "normalized path" in message and "without shell metacharacters" in message
    assert ("e.g. /data/coco" if name in PATHS else "e.g. val2017") in message


def test_relative_path_fails_prepare(base: dict[str, Any], tmp_path: Path) -> None:
    message = prepare_refuses({**base, "coco_root": "data/coco"}, tmp_path / "work")
    assert "parameter 'coco_root' = 'data/coco' must be an absolute" in message


def test_missing_checkpoint_fails_prepare(base: dict[str, Any], tmp_path: Path) -> None:
    missing = str(tmp_path / "none.pth")
    message = prepare_refuses({**base, "checkpoint": missing}, tmp_path / "work")
    assert f"parameter 'checkpoint': {missing!r} does not exist" in message


# --------------------------------------------------------------------------------------------------
# the preprocess task: a bad data set, a read-only work directory


def preprocess_operator(coco_root: Path, run_dir: Path, **options: Any) -> CocoPreprocessOperator:
    return CocoPreprocessOperator(
        task_id="preprocess",
        coco_root=str(coco_root),
        run_dir=str(run_dir),
        height=64,
        width=96,
        workers=1,
        cache_inputs=options.pop("cache_inputs", False),
        **options,
    )


def test_preprocess_task_names_a_malformed_annotation_file(coco: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco, tmp_path / "coco"))
    annotation = root / "annotations" / "instances_val2017.json"
    annotation.write_text('{"images": [')
    run = tmp_path / "run"
    with pytest.raises(DatasetError) as info:
        preprocess_operator(root, run).execute(context={"ti": None})
    assert str(annotation) in str(info.value)
    assert not (run / "manifest.json").exists() and not list(run.rglob("*.bin"))


def test_preprocess_task_names_an_unknown_category(coco: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(coco, tmp_path / "coco"))
    annotation = root / "annotations" / "instances_val2017.json"
    document = json.loads(annotation.read_text())
    document["annotations"][0]["category_id"] = 4242
    annotation.write_text(json.dumps(document))
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="4242"):
        preprocess_operator(root, run).execute(context={"ti": None})
    assert not (run / "manifest.json").exists() and not list(run.rglob("*.bin"))


def test_preprocess_task_in_a_read_only_work_dir(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "ro"
    with read_only(work):
        with pytest.raises(GfocalError) as info:
            preprocess_operator(coco, work / "run").execute(context={"ti": None})
        message = str(info.value)
        assert str(work) in message and "writable" in message, message
        assert not list(work.rglob("*"))


# --------------------------------------------------------------------------------------------------
# issue #18: the same cases through the operators (preprocess, evaluate, retention, prepare)


class _TaskInstance:
    """What the preprocess task pushes to XCom."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _coco_with(coco: Path, tmp_path: Path, data: bytes) -> tuple[Path, str]:
    """A copy of `coco` whose first image file holds `data`; (root, that file's name)."""
    root = Path(shutil.copytree(coco, tmp_path / "coco"))
    victim = sorted((root / "val2017").iterdir())[0]
    victim.write_bytes(data)
    return root, victim.name


def test_preprocess_task_refuses_an_image_over_the_pixel_budget(coco: Path, tmp_path: Path) -> None:
    root, name = _coco_with(coco, tmp_path, image_claiming(20000, 20000))
    run = tmp_path / "run"
    with pytest.raises(DatasetError) as info:
        preprocess_operator(root, run).execute(context={"ti": None})
    message = str(info.value)
    assert name in message and "its header claims 20000x20000 pixels" in message and "max_pixels" in message
    assert not (run / "manifest.json").exists() and not list(run.rglob("*.bin"))


def test_preprocess_task_skips_an_image_over_the_pixel_budget(coco: Path, tmp_path: Path) -> None:
    root, name = _coco_with(coco, tmp_path, image_claiming(50000, 50000, ".png"))
    ti = _TaskInstance()
    shards = preprocess_operator(root, tmp_path / "run", skip_bad_images=True).execute(context={"ti": ti})
    facts = ti.pushed["manifest"]
    assert shards == facts["shards"] and facts["images"] == 1 and facts["skipped"] == 1
    assert facts["skipped_images"][0]["file_name"] == name
    assert "its header claims 50000x50000 pixels" in facts["skipped_images"][0]["reason"]


def test_preprocess_task_takes_the_pixel_budget_from_the_worker_setting(
    coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__GFOCAL__MAX_PIXELS", "1000")  # the demo images are >= 100k pixels
    with pytest.raises(DatasetError, match=r"over the pixel budget of 0\.001 megapixels"):
        preprocess_operator(coco, tmp_path / "run").execute(context={"ti": None})
    ti = _TaskInstance()  # the task's own argument wins: 0 is no budget
    preprocess_operator(coco, tmp_path / "run", max_pixels=0).execute(context={"ti": ti})
    assert ti.pushed["manifest"]["images"] == 2
    monkeypatch.setenv("AIRFLOW__GFOCAL__MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match=r"\[gfocal\] max_pixels = 'lots'"):
        preprocess_operator(coco, tmp_path / "run").execute(context={"ti": None})


def _cached_preprocess(coco: Path, work: Path, run: str) -> dict[str, Any]:
    ti = _TaskInstance()
    preprocess_operator(coco, work / DAG_ID / run, work_dir=str(work), cache_inputs=True).execute({"ti": ti})
    return ti.pushed["manifest"]


def test_preprocess_task_reuses_a_read_only_cache_with_a_valid_entry(coco: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = _cached_preprocess(coco, work, "night1")
    with read_only_tree(work / "cache"):
        second = _cached_preprocess(coco, work, "night2")
    assert (first["cached"], second["cached"]) == (False, True) and first["cache_key"] == second["cache_key"]


def test_preprocess_task_rebuilds_a_same_size_corruption_of_a_cached_input(
    coco: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    first = _cached_preprocess(coco, work, "night1")
    victim = next((work / "cache" / "inputs" / first["cache_key"] / "inputs").rglob("*.bin"))
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 0x01]))
    second = _cached_preprocess(coco, work, "night2")
    assert second["cached"] is False and second["cache_key"] == first["cache_key"]
    assert victim.read_bytes() == good and "(its crc32 differs" in caplog.text


@pytest.fixture
def scored(coco: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(COCO root, run directory): 2 images in 2 one-image shards, inferred with a tiny dets model."""
    root = Path(shutil.copytree(coco, tmp_path / "coco"))
    run = tmp_path / "run"
    model = tiny_dets_model(tmp_path / "tiny.onnx", 64, 96)
    for shard in steps.preprocess_step(root, run, height=64, width=96, shard_size=1)["shards"]:
        steps.infer_step(run, shard, "onnxruntime", model=str(model), batch_size=1)
    return root, run


def evaluate_operator(run: Path) -> CocoEvalOperator:
    return CocoEvalOperator(task_id="evaluate", run_dir=str(run), backend="onnxruntime")


def test_evaluate_task_refuses_an_annotation_file_edited_after_preprocess(scored: tuple[Path, Path]) -> None:
    root, run = scored
    annotation = root / "annotations" / "instances_val2017.json"
    recorded = hashlib.sha256(annotation.read_bytes()).hexdigest()
    document = json.loads(annotation.read_text())
    document["images"][0]["license"] = 7
    annotation.write_text(json.dumps(document))
    with pytest.raises(EvaluationError) as info:
        evaluate_operator(run).execute(context={})
    message = str(info.value)
    assert str(annotation) in message and recorded in message and "re-run preprocess" in message
    assert hashlib.sha256(annotation.read_bytes()).hexdigest() in message
    assert not (run / "eval" / "onnxruntime" / "stats.json").exists()


def test_evaluate_task_ignores_and_names_a_stale_timing_shard(
    scored: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, run = scored
    timing = run / "timing" / "onnxruntime"
    shutil.copyfile(timing / "00000.json", timing / "00007.json")  # left by an earlier preprocess
    result = evaluate_operator(run).execute(context={})
    assert result["images"] == 2 and result["timing"]["images"] == 2
    assert "ignoring 1 timing file(s)" in caplog.text and "00007.json" in caplog.text


def test_retention_task_on_a_missing_work_dir_names_it(tmp_path: Path) -> None:
    typo = tmp_path / "wrok"
    operator = RetentionOperator(task_id="retention", work_dir=str(typo), keep_runs=1, cache_max_gb=1.0)
    # a bad path stays bad: the task fails without retries
    with pytest.raises(
        AirflowFailException, match=f"ConfigError: work directory {str(typo)!r} does not exist"
    ):
        operator.execute(context={})
    assert not typo.exists()
    # the DAGs' retention after a run that failed before creating its work directory: nothing to do
    dag_task = RetentionOperator(task_id="retention", work_dir=str(typo), require_work_dir=False)
    assert "no work directory" in dag_task.execute(context={})["skipped"]


def test_retention_task_keeps_a_run_whose_step_lock_a_live_process_holds(tmp_path: Path) -> None:
    work = tmp_path / "work"
    runs = {}
    for name, days in (("new", 1), ("busy", 9)):
        run = runs[name] = work / DAG_ID / name
        (run / "inputs").mkdir(parents=True)
        (run / "inputs" / "x.bin").write_bytes(b"\0" * 10_000)
        (run / "run.json").write_text(json.dumps({"created": time.time() - days * 86400}))
    old = time.time() - 9 * 86400
    operator = RetentionOperator(task_id="retention", work_dir=str(work), keep_runs=1, cache_max_gb=1.0)
    with lock_held_by_a_child(runs["busy"], "preprocess"):
        for path in [runs["busy"], *runs["busy"].rglob("*")]:
            os.utime(path, (old, old))
        report = operator.execute(context={})
        assert report["in_use_runs"] == [str(runs["busy"])] and report["runs_pruned"] == 0
        assert (runs["busy"] / "inputs" / "x.bin").is_file()


def test_prepare_writes_a_damaged_demo_checkpoint_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = {"work_dir": str(work), "max_images": 2}
    PrepareRunOperator(task_id="prepare", config=config, ascend=False).execute(context=CONTEXT)
    checkpoint = work / "demo" / "gfocal_r50_fpn_1x_RANDOM.pth"
    good = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) - 4096])  # cut short, as an interrupted copy leaves it
    context = {**CONTEXT, "run_id": "manual__2"}
    prepared = PrepareRunOperator(task_id="prepare", config=config, ascend=False).execute(context=context)
    assert prepared["checkpoint"] == str(checkpoint)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == good
    assert "is damaged" in caplog.text and "writing it again" in caplog.text
