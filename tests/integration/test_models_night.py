"""A night of the models file on the package's Celery cluster: the three `<entry>_nightly` DAGs of
conftest's models file (GFocalV2 and RetinaNet on demo weights, a bring-your-own ONNX graph; two
precision-mode variants each) are triggered at once through the REST API and share the one emulated
NPU host (`ascend` worker, concurrency 1) through the `ascend_npu` pool. Checked: every night's summary
matrix against its own evaluate XComs, the history rows per variant in Postgres, where and how the
device tasks ran, the pool's bound and its ordering, and the trend index in headless Chromium.

How the NPU pool is shared (Airflow 3.3, `SchedulerJobRunner._executable_task_instances_to_queued`):
every scheduler loop takes the `scheduled` task instances of running, unpaused runs ordered by
`-priority_weight, dag_run.logical_date, map_index`, and queues them in that order while their pool
has open slots (a pool with no open slot is skipped: the rest wait as `scheduled`). The device tasks
carry their entry's `priority_weight` with the absolute weight rule, so a higher-weight entry's ready
device task is always queued before a lower-weight one; equal weights go by the runs' logical dates,
then shard by shard, so nights scheduled at the same time interleave. No night is starved for good:
a night's device tasks are finite, and a lower-weight night gets the NPU whenever no higher-weight
device task is ready (while those nights export, evaluate or have ended).

What is asserted holds in every interleaving (no timing assumption): all device tasks of the three
nights succeeded; the pool never held more task instances than its slots (their start/end times);
no device task was queued while a device task of a higher weight was already waiting `scheduled`
(the REST API's `scheduled_when` / `queued_when`). Whether the nights interleave on the NPU, and how
long the night took, depend on timing: they go to test-artifacts/integration/zoo-night.json only.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from browser import logged_in_chromium
from emulators.toolkit import Toolkit
from plugins.test_trend_browser import INDEX_SCRIPT, set_viewport
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from integration.api import apis as _apis
from integration.api import task_instances, trigger, wait_dags_parsed, wait_runs, xcom_key_value, xcom_value
from integration.cluster import ASCEND_HOST, CPU_HOST, Cluster
from integration.conftest import BROKEN_ENTRY, OWN_INPUTS, VARIANTS, ZOO, ZOO_SMALL, variants_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "integration"
RUN = "it-zoo-night"  # the run id of each night: RUN-<entry> (wait_runs keys the runs by run id)
NIGHT_TIMEOUT_S = 1200
WAIT_S = 45


def device_tasks(entry: str) -> set[str]:
    return {f"{variant}.{task}" for variant in variants_of(entry) for task in ("convert", "infer")}


def dag_of(entry: str) -> str:
    return f"{entry}_nightly"


def run_of(entry: str) -> str:
    return f"{RUN}-{entry}"


@dataclass
class Night:
    apis: Any
    tis: dict[str, list[Any]] = field(default_factory=dict)  # entry -> its run's task instances
    slots: int = 0  # of the ascend_npu pool
    seconds: float = 0.0  # trigger -> the last run's end

    def xcom(self, entry: str, task_id: str, map_index: int = -1) -> Any:
        return xcom_value(self.apis, dag_of(entry), run_of(entry), task_id, map_index)

    def device(self) -> list[Any]:
        """The device task instances (queue `ascend`) of every night."""
        return [ti for tis in self.tis.values() for ti in tis if ti.queue == "ascend"]


def _ensure_pool(apis: Any) -> int:
    """The `ascend_npu` pool (created here unless another module did); returns its slots."""
    import airflow_client.client as client

    from gfocal_pipeline.constants import ASCEND_POOL

    try:
        return apis.pools.get_pool(ASCEND_POOL).slots
    except client.ApiException as exc:
        if exc.status != 404:
            raise
    return apis.pools.post_pool(client.PoolBody(name=ASCEND_POOL, slots=1, description="emulated NPU")).slots


def _timeline(night: Night, triggered: datetime) -> dict[str, Any]:
    """The device tasks in start order and the interleaving (information, not asserted)."""
    device = sorted(night.device(), key=lambda ti: ti.start_date)
    order = [ti.dag_id for ti in device]
    return {
        "night_seconds": night.seconds,
        "triggered": triggered.isoformat(),
        "switches_between_nights": sum(a != b for a, b in itertools.pairwise(order)),
        "device_tasks": [
            {
                "dag_id": ti.dag_id,
                "task": f"{ti.task_id}[{ti.map_index}]",
                "weight": ti.priority_weight,
                **{
                    k: str(getattr(ti, k))
                    for k in ("scheduled_when", "queued_when", "start_date", "end_date")
                },
            }
            for ti in device
        ],
    }


@pytest.fixture(scope="module")
def night(cluster: Cluster, api: Any, toolkit: Toolkit) -> Night:
    """The three nights, triggered at once, all ended (each must succeed)."""
    import airflow_client.client as client

    from gfocal_pipeline.constants import ASCEND_QUEUE

    result = Night(_apis(api))
    apis, runs = result.apis, [(dag_of(entry), run_of(entry)) for entry in ZOO]
    wait_dags_parsed(apis, cluster, [dag_id for dag_id, _ in runs])
    result.slots = _ensure_pool(apis)
    if "worker-ascend" not in cluster.services:  # test_celery_deployment leaves its worker running
        env = {"GFOCAL_CANN_SET_ENV": str(toolkit.set_env)}
        cluster.start_worker("worker-ascend", ASCEND_QUEUE, ASCEND_HOST, concurrency=1, **env)
    for dag_id, _ in runs:
        apis.dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=False))
    triggered, start = datetime.now(UTC), time.monotonic()
    for dag_id, run_id in runs:
        trigger(apis, dag_id, run_id, {})  # the entry's own options: the DAG's defaults
    wait_runs(apis, cluster, runs, timeout=NIGHT_TIMEOUT_S)
    polled = time.monotonic() - start
    ends = [apis.runs.get_dag_run(dag_id, run_id).end_date for dag_id, run_id in runs]
    result.seconds = max(end for end in ends if end is not None).timestamp() - triggered.timestamp()
    assert 0 < result.seconds <= polled + 5
    result.tis = {entry: task_instances(apis, dag_of(entry), run_of(entry)) for entry in ZOO}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "zoo-night.json").write_text(json.dumps(_timeline(result, triggered), indent=1))
    return result


def test_the_models_file_parses_into_three_nightlies_without_import_errors(night: Night) -> None:
    errors = night.apis.import_errors.get_import_errors(limit=100).import_errors
    assert not errors, [(e.filename, e.stack_trace[-500:]) for e in errors]
    for entry, tis in night.tis.items():
        assert {ti.state.value for ti in tis} == {"success"}, entry
        tasks = {ti.task_id for ti in tis}
        assert {f"{v}.{t}" for v in variants_of(entry) for t in ("convert", "infer", "evaluate")} <= tasks
        assert {"export", "preprocess", "evaluate_reference", "summary", "record", "gate"} <= tasks
        own = (
            {f"{OWN_INPUTS[entry]['name']}.{t}" for t in ("export", "preprocess")}
            if entry in OWN_INPUTS
            else set()
        )
        assert {t for t in tasks if t.endswith((".export", ".preprocess"))} == own, entry


def test_a_bad_entry_is_a_dag_whose_description_names_the_entry_and_field(night: Night, api: Any) -> None:
    """What the UI's DAG list shows (the REST API it reads): the placeholder's description, its tag."""
    import airflow_client.client as client

    dag = night.apis.dags.get_dag(dag_of(BROKEN_ENTRY))
    assert dag.description.startswith("BROKEN models file entry: models file ")
    assert f"entry {len(ZOO) + 1} ('{BROKEN_ENTRY}')" in dag.description
    assert "field 'variants.0.batch'" in dag.description and "did you mean 'batch_size'?" in dag.description
    assert "models-file-error" in {tag.name for tag in dag.tags}
    tasks = client.TaskApi(api).get_tasks(dag_of(BROKEN_ENTRY)).tasks
    assert [task.task_id for task in tasks] == ["models_file_error"]


@pytest.mark.parametrize("entry", list(ZOO))
def test_the_summary_matrix_holds_each_variant_as_evaluated(night: Night, entry: str) -> None:
    """One row per variant, its numbers those of the variant's own evaluate XCom and the reference's."""
    matrix = night.xcom(entry, "summary")["matrix"]
    variants = variants_of(entry)
    assert [row["variant"] for row in matrix] == list(variants)
    reference = night.xcom(entry, "evaluate_reference")["stats"]["AP"]
    published = night.xcom(entry, "prepare").get("published_ap")
    for row in matrix:
        name = row["variant"]
        evaluated = night.xcom(entry, f"{name}.evaluate")
        ap, timing = evaluated["stats"]["AP"], evaluated["timing"]
        assert 0 <= ap <= 1 and row["AP"] == ap, name
        assert row["dAP_reference"] == pytest.approx(ap - reference), name
        assert row["dAP_published"] == (None if published is None else pytest.approx(ap - published))
        assert row["fps"] == timing["fps"] and row["fps"] > 0, name
        assert row["p99_ms"] == timing["latency_ms"]["p99"] and row["p99_ms"] > 0, name
        assert (row["precision_mode"], row["batch_size"]) == (variants[name], 1), name
        assert row["expected_failure"] is None
        atc = night.xcom(entry, f"{name}.convert")["atc_args"]
        assert f"--precision_mode={variants[name]}" in atc, atc
    verdict = xcom_key_value(night.apis, (dag_of(entry), run_of(entry)), "gate", "verdict")
    assert set(verdict["variants"]) == set(variants)
    assert verdict["failing"] == [] and verdict["now_passing"] == []


def test_a_variant_that_changes_the_inputs_ran_its_own_export_and_preprocessing(night: Night) -> None:
    """it_retina's `small` (96x96): its own graph and inputs, made on the CPU worker, run on the NPU."""
    ((entry, own),) = OWN_INPUTS.items()
    name, size = own["name"], f"{own['height']}x{own['width']}"
    shared = f"{ZOO_SMALL['height']}x{ZOO_SMALL['width']}"
    inputs = {row["variant"]: row["inputs"] for row in night.xcom(entry, "summary")["matrix"]}
    assert inputs == {**dict.fromkeys(VARIANTS, f"{shared} float32"), name: f"{size} float32"}
    export, run_export = night.xcom(entry, f"{name}.export"), night.xcom(entry, "export")
    assert export["onnx_sha256"] != run_export["onnx_sha256"]
    assert f",{own['height']},{own['width']}" in " ".join(night.xcom(entry, f"{name}.convert")["atc_args"])
    prepared = night.xcom(entry, "prepare")
    assert night.xcom(entry, f"{name}.evaluate")["images"] == ZOO_SMALL["max_images"]
    assert prepared["variants"][name]["own_inputs"] is True
    assert not any(prepared["variants"][v]["own_inputs"] for v in VARIANTS)
    tis = {ti.task_id: ti for ti in night.tis[entry] if ti.map_index in (-1, None)}
    for task_id in (f"{name}.export", f"{name}.preprocess"):
        assert (tis[task_id].queue, tis[task_id].hostname) == ("default", CPU_HOST), task_id


def test_the_bring_your_own_graph_has_detections_to_score(night: Night) -> None:
    """The toy graph hits part of its own ground truth: its AP is neither 0 nor 1, on both sides."""
    (byo,) = [entry for entry, (adapter, _) in ZOO.items() if adapter == "onnx"]
    for task_id in ("evaluate_reference", *(f"{v}.evaluate" for v in VARIANTS)):
        assert 0.05 < night.xcom(byo, task_id)["stats"]["AP"] < 0.95, task_id


@pytest.mark.parametrize("entry", list(ZOO))
def test_history_rows_per_variant_and_the_reference(night: Night, cluster: Cluster, entry: str) -> None:
    from gfocal_pipeline.history import HistoryStore

    with HistoryStore(cluster.pg_url(cluster.history_db)) as store:
        rows = {r.config.model: r for r in store.run_records(dag_of(entry), run_of(entry))}
    assert set(rows) == {f"{entry}/{name}" for name in (*variants_of(entry), "reference")}
    for name in variants_of(entry):
        row = rows[f"{entry}/{name}"]
        assert row.stats["AP"] == pytest.approx(night.xcom(entry, f"{name}.evaluate")["stats"]["AP"])
        assert row.verdict == "pass", row.verdict_detail
    reference = night.xcom(entry, "evaluate_reference")["stats"]["AP"]
    assert rows[f"{entry}/reference"].stats["AP"] == pytest.approx(reference)


def test_device_tasks_ran_on_the_npu_host_in_the_pool_with_the_entry_weight(night: Night) -> None:
    from gfocal_pipeline.constants import ASCEND_POOL

    for entry, (_, weight) in ZOO.items():
        device = [ti for ti in night.tis[entry] if ti.queue == "ascend"]
        assert {ti.task_id for ti in device} == device_tasks(entry), entry
        for ti in device:
            assert (ti.hostname, ti.pool, ti.priority_weight) == (ASCEND_HOST, ASCEND_POOL, weight), ti
        for variant in variants_of(entry):
            shards = sorted(ti.map_index for ti in device if ti.task_id == f"{variant}.infer")
            assert shards == [0, 1], (entry, variant)
        others = [ti for ti in night.tis[entry] if ti.queue != "ascend"]
        assert {(ti.queue, ti.hostname) for ti in others} == {("default", CPU_HOST)}, entry


def test_the_npu_pool_never_ran_more_than_its_slots(night: Night) -> None:
    """Sweep over the device tasks' [start, end] (an end sorts before a start at the same instant)."""
    device = night.device()
    assert {ti.dag_id for ti in device} == {dag_of(entry) for entry in ZOO}
    events = sorted([(ti.start_date, 1) for ti in device] + [(ti.end_date, -1) for ti in device])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert 1 <= most <= night.slots, f"{most} device tasks at once in a pool of {night.slots}"


def test_no_device_task_was_queued_while_a_higher_weight_one_waited(night: Night) -> None:
    """The pool's ordering: whenever a device task was queued, no device task of a higher weight
    was `scheduled` (ready, waiting for a slot) since before that moment and queued only after it."""
    device = night.device()
    assert all(ti.scheduled_when and ti.queued_when for ti in device)
    for low in device:
        for high in device:
            if high.priority_weight <= low.priority_weight:
                continue
            waited = high.scheduled_when < low.queued_when < high.queued_when
            assert not waited, (
                f"{low.dag_id} {low.task_id}[{low.map_index}] (weight {low.priority_weight}) was queued at "
                f"{low.queued_when} while {high.dag_id} {high.task_id}[{high.map_index}] (weight "
                f"{high.priority_weight}) waited from {high.scheduled_when} to {high.queued_when}"
            )


@pytest.fixture(scope="module")
def browser(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless system Chromium, logged in through the simple auth manager's login page."""
    folder = tmp_path_factory.mktemp("chromium")
    with logged_in_chromium(
        cluster.base_url, f"{cluster.base_url}/gfocal/", cluster.password, folder, WAIT_S
    ) as driver:
        yield driver


def test_the_trend_index_shows_every_entry_and_variant_in_chromium(
    night: Night, cluster: Cluster, browser: webdriver.Chrome
) -> None:
    """The index (one row per entry and variant) in Chromium, each variant with the night's verdict and
    AP; screenshot to test-artifacts/, and to $GFOCAL_DOCS_NIGHT_SCREENSHOT (docs/zoo-night.png)."""
    url = f"{cluster.base_url}/gfocal/"
    browser.get(url)
    try:
        WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script(INDEX_SCRIPT))
    except TimeoutException:
        raise AssertionError(f"no index rows at {browser.current_url}") from None
    rows = {(r["entry"], r["variant"]): r for r in browser.execute_script(INDEX_SCRIPT)}
    for entry in ZOO:
        (model,) = cluster.get_json(f"/gfocal/api/models?model={entry}", cluster.token())["models"]
        assert {row["latest"]["run_id"] for row in model["variants"]} == {run_of(entry)}, entry
        assert {variant for e, variant in rows if e == entry} == {*variants_of(entry), "reference"}, entry
        for variant in variants_of(entry):
            cells = rows[entry, variant]["cells"]
            ap = night.xcom(entry, f"{variant}.evaluate")["stats"]["AP"]
            assert (cells["verdict"], cells["num ap"]) == ("PASS", f"{ap:.4f}"), (entry, variant)
            assert rows[entry, variant]["spark"]["width"] >= 100
    set_viewport(
        browser, browser.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom) + 24")
    )
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / "zoo-night.png"
        assert browser.save_screenshot(str(path)), f"screenshot {path} failed"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert path.stat().st_size > 10_000
    if os.environ.get("GFOCAL_DOCS_NIGHT_SCREENSHOT"):  # regenerate the docs' image: =docs/zoo-night.png
        shutil.copyfile(path, ROOT / os.environ["GFOCAL_DOCS_NIGHT_SCREENSHOT"])
