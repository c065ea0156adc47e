"""The Airflow UI's trigger form of both DAGs in a real browser (headless Debian Chromium through
/usr/bin/chromedriver, as tests/plugins/test_trend_browser.py), against the integration cluster's
api-server: submitted with its defaults it creates a run with exactly the DAG's defaults; a relative
`coco_root` is refused and creates no run.

The DAGs are paused first and "Unpause on trigger" is unticked, so the runs the form creates stay
queued (a full-size run with the demo data is not what this test is about). Screenshots of both forms
go to test-artifacts/; with GFOCAL_DOCS_SCREENSHOTS=1 also to docs/trigger-form-*.png.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import logged_in_chromium
from selenium import webdriver  # the dev extra; a missing install must fail, not skip
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from integration.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "integration"
WAIT_S = 45
FORMS = {
    "gfocal_onnxruntime": "trigger-form-onnxruntime.png",
    "gfocal_ascend_nightly": "trigger-form-ascend.png",
}
RELATIVE = "data/coco"


@pytest.fixture(scope="module")
def paused(cluster: Cluster, api: Any) -> Any:
    """Both DAGs parsed and paused; returns the client's DagRunApi."""
    import airflow_client.client as client

    dags, deadline = client.DAGApi(api), time.monotonic() + 180
    while {d.dag_id for d in dags.get_dags(limit=100).dags} < set(FORMS):
        assert time.monotonic() < deadline, "DAGs not parsed"
        cluster.check_alive()
        time.sleep(2)
    for dag_id in FORMS:
        dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=True))
    return client.DagRunApi(api)


@pytest.fixture(scope="module")
def browser(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless system Chromium, logged in through the simple auth manager's login page."""
    folder = tmp_path_factory.mktemp("chromium")
    with logged_in_chromium(
        cluster.base_url, f"{cluster.base_url}/", cluster.password, folder, WAIT_S
    ) as driver:
        yield driver


def open_trigger_form(driver: webdriver.Chrome, cluster: Cluster, dag_id: str) -> WebElement:
    """The DAG page's Trigger dialog, with "Unpause on trigger" unticked; returns its Trigger button."""
    driver.get(f"{cluster.base_url}/dags/{dag_id}")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']"))
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
    wait.until(lambda d: d.find_elements(By.NAME, "element_coco_root"))
    unpause = driver.find_element(By.XPATH, "//label[contains(., 'Unpause')]")
    box = unpause.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
    if box.is_selected():
        unpause.click()
    wait.until(lambda d: not box.is_selected())
    return submit_button(driver)


def submit_button(driver: webdriver.Chrome) -> WebElement:
    buttons = driver.find_elements(By.CSS_SELECTOR, "[role=dialog] button")
    buttons = [b for b in buttons if b.text == "Trigger"]
    assert buttons, "no Trigger button in the dialog"
    return buttons[-1]


def run_ids(runs: Any, dag_id: str) -> set[str]:
    return {run.dag_run_id for run in runs.get_dag_runs(dag_id, limit=100).dag_runs}


def form_screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """The whole dialog: a viewport as tall as its content, then back to the window size."""
    height = driver.execute_script(  # the dialog scrolls inside a fixed positioner: its content height
        "return Math.max(...Array.from(document.querySelectorAll('[role=dialog], [role=dialog] *'))"
        ".map(e => e.scrollHeight)) + 160;"
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": min(int(height), 6000), "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert path.stat().st_size > 10_000
    if os.environ.get("GFOCAL_DOCS_SCREENSHOTS"):
        shutil.copyfile(path, ROOT / "docs" / name)
    return path


@pytest.mark.parametrize("dag_id", list(FORMS))
def test_trigger_form_submits_with_its_defaults(
    browser: webdriver.Chrome, cluster: Cluster, api: Any, paused: Any, dag_id: str
) -> None:
    import airflow_client.client as client

    from gfocal_pipeline.run_config import FORM_SECTIONS

    before = run_ids(paused, dag_id)
    button = open_trigger_form(browser, cluster, dag_id)
    form_screenshot(browser, FORMS[dag_id])
    lines = "\n".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "[role=dialog]")).splitlines()
    shown = [line for line in lines if line in FORM_SECTIONS]  # the sections' headers, in page order
    expected = [s for s in FORM_SECTIONS if s != "Ascend" or dag_id == "gfocal_ascend_nightly"]
    assert shown == expected, f"the form's sections: {shown}"
    # the default section is open: its first field can be typed into
    assert browser.find_element(By.NAME, "element_checkpoint").is_displayed()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    try:
        WebDriverWait(browser, WAIT_S).until(lambda _: run_ids(paused, dag_id) - before)
    except TimeoutException:
        dialog = " | ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "[role=dialog]"))
        raise AssertionError(f"{dag_id}: the form created no run; dialog says: {dialog[-2000:]}") from None
    (new,) = run_ids(paused, dag_id) - before
    run = paused.get_dag_run(dag_id, new)
    defaults = {
        name: param.get("value") if isinstance(param, dict) else param
        for name, param in client.DAGApi(api).get_dag_details(dag_id).params.items()
    }
    assert run.conf == defaults, (run.conf, defaults)
    assert run.state.value == "queued" and client.DAGApi(api).get_dag(dag_id).is_paused


@pytest.mark.parametrize("dag_id", list(FORMS))
def test_trigger_form_refuses_a_relative_coco_root(
    browser: webdriver.Chrome, cluster: Cluster, paused: Any, dag_id: str
) -> None:
    before = run_ids(paused, dag_id)
    button = open_trigger_form(browser, cluster, dag_id)
    field = browser.find_element(By.NAME, "element_coco_root")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(RELATIVE)
    assert field.get_attribute("value") == RELATIVE
    if button.is_enabled():
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
    try:  # the server validates the params against the form's JSON schema and answers 400
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_elements(By.XPATH, "//*[contains(text(), 'Failed to Trigger')]")
        )
    except TimeoutException:
        raise AssertionError(f"{dag_id}: no refusal shown for coco_root={RELATIVE!r}") from None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / FORMS[dag_id].replace(".png", "-relative-path.png")))
    time.sleep(3)  # long enough for a run to show up had it been accepted
    assert run_ids(paused, dag_id) == before, f"{dag_id}: a run was created with coco_root={RELATIVE!r}"
    assert browser.find_elements(By.NAME, "element_coco_root"), "the form closed"


@pytest.mark.parametrize("dag_id", list(FORMS))
def test_the_api_names_the_refused_relative_path(api: Any, paused: Any, dag_id: str) -> None:
    """What the form's "Bad Request" is: the param's absolute-path pattern, named in the 400."""
    import airflow_client.client as client

    body = client.TriggerDAGRunPostBody(conf={"coco_root": RELATIVE})
    with pytest.raises(client.ApiException) as info:
        paused.trigger_dag_run(dag_id, body)
    assert info.value.status == 400
    assert "coco_root" in str(info.value.body) and RELATIVE in str(info.value.body), info.value.body
