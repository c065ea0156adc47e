"""Task timeouts: budgets per kind sized by images, and the operators resizing theirs at execute time."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from emulators.runs import IDS, SHARD, write_run

from operators.infer import InferOperator
from operators.pipeline import CocoEvalOperator, CocoPreprocessOperator
from operators.timeouts import BUDGETS, FULL_SET_IMAGES, sized_timeout


@pytest.fixture(autouse=True)
def no_gfocal_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AIRFLOW__GFOCAL__")]:
        monkeypatch.delenv(key)


def test_budgets_are_minutes_plus_seconds_per_image() -> None:
    assert sized_timeout("preprocess", 1000) == timedelta(minutes=15, seconds=500)
    assert sized_timeout("preprocess", None) == sized_timeout("preprocess", FULL_SET_IMAGES)
    assert sized_timeout("gate", 10**6) == timedelta(minutes=10)  # not sized by images
    assert sized_timeout("infer", 8, scale=3) == 3 * timedelta(minutes=15, seconds=120)
    assert sized_timeout("infer", 8, fixed=(("infer", 2.5),)) == timedelta(minutes=2.5)


def test_infer_budget_exceeds_the_tools_own_default_timeout() -> None:
    """msame / ais_bench stop themselves after 300 s + 10 s per image: their error must come first."""
    for images in (1, 8, 256, 5000):
        assert BUDGETS["infer"].seconds(images) > 300 + 10 * images


def _infer(run_dir: Path, backend: str = "onnxruntime") -> InferOperator:
    return InferOperator(
        task_id="infer",
        run_dir=str(run_dir),
        shard=SHARD,
        model=str(run_dir / "m.onnx"),
        backend=backend,
        execution_timeout=timedelta(hours=9),
    )


def test_infer_resizes_its_timeout_to_the_shard(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    op = _infer(tmp_path / "run")
    op.pre_execute(context={})
    assert op.execution_timeout == sized_timeout("infer", len(IDS))
    reference = _infer(tmp_path / "run", backend="torch")
    reference.pre_execute(context={})
    assert reference.execution_timeout == sized_timeout("infer_reference", len(IDS))


def test_a_fixed_timeout_or_an_unreadable_manifest_keeps_the_parse_time_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = _infer(tmp_path / "nothing-here")
    missing.pre_execute(context={})  # the step itself reports the missing manifest
    assert missing.execution_timeout == timedelta(hours=9)
    write_run(tmp_path / "run")
    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_TIMEOUT_MINUTES", "infer=45")
    fixed = _infer(tmp_path / "run")
    fixed.pre_execute(context={})
    assert fixed.execution_timeout == timedelta(hours=9)


def test_evaluate_and_preprocess_size_by_their_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(tmp_path / "run")
    monkeypatch.setenv("AIRFLOW__GFOCAL__TASK_TIMEOUT_SCALE", "2")
    evaluate = CocoEvalOperator(task_id="evaluate", run_dir=str(tmp_path / "run"), backend="onnxruntime")
    evaluate.pre_execute(context={})
    assert evaluate.execution_timeout == sized_timeout("evaluate", len(IDS), scale=2)
    options = {"task_id": "preprocess", "coco_root": "/coco", "run_dir": str(tmp_path / "run")}
    preprocess = CocoPreprocessOperator(**options, max_images=40)
    preprocess.pre_execute(context={})
    assert preprocess.execution_timeout == sized_timeout("preprocess", 40, scale=2)
    everything = CocoPreprocessOperator(**options, execution_timeout=timedelta(hours=2))
    everything.pre_execute(context={})  # all images: the parse-time (full set) budget stays
    assert everything.execution_timeout == timedelta(hours=2)
