"""The models file (`[gfocal] models_file`): one nightly DAG per entry, a bad entry as a failing
placeholder beside the others, and an entry's variant matrix end to end under `dag.test()` on the
CANN tool emulators (history rows per variant, one gate, one alert over SMTP on loopback)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from support import ROOT, SmtpInbox, free_port, load_dag_file, xcoms

from gfocal_pipeline.history import HistoryStore

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

PUBLISHED_TOO_HIGH = 0.9  # random weights cannot come near it


def _entries(work: Path, set_env: Path) -> list[dict[str, Any]]:
    data = {
        "height": 128,
        "width": 160,
        "max_images": 4,
        "shard_size": 2,
        "outfmt": "TXT",
        "work_dir": str(work),
        "cann_set_env": str(set_env),
        # the emulators' fps is this machine's wall clock: no night may fail on timing noise
        "fps_tolerance": 0.9,
    }
    return [
        {
            "name": "zoo_gfocal",
            "adapter": "gfocalv2",
            "published_ap": 0.0,
            "priority_weight": 3,
            **data,
            "variants": [
                {"name": "fp16", "tool": "msame", "precision_mode": "force_fp16"},
                {
                    "name": "keep",
                    "tool": "ais_bench",
                    "precision_mode": "must_keep_origin_dtype",
                    "batch_size": 2,
                },
                # changes the inputs: its own export and preprocessing (uint8 inputs, AIPP in the OM)
                {"name": "small", "height": 96, "width": 128, "dtype": "uint8"},
            ],
        },
        {
            "name": "zoo_broken",
            "adapter": "retinanet",
            "variants": [{"name": "fp16", "precision_mode": "fp15"}],
        },
        {
            "name": "zoo_alerting",
            "adapter": "gfocalv2",
            **data,
            "variants": [
                {"name": "strict", "published_ap": PUBLISHED_TOO_HIGH},
                {"name": "fixed", "precision_mode": "must_keep_origin_dtype"},
            ],
            "expected_failures": {"fixed": "atc 7 dropped the NMS op (ticket 123)"},
        },
    ]


@pytest.fixture(scope="module")
def zoo(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The models file's DAGs, parsed from dags/gfocal_models.py with the file set in the env."""
    from airflow.models.pool import Pool
    from emulators.toolkit import make_toolkit

    from gfocal_pipeline.constants import ASCEND_POOL

    Pool.create_or_update_pool(ASCEND_POOL, slots=1, description="Ascend NPUs", include_deferred=False)
    toolkit = make_toolkit(tmp_path_factory.mktemp("cann"))
    folder = tmp_path_factory.mktemp("zoo")
    models_file = folder / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": _entries(folder / "work", toolkit.set_env)}))
    saved = {
        key: os.environ.get(key) for key in ("GFOCAL_MODELS_FILE", "AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS")
    }
    os.environ["GFOCAL_MODELS_FILE"] = str(models_file)
    os.environ["AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS"] = "0"  # dag.test() cannot run a DeadlineAlert
    try:
        for helper in ("gfocal_factory.py", "gfocal_variants.py"):
            load_dag_file(ROOT / "dags" / helper)
        module = load_dag_file(ROOT / "dags" / "gfocal_models.py")
        dags = {name: value for name, value in vars(module).items() if name.endswith("_nightly")}
        yield {"dags": dags, "toolkit": toolkit, "file": models_file}
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_one_dag_per_entry_and_the_bad_one_named(zoo: dict[str, Any]) -> None:
    dags = zoo["dags"]
    assert set(dags) == {"zoo_gfocal_nightly", "zoo_broken_nightly", "zoo_alerting_nightly"}
    good = dags["zoo_gfocal_nightly"]
    assert {"gfocalv2", "models-file"} <= set(good.tags)
    for variant in ("fp16", "keep"):
        for task_id in ("convert", "infer", "evaluate"):
            assert f"{variant}.{task_id}" in good.task_dict
        for task_id in ("convert", "infer"):
            task = good.get_task(f"{variant}.{task_id}")
            assert (task.queue, task.pool, task.priority_weight) == ("ascend", "ascend_npu", 3)
    assert good.params["height"] == 128 and good.params["published_ap"] == 0.0
    # one export and one preprocessing for the variants that keep the inputs, own ones for `small`
    own = {task_id for task_id in good.task_dict if task_id.split(".")[-1] in ("export", "preprocess")}
    assert own == {"export", "preprocess", "small.export", "small.preprocess"}
    assert good.get_task("small.infer").upstream_task_ids >= {"small.preprocess", "small.convert"}
    broken = dags["zoo_broken_nightly"]
    assert "models-file-error" in broken.tags
    for words in (str(zoo["file"]), "entry 2 ('zoo_broken')", "variants.0.precision_mode", "fp15"):
        assert words in broken.description
    run = broken.test()
    assert run.state == "failed"


def test_the_dag_processor_loads_the_good_entries_beside_the_bad_one(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    """What Airflow's DAG processor does with the file: a DagBag of the DAG folder, no import error."""
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    for name in ("gfocal_factory.py", "gfocal_variants.py", "gfocal_models.py"):
        shutil.copyfile(ROOT / "dags" / name, tmp_path / name)
    bag = DagBag(dag_folder=tmp_path, safe_mode=True)
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == set(zoo["dags"])
    assert bag.get_dag("zoo_broken_nightly").description.startswith("BROKEN models file entry: ")
    (zoo["file"].parent / "unreadable.yaml").write_text("models: [")
    os.environ["GFOCAL_MODELS_FILE"] = str(zoo["file"].parent / "unreadable.yaml")
    try:
        errors = DagBag(dag_folder=tmp_path, safe_mode=True).import_errors
    finally:
        os.environ["GFOCAL_MODELS_FILE"] = str(zoo["file"])
    (message,) = [text for path, text in errors.items() if path.endswith("gfocal_models.py")]
    assert "unreadable.yaml" in message and "not valid YAML" in message


@pytest.fixture(scope="module")
def two_nights(zoo: dict[str, Any]) -> list[dict[str, Any]]:
    """Two nights of `zoo_gfocal`: {run_id, values (XComs), atc_calls (emulator calls so far)} each."""
    dag, nights = zoo["dags"]["zoo_gfocal_nightly"], []
    for _ in range(2):
        run = dag.test()
        assert run.state == "success"
        calls = zoo["toolkit"].call_log.read_text().count('"tool": "atc"')
        nights.append({"run_id": run.run_id, "values": xcoms(dag.dag_id, run.run_id), "atc_calls": calls})
    return nights


def test_a_night_runs_every_variant_once_against_one_reference(
    zoo: dict[str, Any], two_nights: list[dict[str, Any]]
) -> None:
    dag = zoo["dags"]["zoo_gfocal_nightly"]
    run_id, values = two_nights[0]["run_id"], two_nights[0]["values"]
    assert {"export", "export_portable", "preprocess", "evaluate_reference"} <= set(values)
    atc = {name: values[f"{name}.convert"]["atc_args"] for name in ("fp16", "keep")}
    assert "--precision_mode=force_fp16" in atc["fp16"] and "--dynamic_batch_size" not in " ".join(
        atc["fp16"]
    )
    assert "--precision_mode=must_keep_origin_dtype" in atc["keep"]
    assert "--dynamic_batch_size=1,2" in atc["keep"]
    assert values["fp16.convert"]["om_sha256"] != values["keep.convert"]["om_sha256"]
    summary = values["summary"]
    reference = values["evaluate_reference"]["stats"]["AP"]
    rows = {row["variant"]: row for row in summary["matrix"]}
    assert list(rows) == ["fp16", "keep", "small"]
    for name, tool, batch in (("fp16", "msame", 1), ("keep", "ais_bench", 2)):
        ap = values[f"{name}.evaluate"]["stats"]["AP"]
        assert (rows[name]["tool"], rows[name]["batch_size"]) == (tool, batch)
        assert rows[name]["AP"] == ap
        assert rows[name]["dAP_reference"] == pytest.approx(ap - reference)
        assert rows[name]["dAP_published"] == pytest.approx(ap - 0.0)
        assert rows[name]["fps"] > 0 and rows[name]["p99_ms"] > 0
    assert Path(values["fp16.convert"]["om_path"]).parent != Path(values["keep.convert"]["om_path"]).parent
    gate = values["gate"]
    assert gate["passed"] and set(gate["variants"]) == {"fp16", "keep", "small"}
    assert any(c["name"] == "AP vs published" for c in gate["variants"]["fp16"]["checks"])
    with HistoryStore(os.environ["GFOCAL_HISTORY_URL"]) as store:
        recorded = {r.config.model: r for r in store.run_records(dag.dag_id, run_id)}
    assert set(recorded) == {f"zoo_gfocal/{name}" for name in ("fp16", "keep", "small", "reference")}
    assert recorded["zoo_gfocal/keep"].config.batch_size == 2
    assert recorded["zoo_gfocal/keep"].config.backend == "ais_bench"
    assert recorded["zoo_gfocal/fp16"].verdict == "pass"
    assert json.dumps(values)


def test_a_variant_that_changes_the_inputs_runs_on_its_own(
    zoo: dict[str, Any], two_nights: list[dict[str, Any]]
) -> None:
    """`small` (96x128 uint8) exports, preprocesses and converts in `variants/small/`; the others
    share the run's 128x160 float32 graph and inputs."""
    dag = zoo["dags"]["zoo_gfocal_nightly"]
    run_id, values = two_nights[0]["run_id"], two_nights[0]["values"]
    run_dir = Path(values["prepare"]["run_dir"])
    folder = run_dir / "variants" / "small"
    assert values["prepare"]["variants"]["small"]["run_dir"] == str(folder)
    shared = json.loads((run_dir / "manifest.json").read_text())
    own = json.loads((folder / "manifest.json").read_text())
    assert (shared["input_height"], shared["input_width"], shared["dtype"]) == (128, 160, "float32")
    assert (own["input_height"], own["input_width"], own["dtype"]) == (96, 128, "uint8")
    assert values["small.export"]["onnx_sha256"] != values["export"]["onnx_sha256"]
    atc = " ".join(values["small.convert"]["atc_args"])
    assert "1,3,96,128" in atc and "--insert_op_conf" in atc  # uint8 inputs: AIPP normalizes
    assert "--insert_op_conf" not in " ".join(values["fp16.convert"]["atc_args"])
    assert values["small.evaluate"]["images"] == values["fp16.evaluate"]["images"] == 4
    inputs = {row["variant"]: row["inputs"] for row in values["summary"]["matrix"]}
    assert inputs == {"fp16": "128x160 float32", "keep": "128x160 float32", "small": "96x128 uint8"}
    with HistoryStore(os.environ["GFOCAL_HISTORY_URL"]) as store:
        recorded = {r.config.model: r for r in store.run_records(dag.dag_id, run_id)}
    assert "96x128 uint8" in recorded["zoo_gfocal/small"].config.policy
    assert "128x160 float32" in recorded["zoo_gfocal/fp16"].config.policy
    assert recorded["zoo_gfocal/small"].onnx_sha256 == values["small.export"]["onnx_sha256"]
    again = two_nights[1]["values"]
    assert again["small.export"]["cached"] is True and again["small.convert"]["cached"] is True
    manifest = xcoms(dag.dag_id, two_nights[1]["run_id"], "manifest")
    assert manifest["small.preprocess"]["cached"] is True and manifest["preprocess"]["cached"] is True


def test_the_second_night_reuses_each_variants_om_and_judges_it_against_the_first(
    two_nights: list[dict[str, Any]],
) -> None:
    first, second = two_nights
    values = second["values"]
    for variant in ("fp16", "keep", "small"):
        assert first["values"][f"{variant}.convert"]["cached"] is False, variant
        assert values[f"{variant}.convert"]["cached"] is True, variant
        # each variant's baseline is its own first night (same configuration, `zoo_gfocal/<variant>`)
        assert values["gate"]["variants"][variant]["first_run"] is False, variant
        assert values["gate"]["variants"][variant]["baseline_runs"] == [first["run_id"]], variant
    assert second["atc_calls"] == first["atc_calls"]  # atc did not run again
    assert values["summary"]["cache"]["reference"] == {"reused": 2, "built": 0}
    assert values["export"]["cached"] is True


@pytest.fixture
def inbox(zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpInbox]:
    box = SmtpInbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    url = f"smtp://127.0.0.1:{controller.port}?disable_tls=true&disable_ssl=true"
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", url)
    monkeypatch.setenv("AIRFLOW__GFOCAL__ALERT_TO", "oncall@example.test")
    try:
        yield box
    finally:
        controller.stop()


def test_one_alert_names_the_failing_variant_and_the_fixed_expected_failure(
    zoo: dict[str, Any], inbox: SmtpInbox
) -> None:
    dag = zoo["dags"]["zoo_alerting_nightly"]
    run = dag.test()
    assert run.state == "failed"
    values = xcoms(dag.dag_id, run.run_id)
    assert "record" in values and "gate" not in values  # recorded, then the gate failed
    verdict = xcoms(dag.dag_id, run.run_id, "verdict")["gate"]
    assert verdict["failing"] == ["strict"] and verdict["now_passing"] == ["fixed"]
    published = next(c for c in verdict["variants"]["strict"]["checks"] if c["name"] == "AP vs published")
    assert not published["passed"] and published["limit"] == pytest.approx(PUBLISHED_TOO_HIGH - 0.003)
    assert len(inbox.messages) == 1
    subject = inbox.messages[0]["Subject"]
    assert "zoo_alerting" in subject and "strict (AP)" in subject
    assert "expected failure now passes: fixed" in subject
    body = inbox.messages[0].get_body(("plain",)).get_content()
    assert "ticket 123" in body and "variant strict" in body
