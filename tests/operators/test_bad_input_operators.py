"""The bad-input matrix of issue #13 through the operators: the trigger form's values are validated
once by the prepare task (`RunConfig`), so a wrong type, a bad bound or a path with shell
metacharacters or `..` fails the run at once (no retry), naming the parameter, before any run
directory exists; a bad data set or a read-only work directory fails the preprocess task with the
project's error naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from support import read_only

from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import DatasetError, GfocalError
from operators.pipeline import CocoPreprocessOperator, PrepareRunOperator

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
        cache_inputs=False,
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
