"""Trend page: data shaping, inline SVG charts, the FastAPI app (TestClient), the run reports it serves
from the run directories named in the history, and the Airflow plugin mounted in Airflow's own API app
(subprocess with its own AIRFLOW_HOME and migrated SQLite DB)."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from gfocal_pipeline.history import (
    LEGACY_DATASET,
    ConfigKey,
    HistoryError,
    HistoryStore,
    RunRecord,
    model_entry,
    model_key,
)
from gfocal_pipeline.trend import REPORT_CSP, SPARK_RUNS, create_app, svg_chart, svg_sparkline

ROOT = Path(__file__).resolve().parents[2]
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
DATASET = "ann:0123456789abcdef+img:fedcba9876543210"
ORT = ConfigKey("gfocal_r50_fpn_1x", "onnxruntime", "cpu", "fp32", 1, "mmdet", DATASET)
MSAME = ConfigKey("gfocal_r50_fpn_1x", "msame", "Ascend310P3", "fp16", 1, "modelzoo", DATASET)
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
ORT_RUNS = [  # (run_id, AP, fps, verdict), oldest first
    ("scheduled__2026-03-01T02:00:00+00:00", 0.401, 100.0, "pass"),
    ("scheduled__2026-03-02T02:00:00+00:00", 0.399, 104.0, "pass"),
    ("scheduled__2026-03-03T02:00:00+00:00", 0.390, 80.0, "fail"),
    ("scheduled__2026-03-04T02:00:00+00:00", 0.402, 99.0, "pass"),
    ("scheduled__2026-03-05T02:00:00+00:00", 0.400, 101.0, "pass"),
    ("manual__2026-03-05T09:00:00+00:00", 0.403, 97.5, None),
]


class SvgCollector(HTMLParser):
    """Collects, per section id, the attributes of every chart point."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.points: dict[str, list[dict[str, str]]] = {}
        self.links: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "section":
            self.section = attributes.get("id")
        elif tag == "circle" and self.section:
            self.points.setdefault(self.section, []).append(attributes)
        elif tag == "a":
            self.links.append(attributes)
            self.text_of = attributes

    def handle_data(self, data):
        link = getattr(self, "text_of", None)
        if link is not None:
            link["text"] = link.get("text", "") + data

    def handle_endtag(self, tag):
        if tag == "a":
            self.text_of = None


@pytest.fixture
def store(tmp_path):
    with HistoryStore(f"sqlite:///{tmp_path / 'history.sqlite'}") as s:
        for day, (run_id, ap, fps, verdict) in enumerate(ORT_RUNS):
            s.record(
                RunRecord(
                    "gfocal_onnxruntime",
                    run_id,
                    ORT,
                    {"AP": ap},
                    T0 + timedelta(hours=12 * day),
                    fps=fps,
                    latency_ms={"p50": 1000 / fps, "p99": 1200 / fps},
                )
            )
            if verdict:
                detail = {
                    "passed": verdict == "pass",
                    "regressed": [] if verdict == "pass" else ["AP", "fps"],
                }
                s.set_verdict("gfocal_onnxruntime", run_id, ORT, detail)
        for day in range(2):
            s.record(
                RunRecord(
                    "gfocal_ascend_nightly",
                    f"nightly-{day}",
                    MSAME,
                    {"AP": 0.398 + day / 1000},
                    T0 - timedelta(days=3 - day),
                    fps=250.0 + day,
                )
            )
        yield s


def test_json_has_both_series_per_configuration(store):
    data = TestClient(create_app(store)).get("/api/trends").json()
    ort = next(c for c in data["configurations"] if c["key"] == ORT.as_dict())
    assert [r["run_id"] for r in ort["runs"]] == [run[0] for run in ORT_RUNS]
    assert [r["AP"] for r in ort["runs"]] == pytest.approx([run[1] for run in ORT_RUNS])
    assert [r["fps"] for r in ort["runs"]] == pytest.approx([run[2] for run in ORT_RUNS])
    assert [r["verdict"] for r in ort["runs"]] == [run[3] for run in ORT_RUNS]
    assert ort["latest"]["run_id"] == ORT_RUNS[-1][0] and ort["latest"]["verdict"] is None
    assert [c["label"] for c in data["configurations"]] == [ORT.label, MSAME.label]  # most recent first
    assert (
        data["recent_runs"][0]["run_path"]
        == "dags/gfocal_onnxruntime/runs/manual__2026-03-05T09%3A00%3A00%2B00%3A00"
    )
    assert (
        len(TestClient(create_app(store)).get("/api/trends?limit=2").json()["configurations"][0]["runs"]) == 2
    )
    assert TestClient(create_app(store)).get("/api/trends?limit=0").status_code == 422


def test_html_plots_ap_and_fps_for_every_run_and_links_relatively(store):
    response = TestClient(create_app(store)).get("/configurations/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    parser = SvgCollector()
    parser.feed(page)
    points = parser.points[ORT.slug]
    for series, column in (("AP", 1), ("fps", 2)):
        mine = [p for p in points if p["data-series"] == series]
        assert [p["data-run-id"] for p in mine] == [run[0] for run in ORT_RUNS]
        assert [float(p["data-value"]) for p in mine] == pytest.approx([run[column] for run in ORT_RUNS])
        # higher values are drawn higher (smaller y), x grows with time
        by_value = sorted(mine, key=lambda p: float(p["data-value"]))
        assert [float(p["cy"]) for p in by_value] == sorted((float(p["cy"]) for p in mine), reverse=True)
        assert [float(p["cx"]) for p in mine] == sorted(float(p["cx"]) for p in mine)
    failed = next(p for p in points if p["data-run-id"] == ORT_RUNS[2][0])
    assert failed["fill"] != points[0]["fill"]
    assert len(parser.points[MSAME.slug]) == 4
    run_links = [a for a in parser.links if "/runs/" in a["href"]]
    assert {a["target"] for a in run_links} == {"_top"}
    # one folder below the app root, which is one below Airflow's
    assert "../../dags/gfocal_ascend_nightly/runs/nightly-1" in {a["href"] for a in run_links}
    assert "regressed" not in page.split(ORT.label)[1].split("</p>")[0]  # latest ORT run is not gated yet
    assert any(a["href"] == "../api/trends" for a in parser.links)
    assert any(a["href"] == "../" and a.get("text") == "All models" for a in parser.links)


def test_each_dataset_is_its_own_section_and_legacy_rows_are_marked(store):
    other = replace(ORT, dataset="ann:0123456789abcdef+img:00112233aabbccdd")
    legacy = replace(ORT, dataset=LEGACY_DATASET)
    for config, run_id, hours in ((other, "other-data", 100), (legacy, "before-keys", -100)):
        store.record(
            RunRecord(
                "gfocal_onnxruntime", run_id, config, {"AP": 0.2}, T0 + timedelta(hours=hours), fps=50.0
            )
        )
    client = TestClient(create_app(store))
    data = client.get("/api/trends").json()
    by_key = {c["slug"]: c for c in data["configurations"]}
    assert set(by_key) == {ORT.slug, MSAME.slug, other.slug, legacy.slug}
    assert [r["run_id"] for r in by_key[other.slug]["runs"]] == ["other-data"]
    assert [r["run_id"] for r in by_key[legacy.slug]["runs"]] == ["before-keys"]
    assert len(by_key[ORT.slug]["runs"]) == len(ORT_RUNS)
    assert (by_key[other.slug]["dataset"], by_key[other.slug]["legacy"]) == (other.dataset, False)
    assert by_key[legacy.slug]["legacy"] is True
    assert "data ann:01234567+img:00112233" in by_key[other.slug]["label"]

    parser = SvgCollector()
    page = client.get("/configurations/").text
    parser.feed(page)
    assert len(parser.points[other.slug]) == 2 and len(parser.points[ORT.slug]) == 2 * len(ORT_RUNS)
    sections = {part.split('"', 1)[0]: part for part in page.split('<section class="config" id="')[1:]}
    assert "never the baseline of a new run" in sections[legacy.slug]
    assert "never the baseline" not in sections[other.slug]
    assert f"<code>{other.dataset}</code>" in sections[other.slug]


def test_empty_and_unreachable_databases(tmp_path):
    empty = TestClient(create_app(HistoryStore(f"sqlite:///{tmp_path / 'empty.sqlite'}")))
    for path in ("/", "/configurations/"):
        assert "No runs recorded yet." in empty.get(path).text
    assert empty.get("/api/trends").json()["configurations"] == []
    assert empty.get("/api/models").json()["models"] == []
    down = TestClient(create_app(lambda: HistoryStore("postgresql+psycopg://postgres@127.0.0.1:1/test")))
    for path in ("/", "/configurations/", "/models/gfocalv2_r50/"):
        response = down.get(path)
        assert response.status_code == 503 and "127.0.0.1:1" in response.text
    for path in ("/api/trends", "/api/models?model=gfocalv2_r50"):
        assert down.get(path).status_code == 503


def test_svg_chart_handles_single_and_missing_points():
    one = svg_chart(
        [{"run_id": "r", "finished_at": "2026-01-01T00:00:00", "fps": 5.0, "verdict": "pass"}],
        "fps",
        title="fps",
    )
    assert one.count("<circle") == 1 and 'cx="253.0"' in one  # centred: 58 + (460 - 70) / 2
    none = svg_chart([{"run_id": "r", "finished_at": "2026-01-01T00:00:00", "fps": None}], "fps", title="fps")
    assert "<circle" not in none and "no fps data" in none


def plugin_env(tmp_path: Path) -> dict[str, str]:
    """An Airflow environment of its own (prefix /prefix, simple auth, user tester:pw) whose history
    holds five runs of ORT."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "tester:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
        "AIRFLOW__API__BASE_URL": "http://localhost:8080/prefix",
        "AIRFLOW__API_AUTH__JWT_SECRET": "gfocal-test-secret",
        "AIRFLOW__GFOCAL__HISTORY_URL": f"sqlite:///{tmp_path / 'history.sqlite'}",
    }
    with HistoryStore(env["AIRFLOW__GFOCAL__HISTORY_URL"]) as s:
        for i in range(5):
            s.record(
                RunRecord(
                    "gfocal_onnxruntime",
                    f"r{i}",
                    ORT,
                    {"AP": 0.40 + i / 1000},
                    T0 + timedelta(days=i),
                    fps=100.0 + i,
                )
            )
    (tmp_path / "airflow").mkdir()
    (tmp_path / "passwords.json").write_text(json.dumps({"tester": "pw"}))
    return env


@pytest.mark.slow
@pytest.mark.airflow
def test_plugin_is_mounted_by_airflow_behind_a_base_url_prefix(tmp_path):
    env = plugin_env(tmp_path)
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    script = textwrap.dedent(
        """
        import json
        from airflow.api_fastapi.app import create_app
        from fastapi.testclient import TestClient
        client = TestClient(create_app(), base_url="http://localhost:8080")
        result = {"unauthenticated": client.get("/prefix/gfocal/api/trends").status_code}
        login = client.post("/prefix/auth/token", json={"username": "tester", "password": "pw"})
        token = login.json()["access_token"]
        client.cookies.set("_token", token)
        index = client.get("/prefix/gfocal/")
        result["index"] = [index.status_code, index.text]
        page = client.get("/prefix/gfocal/models/gfocal_r50_fpn_1x/")
        result["page"] = [page.status_code, page.text]
        result["json"] = client.get("/prefix/gfocal/api/trends").json()
        plugins = client.get("/prefix/api/v2/plugins").json()["plugins"]
        result["plugin"] = next(p for p in plugins if p["name"] == "gfocal")
        print("RESULT" + json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(line[len("RESULT") :])
    assert result["unauthenticated"] == 401
    status, index = result["index"]
    assert status == 200 and 'data-entry="gfocal_r50_fpn_1x" data-variant="default"' in index
    assert (
        'href="models/gfocal_r50_fpn_1x/"' in index
        and 'class="spark" data-series="AP" data-runs="5"' in index
    )
    status, page = result["page"]
    assert status == 200 and page.count('class="point" data-series="AP" data-run-id') == 5  # configuration
    assert page.count('class="point" data-variant="default" data-series="AP" data-run-id') == 5  # variant
    assert [r["fps"] for r in result["json"]["configurations"][0]["runs"]] == [
        100.0,
        101.0,
        102.0,
        103.0,
        104.0,
    ]
    plugin = result["plugin"]
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/gfocal"
    view = plugin["external_views"][0]
    assert (view["href"], view["url_route"], view["destination"]) == ("gfocal/", "gfocal-trends", "nav")


# --- run reports -------------------------------------------------------------------------------------

DAG = "gfocal_onnxruntime"
REPORTED_RUN = "manual__2026-12-06T01:02:03.456+00:00"  # ':' and '+' must survive the URL round trip
REPORT_URL = "/runs/gfocal_onnxruntime/manual__2026-12-06T01%3A02%3A03.456%2B00%3A00/report/"
REPORT_HTML = (
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>GFocal regression report</title>"
    "<style>body{font-family:sans-serif}</style></head><body><h1>Regression report</h1>"
    "<img src='pictures/01_42.png' alt='image 42'></body></html>"
)


def write_report(run_dir: Path) -> bytes:
    """A report folder as the gate writes it (report.html + one real PNG); returns the PNG's bytes."""
    pictures = run_dir / "report" / "pictures"
    pictures.mkdir(parents=True)
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = (0, 0, 255)
    ok, png = cv2.imencode(".png", image)
    assert ok
    (pictures / "01_42.png").write_bytes(png.tobytes())
    (run_dir / "report" / "report.html").write_text(REPORT_HTML, encoding="utf-8")
    return png.tobytes()


def text_of(response) -> str:
    """The response body with HTML entities decoded (the message pages escape quotes)."""
    return html.unescape(response.text)


def record_run(store: HistoryStore, run_id: str, hours: int, detail: dict | None) -> None:
    store.record(RunRecord(DAG, run_id, ORT, {"AP": 0.4}, T0 + timedelta(hours=hours), fps=100.0))
    if detail is not None:
        store.set_verdict(DAG, run_id, ORT, detail)


@pytest.fixture
def reported(tmp_path):
    """A history with a gated run that has a report, a gated run of before reports and an un-gated
    run; yields (store, the reported run's run directory, its picture's bytes)."""
    run_dir = tmp_path / "work" / DAG / REPORTED_RUN
    png = write_report(run_dir)
    with HistoryStore(f"sqlite:///{tmp_path / 'history.sqlite'}") as s:
        record_run(s, REPORTED_RUN, 3, {"passed": True, "regressed": [], "run_dir": str(run_dir)})
        record_run(s, "scheduled__before-reports", 2, {"passed": True, "regressed": []})
        record_run(s, "manual__not-gated", 1, None)
        yield s, run_dir, png


def test_run_records_are_every_row_of_one_run_newest_first(reported):
    store, run_dir, _ = reported
    store.record(RunRecord(DAG, REPORTED_RUN, MSAME, {"AP": 0.39}, T0 + timedelta(hours=4), fps=30.0))
    records = store.run_records(DAG, REPORTED_RUN)
    assert [(r.run_id, r.config) for r in records] == [(REPORTED_RUN, MSAME), (REPORTED_RUN, ORT)]
    assert records[1].verdict_detail["run_dir"] == str(run_dir)
    assert store.run_records(DAG, "no-such-run") == []
    assert store.run_records("gfocal_ascend_nightly", REPORTED_RUN) == []


def test_report_and_its_pictures_are_served_from_the_run_dir_in_the_history(reported):
    _, _, png = reported
    client = TestClient(create_app(reported[0]))
    response = client.get(REPORT_URL)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == REPORT_HTML
    assert response.headers["content-security-policy"] == REPORT_CSP
    picture = client.get(REPORT_URL + "pictures/01_42.png")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content == png
    decoded = cv2.imdecode(np.frombuffer(picture.content, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (30, 40, 3) and tuple(decoded[0, 0]) == (0, 0, 255)
    # without the trailing slash: a relative redirect, so that pictures/... resolves under report/
    bare = client.get(REPORT_URL.rstrip("/"), follow_redirects=False)
    assert bare.status_code == 308 and bare.headers["location"] == "report/"
    assert client.get(REPORT_URL.rstrip("/")).text == REPORT_HTML


@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fetc%2Fpasswd", "..%2Freport.html", "x.png", "1_42.png", "01_42.png.html", "01_42.PNG"],
)
def test_a_picture_name_outside_the_report_pictures_is_404(reported, name):
    response = TestClient(create_app(reported[0])).get(REPORT_URL + "pictures/" + name)
    assert response.status_code == 404
    assert response.content != reported[2] and "root:" not in response.text


def test_a_picture_that_links_out_of_its_folder_or_is_missing_is_404(reported, tmp_path):
    _, run_dir, _ = reported
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the web")
    (run_dir / "report" / "pictures" / "02_7.png").symlink_to(secret)
    client = TestClient(create_app(reported[0]))
    for name in ("02_7.png", "03_8.png"):
        response = client.get(REPORT_URL + "pictures/" + name)
        assert response.status_code == 404 and f"no picture {name!r}" in text_of(response)
    assert b"not for the web" not in client.get(REPORT_URL + "pictures/02_7.png").content


def test_runs_without_a_report_are_404_pages_that_say_why(reported):
    store, run_dir, _ = reported
    client = TestClient(create_app(store))
    unknown = client.get("/runs/gfocal_onnxruntime/no-such-run/report/")
    assert unknown.status_code == 404 and "'no-such-run'" in text_of(unknown)
    assert "is not in the history database" in text_of(unknown)
    assert client.get("/runs/gfocal_onnxruntime/no-such-run/report/pictures/01_42.png").status_code == 404
    for run_id in ("scheduled__before-reports", "manual__not-gated"):
        response = client.get(f"/runs/gfocal_onnxruntime/{run_id}/report/")
        assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
        assert "names no run directory" in text_of(response) and "gfocal report --run-dir" in text_of(
            response
        )
    (run_dir / "report" / "report.html").unlink()
    missing = client.get(REPORT_URL)
    assert missing.status_code == 404
    assert f"no report at {run_dir / 'report' / 'report.html'}" in text_of(missing)
    assert f"gfocal report --run-dir {run_dir}`" in text_of(missing)


def test_report_routes_answer_503_when_the_history_is_down():
    down = TestClient(create_app(lambda: HistoryStore("postgresql+psycopg://postgres@127.0.0.1:1/test")))
    for path in (REPORT_URL, REPORT_URL + "pictures/01_42.png"):
        response = down.get(path)
        assert response.status_code == 503 and "127.0.0.1:1" in response.text


def test_trend_page_links_the_report_of_runs_that_have_one(reported):
    client = TestClient(create_app(reported[0]))
    runs = {r["run_id"]: r for r in client.get("/api/trends").json()["recent_runs"]}
    assert runs[REPORTED_RUN]["report_path"] == REPORT_URL.lstrip("/")
    assert runs["scheduled__before-reports"]["report_path"] is None
    assert runs["manual__not-gated"]["report_path"] is None
    for page in ("/configurations/", f"/models/{ORT.model}/"):
        parser = SvgCollector()
        parser.feed(client.get(page).text)
        reports = [a for a in parser.links if a.get("class") == "report"]
        assert [urljoin(page, a["href"]) for a in reports] == [REPORT_URL]  # resolves from the page
        assert "target" not in reports[0]  # the report opens in the page's own frame
        assert client.get(urljoin(page, reports[0]["href"])).text == REPORT_HTML


# --- model zoo: the index, a page per model, the JSON filter ----------------------------------------


@dataclass(frozen=True)
class Row:
    """One recorded history row as the tests write it."""

    dag_id: str
    run_id: str
    config: ConfigKey
    finished_at: datetime
    ap: float
    fps: float
    verdict: str | None


def zoo_config(model: str, backend: str = "onnxruntime") -> ConfigKey:
    return ConfigKey(model, backend, "cpu", "fp32", 1, "mmdet", DATASET)


LEGACY_ROWS = [
    *(
        Row("gfocal_onnxruntime", run_id, ORT, T0 + timedelta(hours=12 * day), ap, fps, verdict)
        for day, (run_id, ap, fps, verdict) in enumerate(ORT_RUNS)
    ),
    *(
        Row(
            "gfocal_ascend_nightly",
            f"nightly-{day}",
            MSAME,
            T0 - timedelta(days=3 - day),
            0.398 + day / 1000,
            250.0 + day,
            None,
        )
        for day in range(2)
    ),
]
ZOO_DAG = "gfocal_zoo"
ZOO_ROWS = [  # (model, backend, run_id, hours after T0, AP, fps, verdict)
    ("gfocalv2_r50/fp16", "onnxruntime", "fp16-1", 1, 0.405, 40.0, "pass"),
    ("gfocalv2_r50/fp16", "onnxruntime", "fp16-2", 25, 0.404, 41.0, "pass"),
    ("gfocalv2_r50/fp16", "onnxruntime", "fp16-3", 49, 0.371, 30.0, "fail"),
    ("gfocalv2_r50/fp16", "torch", "fp16-3", 50, 0.410, 5.0, None),  # the reference role: later, not gated
    ("gfocalv2_r50/keep", "onnxruntime", "keep-1", 2, 0.409, 20.0, "pass"),
    ("gfocalv2_r50/keep", "onnxruntime", "keep-2", 26, 0.408, 21.5, None),
    ("gfocalv2_r50/keep", "onnxruntime", "keep-3", 30, 0.407, 21.0, "pass"),
    ("retinanet_r50/fp16", "onnxruntime", "retina-1", 27, 0.362, 35.0, "pass"),
    ("gfocalv2xr50/fp16", "onnxruntime", "trap-1", 3, 0.100, 10.0, None),  # '_' must not be a wildcard
    ("gfocalv2_r50_big/fp16", "onnxruntime", "trap-2", 4, 0.200, 11.0, None),  # another entry
]
ZOO = [
    Row(ZOO_DAG, run_id, zoo_config(model, backend), T0 + timedelta(hours=hours), ap, fps, verdict)
    for model, backend, run_id, hours, ap, fps, verdict in ZOO_ROWS
]


def split(model: str) -> tuple[str, str]:
    """The convention, written out: `entry/variant`, a plain name is variant 'default'."""
    return tuple(model.split("/", 1)) if "/" in model else (model, "default")


def expected_variants(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Per (entry, variant): the runs (oldest first) of its configuration of the newest gated run, else
    of the newest run."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(split(row.config.model), []).append(row)
    result = {}
    for key, group in groups.items():
        chosen = max([r for r in group if r.verdict] or group, key=lambda r: r.finished_at).config
        result[key] = sorted((r for r in group if r.config == chosen), key=lambda r: r.finished_at)
    return result


@pytest.fixture
def zoo(store):
    """The legacy rows of `store` and zoo rows `<entry>/<variant>`."""
    for row in ZOO:
        store.record(
            RunRecord(row.dag_id, row.run_id, row.config, {"AP": row.ap}, row.finished_at, fps=row.fps)
        )
        if row.verdict:
            detail = {"passed": row.verdict == "pass", "regressed": [] if row.verdict == "pass" else ["AP"]}
            store.set_verdict(row.dag_id, row.run_id, row.config, detail)
    return store


def test_model_key_and_model_entry():
    assert model_key("gfocalv2_r50", "fp16") == "gfocalv2_r50/fp16"
    assert model_entry(model_key("gfocalv2_r50", "fp16")) == ("gfocalv2_r50", "fp16")
    assert model_key("retinanet_r50", "default") == "retinanet_r50/default"
    assert model_entry("gfocalv2_r50_fpn_1x") == ("gfocalv2_r50_fpn_1x", "default")  # older DAGs' rows
    assert model_entry("yolox_s_8xb8-300e_coco") == ("yolox_s_8xb8-300e_coco", "default")
    for entry, variant in (("GFocal", "fp16"), ("gfocal", "fp/16"), ("1x", "fp16"), ("a", ""), ("a-b", "c")):
        with pytest.raises(HistoryError, match="must match"):
            model_key(entry, variant)


def test_store_reads_the_rows_of_one_model(zoo):
    entry_models = {r.config.model for r in ZOO if split(r.config.model)[0] == "gfocalv2_r50"}
    assert {c.model for c in zoo.configurations(model="gfocalv2_r50")} == entry_models
    assert {(r.run_id, r.config) for r in zoo.recent(model="gfocalv2_r50/keep")} == {
        (r.run_id, r.config) for r in ZOO if r.config.model == "gfocalv2_r50/keep"
    }
    legacy = {(r.run_id, r.config) for r in LEGACY_ROWS}
    assert {(r.run_id, r.config) for r in zoo.recent(model=ORT.model)} == legacy
    assert {(r.run_id, r.config) for r in zoo.recent(model=f"{ORT.model}/default")} == legacy
    assert zoo.configurations(model="gfocalv2") == [] and zoo.recent(model="gfocalv2_r50/int8") == []
    assert zoo.models() == sorted({r.config.model for r in LEGACY_ROWS + ZOO})


class IndexCollector(HTMLParser):
    """The index table: per (entry, variant) the text of each cell by class, its sparkline and links."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict] = {}
        self.row: dict | None = None
        self.cell: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("class") == "variant-row":
            self.row = {"cells": {}, "links": []}
            self.rows[(attributes["data-entry"], attributes["data-variant"])] = self.row
        elif self.row is None:
            return
        elif tag == "td":
            self.cell = attributes.get("class", "")
            self.row["cells"][self.cell] = ""
        elif tag == "svg":
            self.row["spark"] = attributes
        elif tag == "polyline":
            self.row["line"] = [tuple(map(float, xy.split(","))) for xy in attributes["points"].split()]
        elif tag == "a":
            self.row["links"].append(attributes["href"])

    def handle_data(self, data):
        if self.row is not None and self.cell is not None:
            self.row["cells"][self.cell] += data

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None
        elif tag == "td":
            self.cell = None


def test_index_has_a_row_per_model_entry_and_variant(zoo):
    client = TestClient(create_app(zoo))
    parser = IndexCollector()
    parser.feed(client.get("/").text)
    expected = expected_variants(LEGACY_ROWS + ZOO)
    assert set(parser.rows) == set(expected)
    for (entry, variant), runs in expected.items():
        row, latest = parser.rows[(entry, variant)], runs[-1]
        cells = row["cells"]
        assert cells["num ap"] == f"{latest.ap:.4f}" and cells["num fps"] == f"{latest.fps:.2f}", entry
        assert cells["verdict"] == {"pass": "PASS", "fail": "FAIL", None: "not gated"}[latest.verdict]
        assert latest.config.label in cells["config"]
        others = len({r.config for r in LEGACY_ROWS + ZOO if split(r.config.model) == (entry, variant)}) - 1
        assert (f"+{others} more" in cells["config"]) == bool(others)
        spark = [r.ap for r in runs[-SPARK_RUNS:]]
        assert int(row["spark"]["data-runs"]) == len(spark) == len(row["line"])
        ys = [y for _, y in row["line"]]  # higher AP higher up (smaller y)
        assert sorted(range(len(spark)), key=lambda i: spark[i]) == sorted(
            range(len(ys)), key=lambda i: -ys[i]
        )
        links = {link for (e, _), r in parser.rows.items() if e == entry for link in r["links"]}
        assert f"models/{entry}/" in links  # the model cell spans the entry's rows
    # the reference role (torch) ran later but the line follows the gated configuration
    assert expected[("gfocalv2_r50", "fp16")][-1].config.backend == "onnxruntime"
    assert parser.rows[("gfocalv2_r50", "fp16")]["cells"]["verdict"] == "FAIL"
    data = client.get("/api/models").json()
    entries = [m["entry"] for m in data["models"]]
    newest = {
        e: max(r.finished_at for r in LEGACY_ROWS + ZOO if split(r.config.model)[0] == e) for e in entries
    }
    assert entries == sorted(newest, key=newest.get, reverse=True) and set(entries) == {
        k[0] for k in expected
    }
    for model in data["models"]:
        for variant in model["variants"]:
            runs = expected[(model["entry"], variant["variant"])]
            assert [p["run_id"] for p in variant["spark"]] == [r.run_id for r in runs]
            assert variant["latest"]["AP"] == pytest.approx(runs[-1].ap)


class VariantChartCollector(HTMLParser):
    """Per series (AP, fps) of the variant charts: per variant its line's colour and its points."""

    def __init__(self) -> None:
        super().__init__()
        self.chart: str | None = None
        self.lines: dict[str, dict[str, dict]] = {}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "svg":
            self.chart = attributes["data-series"] if attributes.get("class") == "chart variants" else None
        elif self.chart and tag in ("polyline", "circle"):
            line = self.lines.setdefault(self.chart, {}).setdefault(
                attributes["data-variant"], {"points": []}
            )
            if tag == "polyline":
                line["style"] = attributes["style"]
            else:
                line["points"].append(attributes)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.chart = None


def test_model_page_draws_one_line_per_variant(zoo):
    client = TestClient(create_app(zoo))
    response = client.get("/models/gfocalv2_r50/")
    assert response.status_code == 200 and "<script" not in response.text
    page = response.text
    charts = VariantChartCollector()
    charts.feed(page)
    expected = {
        v: runs for (e, v), runs in expected_variants(LEGACY_ROWS + ZOO).items() if e == "gfocalv2_r50"
    }
    assert set(charts.lines) == {"AP", "fps"}
    for series, value in (("AP", lambda r: r.ap), ("fps", lambda r: r.fps)):
        lines = charts.lines[series]
        assert set(lines) == set(expected) == {"fp16", "keep"}
        assert len({line["style"] for line in lines.values()}) == len(lines)  # a colour per variant
        for variant, runs in expected.items():
            points = lines[variant]["points"]
            assert [p["data-run-id"] for p in points] == [r.run_id for r in runs]
            assert [float(p["data-value"]) for p in points] == pytest.approx([value(r) for r in runs])
        # x is time, shared by the variants
        every = sorted((p for line in lines.values() for p in line["points"]), key=lambda p: float(p["cx"]))
        times = {r.run_id: r.finished_at for runs in expected.values() for r in runs}
        assert [times[p["data-run-id"]] for p in every] == sorted(times[p["data-run-id"]] for p in every)
    assert all(f'<li data-variant="{v}">' in page for v in expected)
    sections = SvgCollector()
    sections.feed(page)
    mine = {r.config for r in ZOO if split(r.config.model)[0] == "gfocalv2_r50"}
    assert set(sections.points) == {c.slug for c in mine}  # every configuration, torch's too; no trap
    run_links = {a["href"] for a in sections.links if a.get("target") == "_top"}
    assert run_links == {f"../../../dags/{ZOO_DAG}/runs/{r.run_id}" for r in ZOO if r.config in mine}
    assert {"../../", "../../configurations/", "../../api/trends?model=gfocalv2_r50"} <= {
        a["href"] for a in sections.links
    }
    bare = client.get("/models/gfocalv2_r50", follow_redirects=False)
    assert bare.status_code == 308 and bare.headers["location"] == "gfocalv2_r50/"
    assert client.get("/configurations", follow_redirects=False).headers["location"] == "configurations/"


def test_model_page_of_an_old_dag_model_and_of_an_unknown_model(zoo):
    client = TestClient(create_app(zoo))
    charts = VariantChartCollector()
    charts.feed(client.get(f"/models/{ORT.model}/").text)
    runs = expected_variants(LEGACY_ROWS)[(ORT.model, "default")]
    assert [p["data-run-id"] for p in charts.lines["AP"]["default"]["points"]] == [r.run_id for r in runs]
    missing = client.get("/models/gfocalv2/")
    assert missing.status_code == 404 and "no recorded runs of model 'gfocalv2'" in text_of(missing)
    assert "gfocalv2_r50, gfocalv2_r50_big" in text_of(missing)


def test_json_api_filters_by_model_entry_or_variant(zoo):
    client = TestClient(create_app(zoo))
    everything = LEGACY_ROWS + ZOO
    for model, keep in (
        ("gfocalv2_r50", lambda m: split(m)[0] == "gfocalv2_r50"),
        ("gfocalv2_r50/keep", lambda m: m == "gfocalv2_r50/keep"),
        (ORT.model, lambda m: m == ORT.model),
        ("gfocalv2_r50_big", lambda m: split(m)[0] == "gfocalv2_r50_big"),
    ):
        data = client.get("/api/trends", params={"model": model}).json()
        assert {c["slug"] for c in data["configurations"]} == {
            r.config.slug for r in everything if keep(r.config.model)
        }
        assert {(r["dag_id"], r["run_id"], r["label"]) for r in data["recent_runs"]} == {
            (r.dag_id, r.run_id, r.config.label) for r in everything if keep(r.config.model)
        }
        models = client.get("/api/models", params={"model": model}).json()["models"]
        assert [m["entry"] for m in models] == [split(model)[0]]
    keep_only = client.get("/api/models", params={"model": "gfocalv2_r50/keep"}).json()["models"][0]
    assert [v["variant"] for v in keep_only["variants"]] == ["keep"]
    for unknown in ("nope", "gfocalv2_r50/int8", "gfocalv2_r5"):
        response = client.get("/api/trends", params={"model": unknown})
        assert response.status_code == 404
        assert f"no recorded runs of model {unknown!r}" in response.json()["detail"]
        assert "retinanet_r50" in response.json()["detail"]
        assert client.get("/api/models", params={"model": unknown}).status_code == 404
    assert (
        client.get(
            "/api/trends", params={"model": "retinanet_r50", "dag_id": "gfocal_onnxruntime"}
        ).status_code
        == 404
    )


def test_svg_sparkline_draws_the_values_in_order():
    points = [{"AP": ap, "verdict": v} for ap, v in ((0.40, "pass"), (0.38, "pass"), (0.41, "fail"))]
    spark = svg_sparkline(points)
    line = spark.split('points="')[1].split('"')[0].split()
    ys = [float(xy.split(",")[1]) for xy in line]
    assert len(line) == 3 and ys[1] > ys[0] > ys[2]  # 0.38 lowest, 0.41 highest
    assert 'fill="#cf222e"' in spark and 'data-runs="3"' in spark  # the last run failed
    assert 'data-runs="0"' in svg_sparkline([]) and "<polyline" not in svg_sparkline([])
