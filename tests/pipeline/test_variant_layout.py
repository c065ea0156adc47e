"""A variant's folder (`<run>/variants/<name>/`): own model, outputs and evaluation; the run's manifest,
inputs, run.json and cache uses; pruned like the run it belongs to."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfocal_pipeline.fileio import write_json
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.retention import PRUNED_FILE, RunPrunedError, check_not_pruned, is_kept


def _run(tmp_path: Path) -> RunLayout:
    run = RunLayout.at(tmp_path / "zoo_nightly" / "manual_1")
    run.root.mkdir(parents=True)
    write_json(run.run_json, {"dag_id": "zoo_nightly", "model": {"om_name": "yolox_s"}})
    return run


def test_a_variant_shares_the_run_files_and_keeps_its_own_results(tmp_path: Path) -> None:
    run = _run(tmp_path)
    variant = run.variant("fp16")
    assert variant.root == run.root / "variants" / "fp16"
    assert RunLayout.at(variant.root).run_root == run.root
    for shared in ("manifest", "inputs_dir", "run_json", "uses_dir"):
        assert getattr(variant, shared) == getattr(run, shared)
    assert variant.om == variant.root / "model" / "yolox_s.om"  # the run's recorded om name
    assert variant.outputs_dir("msame") == variant.root / "outputs" / "msame"
    assert variant.eval_dir("msame") != run.eval_dir("msame")


def test_a_folder_named_variants_is_no_variant_without_its_run(tmp_path: Path) -> None:
    # a DAG called `variants`: <work>/variants/<run> is a run directory of its own
    lone = RunLayout.at(tmp_path / "variants" / "manual_1")
    assert lone.run_root == lone.root and lone.manifest == lone.root / "manifest.json"


@pytest.mark.parametrize(
    ("relative", "kept"),
    [
        ("variants/fp16/eval/msame/stats.json", True),
        ("variants/fp16/timing/msame/shard_0000.json", True),
        ("variants/fp16/outputs/msame/shard_0000/outputs.npz", True),
        ("variants/fp16/model/convert.json", True),
        ("variants/fp16/model/yolox_s.om", False),
        ("variants/fp16/outputs/msame/shard_0000/raw/out_0.bin", False),
        ("variants/fp16/.locks/convert.lock", False),
    ],
)
def test_pruning_keeps_a_variants_small_results(relative: str, kept: bool) -> None:
    assert is_kept(relative) is kept


def test_a_late_retry_in_a_variant_of_a_pruned_run_fails_clearly(tmp_path: Path) -> None:
    run = _run(tmp_path)
    variant = run.variant("keep")
    variant.root.mkdir(parents=True)
    check_not_pruned(variant.root, "raw outputs")
    write_json(run.root / PRUNED_FILE, {"pruned_at_utc": "2026-12-01T00:00:00Z", "keep_runs": 14})
    with pytest.raises(RunPrunedError, match="keep_runs=14"):
        check_not_pruned(variant.root, "raw outputs")
