"""A variant's folder (`<run>/variants/<name>/`): own model, outputs and evaluation; the run's manifest,
inputs, run.json and cache uses, or its own when it changes the inputs; pruned like its run."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfocal_pipeline.fileio import write_json
from gfocal_pipeline.layout import RunLayout
from gfocal_pipeline.retention import (
    PRUNED_FILE,
    RunPrunedError,
    cache_keys_in_use,
    check_not_pruned,
    is_kept,
)


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


def test_a_variant_with_a_run_json_of_its_own_owns_its_inputs(tmp_path: Path) -> None:
    run = _run(tmp_path)
    small = run.variant("small")
    small.root.mkdir(parents=True)
    write_json(small.root / "run.json", {"dag_id": "zoo_nightly", "model": {"om_name": "small_om"}})
    own = RunLayout.at(small.root)
    assert own.run_root == small.root
    for name in ("manifest", "inputs_dir", "run_json", "uses_dir"):
        assert getattr(own, name).parent == small.root, name
    assert own.onnx("ascend") == small.root / "model" / "small_om_ascend.onnx"
    # pruning keeps what a run keeps, in the variant's folder too
    assert is_kept("variants/small/manifest.json") and is_kept("variants/small/run.json")
    assert is_kept("variants/small/uses/inputs-abc") and not is_kept("variants/small/inputs/s0/1.bin")
    # a late retry there still sees that its run was pruned
    write_json(run.root / PRUNED_FILE, {"pruned_at_utc": "2026-12-01T00:00:00Z", "keep_runs": 3})
    with pytest.raises(RunPrunedError, match="keep_runs=3"):
        check_not_pruned(small.root, "inputs")


def test_the_cache_entries_a_variant_uses_stay_while_its_run_is_in_use(tmp_path: Path) -> None:
    run = _run(tmp_path)
    for folder, key in ((run.root, "k1"), (run.variant("small").root, "k2")):
        (folder / "uses").mkdir(parents=True)
        (folder / "uses" / f"inputs-{key}").touch()
    assert cache_keys_in_use(tmp_path) == {"k1", "k2"}


def _prepare(tmp_path: Path, variants: dict[str, dict[str, object]]) -> dict[str, object]:
    from gfocal_pipeline.steps import prepare_step

    (tmp_path / "coco").mkdir(exist_ok=True)
    (tmp_path / "ckpt.pth").touch()
    values = {"coco_root": str(tmp_path / "coco"), "checkpoint": str(tmp_path / "ckpt.pth")}
    values.update(work_dir=str(tmp_path / "work"), height=128)
    return prepare_step(values, "zoo_nightly", "manual_1", ascend=True, variants=variants)


def test_prepare_gives_a_variant_that_changes_the_inputs_a_run_json_of_its_own(tmp_path: Path) -> None:
    import json

    variants = {"fp16": {"tool": "ais_bench", "batch_size": 4}, "small": {"height": 96}}
    prepared = _prepare(tmp_path, variants)
    run_dir = Path(prepared["run_dir"])
    fp16, small = prepared["variants"]["fp16"], prepared["variants"]["small"]
    assert (fp16["own_inputs"], small["own_inputs"]) == (False, True)
    assert not (run_dir / "variants" / "fp16" / "run.json").exists()
    recorded = json.loads((run_dir / "variants" / "small" / "run.json").read_text())
    assert recorded["config"]["height"] == 96 and recorded["variant"] == "small"
    assert json.loads((run_dir / "run.json").read_text())["config"]["height"] == 128
    assert prepared["export_batch_size"] == 4  # the largest batch of the variants sharing the graph


def test_prepare_writes_nothing_when_a_variants_options_are_bad(tmp_path: Path) -> None:
    from gfocal_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="variant 'small'"):
        _prepare(tmp_path, {"fp16": {}, "small": {"height": 7}})
    assert not list((tmp_path / "work").glob("*/*/run.json"))
