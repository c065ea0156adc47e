"""Acceptance test of the trend pages in a real browser: a real `airflow api-server` (own AIRFLOW_HOME,
migrated SQLite, `[api] base_url` with a path prefix, simple auth manager) serves the plugin on a free
loopback port; headless Debian Chromium, driven by Selenium through /usr/bin/chromedriver, logs in
through Airflow's login page, opens the index of models and the model pages directly and through the
Airflow UI's Browse menu, checks the index rows, the sparklines and the plots (one line per variant,
AP and fps per configuration) against the recorded history (DOM and screenshot pixels), opens one
run's regression report (a real report folder, found through the run's history row) from its link
and directly, and saves screenshots under test-artifacts/.

Chromium comes from the system packages (`apt-get install chromium chromium-driver`), never from a
download: the driver path is passed explicitly, so Selenium Manager is not used.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import cv2
import pytest
from browser import headless_chromium, log_in
from report_fixtures import make_report_run
from selenium import webdriver  # the dev extra; a missing install must fail, not skip
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gfocal_pipeline.history import ConfigKey, HistoryStore, RunRecord, model_key

pytestmark = [pytest.mark.slow, pytest.mark.airflow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
PREFIX = "/prefix"
SERVER_START_TIMEOUT_S = 150
WAIT_S = 30

DAG_ID = "gfocal_ascend_nightly"
DATASET = "ann:0123456789abcdef+img:fedcba9876543210"
CONFIG = ConfigKey("gfocal_r50_fpn_1x", "msame", "Ascend310P3", "fp16", 1, "modelzoo", DATASET)
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
# Ten nightly runs, oldest first: (AP, fps, passed). Night 8 regresses on both metrics.
RUNS = [
    (0.4049, 34.12, True),
    (0.4052, 33.95, True),
    (0.4050, 34.31, True),
    (0.4047, 34.08, True),
    (0.4053, 33.87, True),
    (0.4051, 34.22, True),
    (0.4048, 34.05, True),
    (0.3912, 28.40, False),
    (0.4050, 34.18, True),
    (0.4054, 34.26, True),
]
RUN_IDS = [f"scheduled__{(T0 + timedelta(days=i)).isoformat()}" for i in range(len(RUNS))]
FAILED_RUN = RUN_IDS[7]
REPORT_PATH = f"gfocal/runs/{DAG_ID}/{quote(FAILED_RUN, safe='')}/report/"  # the failed night has one
# the failed night's gate verdict (the keys of gate.evaluate that the report shows)
FAILED_VERDICT = {
    "passed": False,
    "dag_id": DAG_ID,
    "run_id": FAILED_RUN,
    "label": CONFIG.label,
    "regressed": ["AP", "fps"],
    "notes": [],
}


# Model zoo rows (`<entry>/<variant>`): per (entry, variant) its nights, oldest first: (AP, fps, passed).
# gfocalv2_r50/fp16 regresses on night 4, retinanet_r50 on its last night (FAIL in the index).
ZOO_DAG = "gfocal_zoo_nightly"
ZOO = {
    ("gfocalv2_r50", "fp16"): [
        (0.4046, 61.2, True),
        (0.4049, 60.8, True),
        (0.4044, 61.5, True),
        (0.3870, 52.3, False),
        (0.4047, 61.0, True),
        (0.4048, 61.3, True),
    ],
    ("gfocalv2_r50", "keep"): [
        (0.4062, 18.4, True),
        (0.4060, 18.9, True),
        (0.4063, 18.6, True),
        (0.4061, 18.2, True),
        (0.4059, 18.7, True),
        (0.4064, 18.5, True),
    ],
    ("retinanet_r50", "fp16"): [(0.3621, 44.0, True), (0.3618, 43.6, True), (0.3561, 44.3, False)],
}
PRECISION = {"fp16": "force_fp16", "keep": "must_keep_origin_dtype"}
ZOO_ENTRY = "gfocalv2_r50"  # the model page of the docs' screenshot


def zoo_config(entry: str, variant: str) -> ConfigKey:
    return ConfigKey(
        model_key(entry, variant), "msame", "Ascend310P3", PRECISION[variant], 1, "modelzoo", DATASET
    )


def zoo_run_id(entry: str, variant: str, night: int) -> str:
    # unique across variants, so that a run id names one point (FAILED_RUNS)
    return f"scheduled__{entry}__{variant}__{(T0 + timedelta(days=night)).date()}"


def zoo_nights() -> dict[tuple[str, str], list[tuple[str, float, float, bool]]]:
    """Per (entry, variant): (run id, AP, fps, passed) per night, oldest first."""
    return {
        key: [(zoo_run_id(*key, n), *night) for n, night in enumerate(nights)] for key, nights in ZOO.items()
    }


FAILED_RUNS = {FAILED_RUN} | {run for nights in zoo_nights().values() for run, *_, ok in nights if not ok}


@dataclass(frozen=True)
class Server:
    base: str  # e.g. http://127.0.0.1:PORT/prefix
    username: str
    password: str
    log: Path


def record_history(url: str, report_run_dir: Path) -> None:
    """The recorded runs the page must show (plain data, independent of the page code); the failed
    night's verdict names `report_run_dir`, whose report/ the report page serves."""
    with HistoryStore(url) as store:
        for i, (run_id, (ap, fps, passed)) in enumerate(zip(RUN_IDS, RUNS, strict=True)):
            store.record(
                RunRecord(
                    DAG_ID,
                    run_id,
                    CONFIG,
                    {"AP": ap, "AP50": ap + 0.178, "AP75": ap + 0.031},
                    T0 + timedelta(days=i, minutes=47),
                    fps=fps,
                    latency_ms={"p50": 1000 / fps, "p99": 1150 / fps},
                    images=5000,
                    ap_delta=round(ap - 0.4050, 4),
                )
            )
            detail = {"passed": passed, "regressed": [] if passed else ["AP", "fps"], "notes": []}
            if run_id == FAILED_RUN:
                detail = {**FAILED_VERDICT, "run_dir": str(report_run_dir)}
            store.set_verdict(DAG_ID, run_id, CONFIG, detail)
        for (entry, variant), nights in zoo_nights().items():
            config = zoo_config(entry, variant)
            for night, (run_id, ap, fps, passed) in enumerate(nights):
                finished = T0 + timedelta(days=night, hours=1, minutes=len(variant))
                store.record(RunRecord(ZOO_DAG, run_id, config, {"AP": ap}, finished, fps=fps, images=5000))
                detail = {"passed": passed, "regressed": [] if passed else ["AP", "fps"], "notes": []}
                store.set_verdict(ZOO_DAG, run_id, config, detail)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate the process group started with start_new_session=True; kill it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def wait_healthy(process: subprocess.Popen, url: str, log: Path) -> bool:
    """True once `url` answers 200 with a healthy metadatabase; False if the server exited first."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if json.load(response)["metadatabase"]["status"] == "healthy":
                    return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"api-server not healthy at {url} after {SERVER_START_TIMEOUT_S}s:\n{tail(log)}")


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`airflow api-server` with the project's plugins, behind base_url prefix /prefix."""
    tmp = tmp_path_factory.mktemp("airflow-browser")
    home, dags = tmp / "airflow", tmp / "dags"
    home.mkdir()
    dags.mkdir()
    history_url = f"sqlite:///{tmp / 'history.sqlite'}"
    record_history(history_url, make_report_run(tmp / "report-run", verdict=FAILED_VERDICT))
    password = secrets.token_urlsafe(12)
    (tmp / "passwords.json").write_text(json.dumps({"admin": password}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "GFOCAL_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(24),
            "GFOCAL_HISTORY_URL": history_url,
        }
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    log = tmp / "api-server.log"
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        base = f"http://127.0.0.1:{port}{PREFIX}"
        env["AIRFLOW__API__BASE_URL"] = base
        with log.open("w") as out:
            process = subprocess.Popen(
                [airflow, "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            if wait_healthy(process, f"{base}/api/v2/monitor/health", log):
                yield Server(base, "admin", password, log)
                return
            if "address already in use" not in tail(log).lower():
                raise AssertionError(f"api-server exited with {process.returncode}:\n{tail(log)}")
        finally:
            stop(process)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copyfile(log, ARTIFACTS / "trend_api_server.log")  # for CI debugging
    raise AssertionError(f"api-server could not bind a free port:\n{tail(log)}")


@pytest.fixture(scope="module")
def browser(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless system Chromium, logged in through the simple auth manager's login page."""
    profile, logs = tmp_path_factory.mktemp("chromium-profile"), tmp_path_factory.mktemp("chromedriver")
    driver = headless_chromium(profile, logs / "log", "1280,800", WAIT_S)
    try:
        login(driver, server)
        yield driver
    finally:
        driver.quit()


def login(driver: webdriver.Chrome, server: Server) -> None:
    try:
        log_in(driver, server.base, f"{server.base}/gfocal/", server.username, server.password, WAIT_S)
        WebDriverWait(driver, WAIT_S).until(lambda d: d.current_url == f"{server.base}/gfocal/")
    except TimeoutException:
        raise AssertionError(f"login did not reach the trend page: {driver.current_url}") from None


# Per chart: its box and, per point, run id, value, screen box and computed fill.
CHART_SCRIPT = """
return Array.from(document.querySelectorAll('section.config svg.chart')).map(svg => ({
  series: svg.dataset.series,
  box: svg.getBoundingClientRect().toJSON(),
  polyline: (svg.querySelector('polyline.series') || {getAttribute: () => ''}).getAttribute('points'),
  points: Array.from(svg.querySelectorAll('circle')).map(c => ({
    run: c.dataset.runId, value: parseFloat(c.dataset.value),
    title: c.querySelector('title').textContent,
    box: c.getBoundingClientRect().toJSON(), fill: getComputedStyle(c).fill})),
}));
"""


def check_charts(driver: webdriver.Chrome) -> list[dict]:
    """Both series are drawn, one visible point per recorded run, in time order, at heights that
    follow the recorded values; returns the chart data for pixel checks."""
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "section.config svg.chart circle")
    )
    charts = driver.execute_script(CHART_SCRIPT)
    assert sorted(c["series"] for c in charts) == ["AP", "fps"]
    for chart in charts:
        column = 0 if chart["series"] == "AP" else 1
        points = chart["points"]
        assert [p["run"] for p in points] == RUN_IDS
        assert [p["value"] for p in points] == pytest.approx([run[column] for run in RUNS])
        assert len(chart["polyline"].split()) == len(RUNS)
        box = chart["box"]
        assert box["width"] > 300 and box["height"] > 100
        for p in points:
            assert p["run"] in p["title"]
            b = p["box"]
            assert b["width"] > 0 and b["height"] > 0
            assert box["left"] <= b["left"] and b["right"] <= box["right"]
            assert box["top"] <= b["top"] and b["bottom"] <= box["bottom"]
        xs = [p["box"]["x"] for p in points]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
        by_value = sorted(points, key=lambda p: p["value"])
        ys = [p["box"]["y"] for p in by_value]  # larger value -> higher on screen (smaller y)
        assert ys == sorted(ys, reverse=True)
        assert by_value[0]["run"] == FAILED_RUN  # the regression is the lowest point of both series
    return charts


# Per variant chart: its box and, per line, the variant, its computed stroke colour and its points.
VARIANT_SCRIPT = """
return Array.from(document.querySelectorAll('svg.chart.variants')).map(svg => ({
  series: svg.dataset.series,
  box: svg.getBoundingClientRect().toJSON(),
  lines: Array.from(svg.querySelectorAll('polyline')).map(l => ({
    variant: l.dataset.variant, stroke: getComputedStyle(l).stroke,
    points: Array.from(svg.querySelectorAll('circle')).filter(c => c.dataset.variant === l.dataset.variant)
      .map(c => ({run: c.dataset.runId, value: parseFloat(c.dataset.value),
                  box: c.getBoundingClientRect().toJSON()}))})),
}));
"""
# Per index row: entry, variant, the text of its cells by class, its sparkline's box and point count.
INDEX_SCRIPT = """
return Array.from(document.querySelectorAll('tr.variant-row')).map(tr => ({
  entry: tr.dataset.entry, variant: tr.dataset.variant,
  cells: Object.fromEntries(Array.from(tr.querySelectorAll('td')).map(td => [td.className, td.innerText])),
  spark: tr.querySelector('svg.spark').getBoundingClientRect().toJSON(),
  sparkPoints: tr.querySelector('svg.spark polyline').getAttribute('points').trim().split(/ +/).length,
}));
"""


def expected_index() -> dict[tuple[str, str], list[tuple[str, float, float, bool]]]:
    """Per (entry, variant) of the index: its nights (run id, AP, fps, passed), oldest first."""
    legacy = [(run_id, *run) for run_id, run in zip(RUN_IDS, RUNS, strict=True)]
    return {(CONFIG.model, "default"): legacy, **zoo_nights()}


def check_index(driver: webdriver.Chrome) -> None:
    """One row per model entry and variant, with the latest run's verdict, AP and fps and a visible
    sparkline of every recorded night."""
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "tr.variant-row svg.spark")
    )
    rows = {(r["entry"], r["variant"]): r for r in driver.execute_script(INDEX_SCRIPT)}
    expected = expected_index()
    assert set(rows) == set(expected)
    for key, nights in expected.items():
        row, (_, ap, fps, passed) = rows[key], nights[-1]
        assert row["cells"]["num ap"] == f"{ap:.4f}" and row["cells"]["num fps"] == f"{fps:.2f}", key
        assert row["cells"]["verdict"] == ("PASS" if passed else "FAIL")
        assert row["sparkPoints"] == len(nights)
        assert row["spark"]["width"] >= 100 and row["spark"]["height"] >= 20
    links = {a.text: a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "td.entry a")}
    base = driver.execute_script("return document.baseURI")
    assert links == {entry: f"{base}models/{entry}/" for entry, _ in expected}


def rgb(css: str) -> tuple[int, int, int]:
    """'rgb(9, 105, 218)' -> (9, 105, 218)."""
    red, green, blue = (int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return red, green, blue


def check_variant_charts(driver: webdriver.Chrome, entry: str) -> list[dict]:
    """AP and fps of model `entry`: one line per variant, in a colour of its own, one point per
    night at heights that follow the recorded values, x in time order; returns the charts in
    check_screenshot's form."""
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart.variants circle")
    )
    expected = {variant: nights for (e, variant), nights in expected_index().items() if e == entry}
    charts = []
    for chart in driver.execute_script(VARIANT_SCRIPT):
        column = 1 if chart["series"] == "AP" else 2
        lines = {line["variant"]: line for line in chart["lines"]}
        assert set(lines) == set(expected)
        strokes = {variant: rgb(line["stroke"]) for variant, line in lines.items()}
        assert len(set(strokes.values())) == len(strokes)
        for variant, nights in expected.items():
            points = lines[variant]["points"]
            assert [p["run"] for p in points] == [night[0] for night in nights]
            assert [p["value"] for p in points] == pytest.approx([night[column] for night in nights])
        points = [p for line in chart["lines"] for p in line["points"]]
        by_value = sorted(points, key=lambda p: p["value"])
        ys = [p["box"]["y"] for p in by_value]
        assert ys == sorted(ys, reverse=True)
        charts.append({"series": chart["series"], "box": chart["box"], "points": points, "strokes": strokes})
    assert sorted(c["series"] for c in charts) == ["AP", "fps"]
    return charts


def rgb_at(image, box: dict) -> tuple[int, int, int]:
    blue, green, red = (
        int(v) for v in image[round(box["y"] + box["height"] / 2), round(box["x"] + box["width"] / 2)]
    )
    return red, green, blue


def check_screenshot(path: Path, charts: list[dict]) -> None:
    """The PNG is a real, non-blank rendering: every point's centre pixel has the verdict colour
    (red for the failed runs, green for passing runs) and the series lines are drawn between them
    (blue for a configuration's chart; each variant's own colour for a variant chart)."""
    assert path.stat().st_size > 10_000
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] >= 1000 and image.shape[0] >= 600
    assert float(image.std()) > 10  # not a blank page
    for chart in charts:
        for point in chart["points"]:
            red, green, blue = rgb_at(image, point["box"])
            if point["run"] in FAILED_RUNS:
                assert red > green + 80 and red > blue + 80, (point["run"], (red, green, blue))
            else:
                assert green > red + 40 and green > blue + 30, (point["run"], (red, green, blue))
        box = chart["box"]
        crop = image[int(box["top"]) : int(box["bottom"]), int(box["left"]) : int(box["right"])].astype(int)
        if "strokes" not in chart:  # a configuration's chart: its one blue line
            line = (crop[:, :, 0] > crop[:, :, 2] + 100).sum()  # blue-dominant pixels
            assert line > 200, f"{chart['series']} line not drawn ({line} blue pixels)"
        for variant, (red, green, blue) in chart.get("strokes", {}).items():  # each in its colour
            line = (abs(crop - (blue, green, red)).sum(axis=2) < 60).sum()
            assert line > 150, f"{chart['series']} {variant} line not drawn ({line} pixels of its colour)"


def set_viewport(driver: webdriver.Chrome, height: int | None = None) -> None:
    """Viewport 1280 x `height` CSS px at scale 1; default: as tall as the page (bounded), so one
    screenshot holds all of it. Screenshots are taken at this size, independent of the window."""
    if height is None:
        height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 4000)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def save_screenshot(driver: webdriver.Chrome, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    return path


def test_login_is_required(server: Server):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{server.base}/gfocal/", timeout=10)
    assert info.value.code == 401


def test_model_page_in_chromium_shows_ap_and_fps_of_every_run(browser: webdriver.Chrome, server: Server):
    browser.get(f"{server.base}/gfocal/models/{CONFIG.model}/")
    assert browser.title == f"GFocal trends: {CONFIG.model}"
    check_charts(browser)
    check_variant_charts(browser, CONFIG.model)  # its one variant, 'default' (a model of the older DAGs)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert CONFIG.label in text and f"Dataset {DATASET}" in text  # short in the label, whole below
    for ap, fps, _ in RUNS:
        assert f"{ap:.4f}" in text and f"{fps:.2f}" in text
    passed = sum(run[2] for run in RUNS)
    assert text.count("FAIL") == 1 and text.count("PASS") == passed + 1  # table rows + latest badge
    # Run links are relative and land on the Airflow run page under the prefix.
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "table a")]
    assert all(f"/{ZOO_DAG}/" not in href for href in hrefs)  # this model's runs only
    assert f"{server.base}/dags/{DAG_ID}/runs/{FAILED_RUN.replace(':', '%3A').replace('+', '%2B')}" in hrefs
    set_viewport(browser)
    try:
        charts = check_charts(browser)  # positions in the screenshot's layout
        path = save_screenshot(browser, "trend_page.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    check_screenshot(path, charts)


def test_index_in_chromium_links_a_page_per_model(browser: webdriver.Chrome, server: Server):
    browser.get(f"{server.base}/gfocal/")
    assert browser.title == "GFocal trends"
    check_index(browser)
    set_viewport(browser)
    try:
        check_index(browser)
        path = save_screenshot(browser, "trend_index.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] == 1280 and float(image.std()) > 10
    browser.find_element(By.LINK_TEXT, ZOO_ENTRY).click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.current_url == f"{server.base}/gfocal/models/{ZOO_ENTRY}/"
    )
    check_variant_charts(browser, ZOO_ENTRY)
    legend = [li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "ul.legend li")]
    assert legend == sorted(variant for entry, variant in ZOO if entry == ZOO_ENTRY)
    zoo_configs = {zoo_config(entry, variant).label for entry, variant in ZOO if entry == ZOO_ENTRY}
    assert {h.text for h in browser.find_elements(By.CSS_SELECTOR, "section.config h2")} == zoo_configs
    set_viewport(browser)
    try:
        charts = check_variant_charts(browser, ZOO_ENTRY)
        path = save_screenshot(browser, "trend_model_page.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    check_screenshot(path, charts)
    browser.find_element(By.LINK_TEXT, "All models").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.current_url == f"{server.base}/gfocal/")


def test_trend_page_through_the_airflow_browse_menu(browser: webdriver.Chrome, server: Server):
    set_viewport(browser, 860)
    try:
        open_through_menu(browser, server)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def open_through_menu(browser: webdriver.Chrome, server: Server) -> None:
    browser.get(f"{server.base}/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label=Browse]"))
    browser.find_element(By.CSS_SELECTOR, "button[aria-label=Browse]").click()
    item = wait.until(
        lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, "[role=menuitem]") if e.text == "GFocal trends"),
            None,
        )
    )
    assert item.get_attribute("href") == f"{server.base}/plugin/gfocal-trends"
    item.click()
    frame = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "iframe")), None))
    assert frame.get_attribute("src") == f"{server.base}/gfocal/"
    assert browser.current_url.startswith(f"{server.base}/plugin/gfocal-trends")
    browser.switch_to.frame(frame)
    try:
        check_index(browser)  # the frame opens on the index of models
    finally:
        browser.switch_to.default_content()
    path = save_screenshot(browser, "trend_index_airflow.png")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and float(image.std()) > 10
    if os.environ.get("GFOCAL_DOCS_INDEX_SCREENSHOT"):  # regenerate docs/quality.md's =docs/trend-index.png
        shutil.copyfile(path, ROOT / os.environ["GFOCAL_DOCS_INDEX_SCREENSHOT"])
    browser.switch_to.frame(frame)
    try:  # a model's link opens its page inside the frame
        browser.find_element(By.LINK_TEXT, ZOO_ENTRY).click()
        charts = check_variant_charts(browser, ZOO_ENTRY)
        assert browser.execute_script("return location.href") == f"{server.base}/gfocal/models/{ZOO_ENTRY}/"
    finally:
        browser.switch_to.default_content()
    dx, dy = browser.execute_script(
        "const f = arguments[0], r = f.getBoundingClientRect();"
        "return [r.left + f.clientLeft, r.top + f.clientTop];",
        frame,
    )
    for chart in charts:  # frame-relative boxes -> page coordinates for the pixel checks
        for box in [chart["box"], *(p["box"] for p in chart["points"])]:
            for key in ("x", "left", "right"):
                box[key] += dx
            for key in ("y", "top", "bottom"):
                box[key] += dy
    path = save_screenshot(browser, "trend_page_airflow.png")
    check_screenshot(path, charts)
    if os.environ.get("GFOCAL_DOCS_SCREENSHOT"):  # regenerate docs/quality.md's image: =docs/trend-page.png
        shutil.copyfile(path, ROOT / os.environ["GFOCAL_DOCS_SCREENSHOT"])


IMAGES_SCRIPT = """
return Array.from(document.images).map(i => ({
  src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
"""


def check_report(driver: webdriver.Chrome, base: str) -> list[dict]:
    """The report of FAILED_RUN is shown at its URL under `base` with every picture loaded; returns
    the pictures."""
    url = f"{base}/{REPORT_PATH}"
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.current_url == url)
    wait.until(lambda d: all(i["complete"] for i in d.execute_script(IMAGES_SCRIPT)))
    assert FAILED_RUN in driver.title
    assert driver.find_element(By.TAG_NAME, "h1").text == f"Regression report: {DAG_ID} / {FAILED_RUN}"
    # the report's own relative links resolve from where the page serves it
    hrefs = {a.text: a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")}
    assert hrefs["Trend page"] == f"{base}/gfocal/"
    assert hrefs["Airflow run"] == f"{base}/dags/{DAG_ID}/runs/{quote(FAILED_RUN, safe='')}"
    images = driver.execute_script(IMAGES_SCRIPT)
    assert images, "the report shows no pictures"
    for image in images:
        assert image["src"].startswith("pictures/"), image  # relative: resolved under .../report/
        assert image["width"] > 0 and image["height"] > 0, f"picture not loaded: {image}"
    return images


def test_report_page_of_a_run_from_its_link_and_directly(browser: webdriver.Chrome, server: Server):
    url = f"{server.base}/{REPORT_PATH}"
    browser.get(f"{server.base}/gfocal/configurations/")  # every configuration's recent runs
    links = browser.find_elements(By.CSS_SELECTOR, "table a.report")
    assert [a.get_attribute("href") for a in links] == [url]  # only the run whose history names a run dir
    links[0].click()
    check_report(browser, server.base)
    browser.get(url.rstrip("/"))  # redirected to the slash form, where the relative pictures resolve
    check_report(browser, server.base)
    browser.get(url)
    set_viewport(browser)
    try:
        images = check_report(browser, server.base)
        path = save_screenshot(browser, "report_page.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] == 1280 and float(image.std()) > 10
    if os.environ.get("GFOCAL_DOCS_REPORT_SCREENSHOT"):  # regenerate the docs image: =docs/report-page.png
        shutil.copyfile(path, ROOT / os.environ["GFOCAL_DOCS_REPORT_SCREENSHOT"])
    picture = f"{url}{images[0]['src']}"
    for anonymous in (url, picture):  # the report and its pictures are behind Airflow's login too
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(anonymous, timeout=10)
        assert info.value.code == 401, anonymous
