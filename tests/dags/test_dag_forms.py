"""Both DAGs' trigger forms, generated from `RunConfig`, submit with their defaults and refuse bad paths.

The form's JSON schema is built from the DAG's params like the UI builds it: a field left empty is a
missing value unless its type allows null, and every field is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support import ROOT, load_dag_file

from gfocal_pipeline.run_config import form_options

DAGS = ("gfocal_onnxruntime.py", "gfocal_ascend_nightly.py")
PATHS = ("checkpoint", "coco_root", "work_dir")


@pytest.fixture(scope="module", params=DAGS)
def dag(request: pytest.FixtureRequest) -> Any:
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    return load_dag_file(ROOT / "dags" / request.param).dag


def form_schema(dag: Any) -> dict:
    params = dag.params
    return {
        "type": "object",
        "properties": {name: params.get_param(name).schema for name in params},
        "required": list(params),
    }


def submitted_defaults(dag: Any) -> dict:
    """What the form sends untouched: an empty value of a field that is not nullable is missing."""
    values = {}
    for name in dag.params:
        param = dag.params.get_param(name)
        nullable = "null" in (param.schema.get("type") or [])
        if param.value in (None, "") and not nullable:
            continue
        values[name] = param.value
    return values


def test_the_form_submits_with_its_defaults(dag: Any) -> None:
    schema = form_schema(dag)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(submitted_defaults(dag), schema)
    dag.params.validate()  # and Airflow's own check of the defaults
    expected = form_options(ascend="tool" in dag.params)
    assert list(dag.params) == list(expected)
    assert all(dag.params.get_param(name).schema.get("title") for name in dag.params)


@pytest.mark.parametrize(
    "bad", ["relative/coco", "/data/../etc", "/data/./coco", "/data/", "/data//x", "/a;b"]
)
def test_relative_and_dotdot_paths_are_rejected_by_the_schema(dag: Any, bad: str) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    schema = form_schema(dag)
    for name in PATHS:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**submitted_defaults(dag), name: bad}, schema)
        with pytest.raises(ParamValidationError):
            dag.params.get_param(name).resolve(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**submitted_defaults(dag), "images_dir": "../val2014"}, schema)


def test_custom_coco_names_and_absolute_paths_are_accepted(dag: Any, tmp_path: Path) -> None:
    values = {
        **submitted_defaults(dag),
        "coco_root": str(tmp_path),
        "images_dir": "val2014",
        "annotations": "annotations/instances_val2014.json",
    }
    jsonschema.validate(values, form_schema(dag))


def _reload_dags_with(monkeypatch: pytest.MonkeyPatch, **settings: str) -> dict[str, Any]:
    for key, value in settings.items():
        monkeypatch.setenv(f"AIRFLOW__GFOCAL__{key.upper()}", value)
    load_dag_file(ROOT / "dags" / "gfocal_factory.py")
    return {name: load_dag_file(ROOT / "dags" / name, name=f"settings_{name}").dag for name in DAGS}


def test_deployment_data_settings_are_the_forms_and_the_schedules_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = {
        "checkpoint": str(tmp_path / "gfocal_r50_fpn_1x.pth"),
        "coco_root": str(tmp_path / "coco"),
        "images_dir": "val2014",
        "annotations": "annotations/instances_val2014.json",
        "work_dir": str(tmp_path / "work"),
    }
    for dag in _reload_dags_with(monkeypatch, **data).values():
        # a scheduled run takes the params' defaults: the deployment's files, never the demo's
        assert {key: dag.params[key] for key in data} == data
        jsonschema.validate(submitted_defaults(dag), form_schema(dag))
        # a manual run can still override them
        dag.params.get_param("coco_root").resolve(str(tmp_path / "other"))


def test_a_bad_data_setting_fails_the_parse_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from gfocal_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[gfocal\] coco_root .*AIRFLOW__GFOCAL__COCO_ROOT.*absolute"):
        _reload_dags_with(monkeypatch, coco_root="datasets/coco")


def test_the_form_is_in_sections_with_every_option_in_one() -> None:
    from gfocal_pipeline.run_config import FORM_SECTIONS

    named = [name for names in FORM_SECTIONS.values() for name in names]
    assert len(named) == len(set(named))
    assert set(form_options(ascend=True)) == set(named)  # none unsectioned, none unknown


def test_each_field_carries_its_section(dag: Any) -> None:
    # no section: Airflow's default "Run Parameters", the one the form shows open
    sections = [dag.params.get_param(name).schema.get("section", "") for name in dag.params]
    order = ["", "Data", "Model", "Inference", "Gate & alerts", "Ascend", "Advanced"]
    firsts = list(dict.fromkeys(sections))  # the form shows them in this order, each once
    assert firsts == [s for s in order if s in firsts] and sorted(sections, key=order.index) == sections
    assert ("Ascend" in firsts) == ("tool" in dag.params)
    opened = [name for name, section in zip(dag.params, sections, strict=True) if not section]
    assert opened[:4] == ["model", "checkpoint", "coco_root", "max_images"]
