"""The models file (`gfocal_pipeline.zoo`): valid entries load, each bad one is named with its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.zoo import (
    DEFAULT_VARIANT,
    MODELS_FILE_ENV,
    load_models_file,
    models_file_path,
    owns_inputs,
)


def _write(tmp_path: Path, entries: Any) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


GOOD = {
    "name": "gfocalv2_r50",
    "adapter": "gfocalv2",
    "checkpoint": "/data/ckpt/gfocal_r50_fpn_1x.pth",
    "coco_root": "/data/coco",
    "published_ap": 0.410,
    "ap_tolerance": 0.005,
    "schedule": "0 2 * * *",
    "variants": [
        {"name": "fp16", "tool": "msame", "precision_mode": "force_fp16"},
        {"name": "keep", "tool": "ais_bench", "precision_mode": "must_keep_origin_dtype", "batch_size": 4},
    ],
    "expected_failures": {"keep": "atc drops the NMS op"},
}


def test_the_issue_example_loads_with_its_options(tmp_path: Path) -> None:
    models = load_models_file(_write(tmp_path, [GOOD]))
    assert models.errors == ()
    (entry,) = models.entries
    assert entry.dag_id == "gfocalv2_r50_nightly"
    options = entry.run_options()
    assert options["model"] == "gfocalv2" and options["checkpoint"] == GOOD["checkpoint"]
    assert options["published_ap"] == 0.41 and options["ap_tolerance"] == 0.005
    variants = entry.variant_runs()
    assert list(variants) == ["fp16", "keep"]
    assert variants["keep"] == {
        "tool": "ais_bench",
        "precision_mode": "must_keep_origin_dtype",
        "batch_size": 4,
    }
    assert entry.expected_failures == {"keep": "atc drops the NMS op"}


def test_a_variant_may_change_the_inputs_and_then_owns_them(tmp_path: Path) -> None:
    variants = [
        {"name": "fp16", "precision_mode": "force_fp16", "batch_size": 4, "min_ap": 0.3},
        {"name": "small", "height": 640, "width": 640},
        {"name": "u8", "dtype": "uint8", "policy": "mmdet"},
    ]
    raw = {**GOOD, "variants": variants, "expected_failures": {}}
    (entry,) = load_models_file(_write(tmp_path, [raw])).entries
    runs = entry.variant_runs()
    assert runs["small"] == {"height": 640, "width": 640}
    assert runs["u8"] == {"dtype": "uint8", "policy": "mmdet"}
    assert [owns_inputs(runs[name]) for name in ("fp16", "small", "u8")] == [False, True, True]


def test_an_entry_without_variants_has_one_default_variant(tmp_path: Path) -> None:
    (entry,) = load_models_file(_write(tmp_path, [{"name": "retina", "adapter": "retinanet"}])).entries
    assert entry.variant_runs() == {DEFAULT_VARIANT: {}}
    assert entry.run_options() == {"model": "retinanet"}


BAD_ENTRIES = [
    ({"adapter": "gfocalv2"}, "field 'name'"),
    ({"name": "Bad-Name", "adapter": "gfocalv2"}, "field 'name'"),
    ({"name": "m", "adapter": "gfocal"}, "did you mean 'gfocalv2'"),
    ({"name": "m", "adapter": "gfocalv2", "heigth": 640}, "field 'heigth'"),
    ({"name": "m", "adapter": "gfocalv2", "height": 7}, "field 'height'"),
    ({"name": "m", "adapter": "gfocalv2", "model": "retinanet"}, "'adapter'"),
    ({"name": "m", "adapter": "gfocalv2", "schedule": "every night"}, "field 'schedule'"),
    ({"name": "m", "adapter": "gfocalv2", "priority_weight": 0}, "field 'priority_weight'"),
    ({"name": "m", "adapter": "gfocalv2", "variants": [{"name": "a"}, {"name": "a"}]}, "more than once"),
    ({"name": "m", "adapter": "gfocalv2", "variants": [{"name": "a", "height": 7}]}, "variants.0.height"),
    (
        {"name": "m", "adapter": "gfocalv2", "variants": [{"name": "a", "checkpoint": "/b.pth"}]},
        "share its model",
    ),
    (
        {"name": "m", "adapter": "gfocalv2", "variants": [{"name": "a", "work_dir": "/w"}]},
        "variants.0.work_dir",
    ),
    ({"name": "m", "adapter": "gfocalv2", "variants": [{"name": "a", "tool": "atc"}]}, "variants.0.tool"),
    ({"name": "m", "adapter": "gfocalv2", "expected_failures": {"fp32": "x"}}, "not variants"),
    # a tool's batch rule: msame runs batch 1, from the entry's tool and the variant's batch
    (
        {"name": "m", "adapter": "gfocalv2", "tool": "msame", "variants": [{"name": "a", "batch_size": 4}]},
        "variants.0.batch_size",
    ),
    (
        {"name": "m", "adapter": "gfocalv2", "batch_size": 2, "variants": [{"name": "a", "tool": "msame"}]},
        "field 'batch_size'",
    ),
    ({"name": "m", "adapter": "gfocalv2", "expected_failures": {"default": " "}}, "need a reason"),
    ({"name": "m", "adapter": "onnx", "checkpoint": "/g.onnx"}, "onnx: <graph.onnx>"),
    ({"name": "m", "adapter": "retinanet", "onnx": "/g.onnx"}, "adapter onnx"),
    ({"name": "m", "adapter": "onnx", "onnx": "/a/g.onnx", "spec": "/b/g.spec.yaml"}, "as /a/g.spec.yaml"),
    (
        {"name": "m", "adapter": "onnx", "onnx": "/a/g.onnx", "spec": "/a/g.onnx.spec.yaml"},
        "beside the graph",
    ),
    ({"name": "gfocal_ascend", "adapter": "gfocalv2"}, "built-in DAG"),
    ({"name": "m", "adapter": "gfocalv2", "coco_root": "relative/path"}, "field 'coco_root'"),
]


@pytest.mark.parametrize(("raw", "words"), BAD_ENTRIES)
def test_a_bad_entry_is_named_and_the_others_load(tmp_path: Path, raw: dict[str, Any], words: str) -> None:
    other = {"name": "fine", "adapter": "retinanet"}
    path = _write(tmp_path, [other, raw])
    models = load_models_file(path)
    assert [entry.name for entry in models.entries] == ["fine"]
    (error,) = models.errors
    message = str(error)
    assert str(path) in message and "entry 2" in message and words in message
    expected = f"{raw['name']}_nightly" if raw.get("name") == "m" else None
    if expected:
        assert error.dag_id == expected  # its placeholder DAG takes the entry's own id


def test_a_second_entry_of_a_name_gets_a_placeholder_id_of_its_own(tmp_path: Path) -> None:
    models = load_models_file(_write(tmp_path, [GOOD, {**GOOD, "checkpoint": "/other.pth"}, ["x"]]))
    assert [entry.name for entry in models.entries] == ["gfocalv2_r50"]
    ids = [error.dag_id for error in models.errors]
    assert ids == ["models_file_entry_2_nightly", "models_file_entry_3_nightly"]
    assert "used by an earlier entry" in str(models.errors[0])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("models: [", "not valid YAML"),
        ("- name: a", "a list under 'models'"),
        ("models: []\nextra: 1", "unknown top-level key"),
    ],
)
def test_an_unreadable_file_is_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_models_file(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_models_file(tmp_path / "missing.yaml")


def test_the_setting_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_FILE_ENV, "/env/models.yaml")
    assert models_file_path("/cfg/models.yaml") == "/cfg/models.yaml"
    assert models_file_path("  ") == "/env/models.yaml"
    monkeypatch.delenv(MODELS_FILE_ENV)
    assert models_file_path("") is None


def test_the_cli_checks_a_file_before_it_is_deployed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gfocal_pipeline.cli import main

    good = _write(tmp_path, [GOOD])
    assert main(["models-file", str(good)]) == 0
    assert "gfocalv2_r50_nightly: gfocalv2, variants fp16, keep\n" in capsys.readouterr().out
    small = {
        **GOOD,
        "variants": [{"name": "fp16"}, {"name": "small", "height": 640}],
        "expected_failures": {},
    }
    assert main(["models-file", str(_write(tmp_path, [small]))]) == 0
    assert "variants fp16, small (own inputs)" in capsys.readouterr().out
    bad = _write(tmp_path, [GOOD, {"name": "retina", "adapter": "retinanet", "heigth": 3}])
    assert main(["models-file", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "ERROR  retina_nightly" in captured.out and "field 'heigth'" in captured.out
    assert "1 of 2 entries are invalid" in captured.err


def test_an_onnx_entry_names_its_graph_and_the_declaration_beside_it(tmp_path: Path) -> None:
    entry = {"name": "byo", "adapter": "onnx", "onnx": "/data/end2end.onnx", "spec": "/data/end2end.spec.yml"}
    (loaded,) = load_models_file(_write(tmp_path, [entry])).entries
    assert loaded.run_options() == {"model": "onnx", "checkpoint": "/data/end2end.onnx"}
