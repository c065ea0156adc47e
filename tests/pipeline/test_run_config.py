"""`RunConfig`: one typed source for the forms, the validation, the CLI and what operators receive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gfocal_pipeline.backends.atc import PRECISION_MODES
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.options import PATH_PATTERN, SUBPATH_PATTERN, Policy, check_path
from gfocal_pipeline.run_config import RunConfig, form_options
from gfocal_pipeline.workspace import ensure_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("work")
    paths = ensure_demo_data(work)
    return {"work_dir": str(work), **{key: str(path) for key, path in paths.items()}}


def test_defaults_validate_and_travel_as_plain_typed_values(demo: dict[str, str]) -> None:
    config = RunConfig.from_mapping(demo, ascend=True)
    assert config.data.policy is Policy.LETTERBOX and config.ascend is not None
    values = config.to_dict()
    assert values["policy"] == "letterbox" and type(values["policy"]) is str
    assert values["height"] == 800 and values["max_images"] is None and values["soc_version"] is None
    assert values["images_dir"] == "val2017" and values["annotations"] == "annotations/instances_val2017.json"
    assert values["parity_threshold"] == 1e-3 and values["max_unexplained"] == 0
    assert values["thresholds"]["baseline_runs"] == 5 and values["weights_random"] is True
    assert "tool" not in RunConfig.from_mapping(demo).to_dict()  # the ONNX Runtime DAG has no Ascend options


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": 801}, r"'height' = 801 must be >= 64 and <= 4096, a multiple of 32"),
        ({"batch_size": 0}, r"'batch_size' = 0 must be >= 1"),
        ({"policy": "bogus"}, "must be one of: letterbox, mmdet"),
        ({"precision_mode": "fp8"}, "must be one of: force_fp16"),
        ({"soc_version": "310P3"}, "does not match"),
        ({"parity_threshold": 0}, r"'parity_threshold' = 0 must be > 0"),
        ({"max_unexplained": -1}, r"'max_unexplained' = -1 must be >= 0"),
        ({"fps_tolerance": 5}, r"'fps_tolerance' = 5 must be >= 0 and < 1 \(a fraction"),
        ({"coco_root": "coco"}, "must be an absolute, normalized path"),
        ({"work_dir": "/data/../etc"}, "must be an absolute, normalized path"),
        ({"cann_set_env": "/opt/set_env.sh; rm -rf /"}, "must be an absolute, normalized path"),
        ({"images_dir": "../val2017"}, "must be a relative, normalized path inside the COCO root"),
        ({"annotations": "/abs/a.json"}, "must be a relative, normalized path"),
        (
            {"tool": "msame", "batch_size": 2},
            r"'batch_size' = 2: msame batch_size must be 1 \(got 2\).*use tool 'ais_bench'",
        ),
        ({"checkpoint": "/nonexistent/x.pth"}, "does not exist; pass an existing path"),
        ({"bogus": 1}, r"unknown run parameter\(s\) \['bogus'\]"),
    ],
)
def test_bad_values_are_clear_errors(demo: dict[str, str], change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**demo, **change}, ascend=True)


def test_empty_optional_fields_are_none_and_ais_bench_batches(demo: dict[str, str]) -> None:
    values = {**demo, "soc_version": "", "cann_set_env": None, "max_images": None, "min_ap": ""}
    config = RunConfig.from_mapping({**values, "tool": "ais_bench", "batch_size": 4}, ascend=True)
    assert config.ascend.soc_version is None and config.ascend.cann_set_env is None
    assert config.gate.min_ap is None and config.model.batch_size == 4


def test_the_form_offers_every_accepted_precision_mode_and_one_path_rule() -> None:
    options = form_options(ascend=True)
    assert options["precision_mode"][1].schema()["enum"] == list(PRECISION_MODES)
    assert len(PRECISION_MODES) == 8
    for name in ("checkpoint", "coco_root", "work_dir", "cann_set_env"):
        assert options[name][1].schema()["pattern"] == PATH_PATTERN
    assert options["images_dir"][1].schema()["pattern"] == SUBPATH_PATTERN
    assert options["cann_set_env"][1].schema()["type"] == ["null", "string"]


@pytest.mark.parametrize("path", ["/data/coco", "/a b/c", "/x/..y/z"])
def test_good_paths_match_the_schema_pattern(path: str) -> None:
    assert re.match(PATH_PATTERN, path) and check_path("p", path) == path


@pytest.mark.parametrize(
    "path", ["data", "/a/../b", "/a/./b", "/a//b", "/a/", "/..", "/a;b", "/$HOME", "/a\nb"]
)
def test_bad_paths_fail_both_the_pattern_and_the_check(path: str) -> None:
    assert not re.match(PATH_PATTERN, path)
    with pytest.raises(ConfigError):
        check_path("p", path)


def test_demo_data_is_generated_on_first_use(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"work_dir": str(tmp_path)})
    assert Path(config.data.checkpoint).is_file() and config.weights_random
    assert Path(config.data.coco_root, "val2017").is_dir()
