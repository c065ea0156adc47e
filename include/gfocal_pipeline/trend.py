"""Trend page: AP and fps over time per model, variant and configuration, latest verdicts, recent
runs, as HTML and JSON.

Pages, relative to the app root (`<airflow>/gfocal/`):

- `./` the index of models: one row per model entry and variant (the history's `model` is
  `<entry>/<variant>` for zoo runs, a plain name for the older DAGs' rows: variant "default", see
  `history.model_entry`), with the variant's latest verdict, AP and fps and a sparkline of its AP;
- `models/<entry>/` one model: AP and fps with one line per variant, then the model's configuration
  sections and recent runs;
- `configurations/` every configuration's section and the recent runs of all models;
- `api/models` (the index) and `api/trends` (the configurations) as JSON, both filtered by
  `?model=<entry>` (the entry with all its variants) or `?model=<entry>/<variant>` (that variant),
  answering 404 with the recorded models when nothing of it is recorded.

A variant's line (index and model page) follows one configuration, its "primary": the one of its
most recent gated run, else of its most recent run, so runs of other backends, devices or datasets
(the Ascend DAG's reference role, a demo dataset) never zigzag into it; the model page's sections
show every configuration.

A configuration includes the dataset (`ConfigKey.dataset`): runs on two datasets are two sections;
rows recorded before dataset keys form their own section, marked as such.

Everything is rendered server-side (inline SVG, inline CSS, no script, no CDN) so the page works on
offline machines and inside the Airflow UI's iframe. Links are relative: the index is served at
`<airflow>/gfocal/`, so `../dags/<dag_id>/runs/<run_id>` reaches the Airflow run whatever
`[api] base_url` prefix the deployment uses (a page one or two folders deeper prefixes `../` as
often). `create_app` builds the FastAPI app; FastAPI is imported
there only, so the rest of the library does not need it.

The app also serves each gated run's regression report (`<run_dir>/report/report.html` and its
`pictures/`, written by the gate) at `runs/<dag_id>/<run_id>/report/`, linked from the "Recent runs"
table. The run directory is read from the run's history row (`verdict_detail["run_dir"]`), never
from the URL; a run without one (older or un-gated runs) has no report.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gfocal_pipeline.history import (
    LEGACY_DATASET,
    ConfigKey,
    HistoryError,
    HistoryStore,
    RunRecord,
    model_entry,
)
from gfocal_pipeline.trend_svg import svg_chart, svg_sparkline, svg_variant_chart

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import Response

LEGACY_NOTE = (
    f"dataset {LEGACY_DATASET!r}: these runs were recorded before the history keyed runs by dataset; "
    "they are shown here but are never the baseline of a new run"
)
SERIES = (("AP", "AP", "{:.4f}"), ("fps", "fps", "{:.2f}"))
# one line colour per variant on a model page (none of them a verdict's green, red or grey)
VARIANT_COLORS = ("#0969da", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#0550ae", "#953800", "#4d2d00")
SPARK_RUNS = 20  # runs in an index row's AP sparkline
MODELS_DIR, CONFIGURATIONS_DIR = "models", "configurations"
REPORT_DIR, REPORT_HTML, PICTURES_DIR = "report", "report.html", "pictures"
PICTURE_NAME = re.compile(r"[0-9]{2}_[0-9]+\.png")  # <rank>_<image id>.png, matched whole
# report.html is self-contained: inline CSS, pictures from this server; no script, nothing else
REPORT_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"


def run_path(dag_id: str, run_id: str) -> str:
    """Path of a DAG run in the Airflow 3 UI, relative to the UI root."""
    return f"dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def report_path(dag_id: str, run_id: str) -> str:
    """Path of a run's regression report, relative to the trend page."""
    return f"runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/{REPORT_DIR}/"


def model_path(entry: str) -> str:
    """Path of a model entry's page, relative to the index."""
    return f"{MODELS_DIR}/{quote(entry, safe='')}/"


def _run_point(record: RunRecord) -> dict[str, Any]:
    detail = record.verdict_detail or {}
    return {
        "dag_id": record.dag_id,
        "run_id": record.run_id,
        "finished_at": record.finished_at.isoformat(),
        "AP": record.stats.get("AP"),
        "AP50": record.stats.get("AP50"),
        "AP75": record.stats.get("AP75"),
        "ap_delta": record.ap_delta,
        "fps": record.fps,
        "latency_p50_ms": record.latency_ms.get("p50"),
        "latency_p99_ms": record.latency_ms.get("p99"),
        "verdict": record.verdict,
        "regressed": list(detail.get("regressed", [])),
        "run_path": run_path(record.dag_id, record.run_id),
        "report_path": report_path(record.dag_id, record.run_id) if detail.get("run_dir") else None,
    }


def trend_data(histories: Mapping[ConfigKey, Sequence[RunRecord]], recent: Sequence[RunRecord]) -> dict:
    """JSON-safe page data. `histories`: per configuration, its newest runs (any order);
    `recent`: newest runs of all configurations for the table, newest first."""
    configurations = []
    for config, records in histories.items():
        runs = sorted(records, key=lambda r: r.finished_at)
        if not runs:
            continue
        latest = runs[-1]
        configurations.append(
            {
                "key": config.as_dict(),
                "label": config.label,
                "slug": config.slug,
                "dataset": config.dataset,
                "legacy": config.legacy,
                "latest": {
                    "run_id": latest.run_id,
                    "dag_id": latest.dag_id,
                    "finished_at": latest.finished_at.isoformat(),
                    "verdict": latest.verdict,
                    "regressed": list((latest.verdict_detail or {}).get("regressed", [])),
                    "notes": list((latest.verdict_detail or {}).get("notes", [])),
                },
                "runs": [_run_point(r) for r in runs],
            }
        )
    configurations.sort(key=lambda c: c["latest"]["finished_at"], reverse=True)
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "configurations": configurations,
        "recent_runs": [{**_run_point(r), "label": r.config.label} for r in recent],
    }


def load_trend_data(
    store: HistoryStore, *, per_config: int = 50, dag_id: str | None = None, model: str | None = None
) -> dict:
    """Read what the page shows from the history store (HistoryError if the database fails);
    `model` keeps the rows of `<entry>` (all its variants) or `<entry>/<variant>`."""
    histories = {
        config: store.runs(config, limit=per_config, dag_id=dag_id)
        for config in store.configurations(dag_id=dag_id, model=model)
    }
    return trend_data(histories, store.recent(limit=per_config, dag_id=dag_id, model=model))


def model_index(configurations: Sequence[Mapping[str, Any]], *, spark_runs: int = SPARK_RUNS) -> list[dict]:
    """Per model entry (the most recently run first), its variants (by name) as index rows, from
    trend_data's `configurations`."""
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for config in configurations:
        entry, variant = model_entry(config["key"]["model"])
        groups.setdefault(entry, {}).setdefault(variant, []).append(config)
    models = []
    for entry, variants in groups.items():
        rows = [_variant_row(name, configs, spark_runs) for name, configs in sorted(variants.items())]
        models.append(
            {
                "entry": entry,
                "path": model_path(entry),
                "finished_at": max(row["latest"]["finished_at"] for row in rows),
                "variants": rows,
            }
        )
    models.sort(key=lambda m: m["finished_at"], reverse=True)
    return models


def _last_gated(config: Mapping[str, Any]) -> str:
    """finished_at of the configuration's newest gated run, '' if none was gated."""
    return max((run["finished_at"] for run in config["runs"] if run["verdict"]), default="")


def primary_configuration(configs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The configuration a variant's line follows: the one of its newest gated run, else of its
    newest run."""
    gated = [config for config in configs if _last_gated(config)]
    if gated:
        return max(gated, key=_last_gated)
    return max(configs, key=lambda config: config["latest"]["finished_at"])


def _variant_row(variant: str, configs: Sequence[Mapping[str, Any]], spark_runs: int) -> dict:
    """One index row: the variant's primary configuration, its latest run and AP sparkline."""
    primary = primary_configuration(configs)
    latest = primary["runs"][-1]
    return {
        "variant": variant,
        "model": primary["key"]["model"],
        "configuration": primary["label"],
        "slug": primary["slug"],
        "configurations": len(configs),
        "latest": {
            key: latest[key]
            for key in ("dag_id", "run_id", "finished_at", "verdict", "AP", "fps", "run_path")
        },
        "spark": [
            {key: run[key] for key in ("run_id", "finished_at", "AP", "verdict")}
            for run in primary["runs"][-spark_runs:]
        ],
    }


def index_data(data: Mapping[str, Any], *, spark_runs: int = SPARK_RUNS) -> dict:
    """JSON-safe index data for trend_data's `data`."""
    return {
        "generated_at": data["generated_at"],
        "models": model_index(data["configurations"], spark_runs=spark_runs),
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1f2328;background:#fff}
h1{font-size:1.3em}h2{font-size:1.05em;margin:0 0 6px}
section.config{border:1px solid #d0d7de;border-radius:6px;padding:10px;margin:0 0 14px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts .chart{flex:1 1 360px;max-width:640px;height:auto}
.chart .grid{stroke:#eaeef2}.chart .tick{font-size:10px;fill:#57606a}.chart .chart-title{font-size:12px}
.chart .series{fill:none;stroke:#0969da;stroke-width:1.5}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:.85em}
.badge.pass{background:#1a7f37}.badge.fail{background:#cf222e}.badge.none{background:#6e7781}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th,td.time,td.num{white-space:nowrap}td.config{color:#57606a;font-size:.9em}
td.num{text-align:right;font-variant-numeric:tabular-nums}.notes{color:#57606a;font-size:.85em}
table.models td{vertical-align:middle}td.entry{font-weight:600}svg.spark{display:block}
.spark-line{fill:none;stroke:#0969da;stroke-width:1.2}
ul.legend{list-style:none;padding:0;margin:4px 0 8px;display:flex;flex-wrap:wrap;gap:4px 16px}
.swatch{display:inline-block;width:14px;height:4px;margin-right:5px;vertical-align:middle}
"""


def _badge(verdict: str | None) -> str:
    name = verdict or "none"
    text = {"pass": "PASS", "fail": "FAIL"}.get(verdict or "", "not gated")
    return f'<span class="badge {name}">{text}</span>'


def _when(iso: str) -> str:
    """'2026-03-01T02:47:00+00:00' -> '2026-03-01 02:47' (times are stored in UTC)."""
    return iso[:16].replace("T", " ")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _report_link(path: str | None) -> str:
    """A relative link to the run's report (opened in the same frame), or '-' if it has none."""
    return "-" if path is None else f'<a class="report" href="{html.escape(path, quote=True)}">report</a>'


def _page_head(title: str) -> list[str]:
    esc = html.escape
    return [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
    ]


def _page_foot(data: Mapping[str, Any]) -> str:
    return f'<p class="notes">Generated {html.escape(data["generated_at"][:19])} UTC.</p></body></html>'


def _config_section(config: Mapping[str, Any]) -> str:
    """A configuration's section: latest verdict, dataset, notes, AP and fps charts."""
    esc = html.escape
    latest = config["latest"]
    regressed = ", ".join(latest["regressed"])
    out = [
        f'<section class="config" id="{esc(config["slug"])}"><h2>{esc(config["label"])}</h2>'
        f"<p>Latest: {_badge(latest['verdict'])} run <code>{esc(latest['run_id'])}</code> "
        f"at {esc(_when(latest['finished_at']))} UTC"
        + (f" — regressed: <b>{esc(regressed)}</b>" if regressed else "")
        + "</p>"
    ]
    if config["legacy"]:
        out.append(f'<p class="notes legacy">{esc(LEGACY_NOTE)}</p>')
    else:
        out.append(f'<p class="notes">Dataset <code>{esc(config["dataset"])}</code></p>')
    if latest["notes"]:
        out.append('<p class="notes">' + "; ".join(esc(n) for n in latest["notes"]) + "</p>")
    out.append('<div class="charts">')
    for metric, label, fmt in SERIES:
        out.append(svg_chart(config["runs"], metric, title=f"{label} over time", value_format=fmt))
    out.append("</div></section>")
    return "\n".join(out)


def _recent_table(runs: Sequence[Mapping[str, Any]], *, airflow_root: str, app_root: str) -> str:
    """The "Recent runs" table: run links to Airflow (`airflow_root`), report links (`app_root`)."""
    if not runs:
        return ""
    esc = html.escape
    out = [
        "<h2>Recent runs</h2><table><thead><tr><th>finished (UTC)</th><th>run</th><th>configuration</th>"
        "<th>AP</th><th>AP Δ</th><th>fps</th><th>p50 ms</th><th>p99 ms</th><th>verdict</th>"
        "<th>report</th></tr></thead><tbody>"
    ]
    for run in runs:
        href = esc(airflow_root + run["run_path"], quote=True)
        report = None if run["report_path"] is None else app_root + run["report_path"]
        out.append(
            f'<tr><td class="time">{esc(_when(run["finished_at"]))}</td>'
            f'<td><a href="{href}" target="_top">{esc(run["dag_id"])} / {esc(run["run_id"])}</a></td>'
            f'<td class="config">{esc(run["label"])}</td>'
            f'<td class="num">{_num(run["AP"], "{:.4f}")}</td>'
            f'<td class="num">{_num(run["ap_delta"], "{:+.4f}")}</td>'
            f'<td class="num">{_num(run["fps"], "{:.2f}")}</td>'
            f'<td class="num">{_num(run["latency_p50_ms"], "{:.2f}")}</td>'
            f'<td class="num">{_num(run["latency_p99_ms"], "{:.2f}")}</td>'
            f"<td>{_badge(run['verdict'])}</td><td>{_report_link(report)}</td></tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def render_page(
    data: Mapping[str, Any], *, airflow_root: str = "../", title: str = "GFocal trends", app_root: str = ""
) -> str:
    """The page of every configuration in `data` (from trend_data). `airflow_root` is the relative
    path from the page to the Airflow UI root (run links), `app_root` the one to the app's root
    (report and JSON links)."""
    esc = html.escape
    out = [
        *_page_head(title),
        f'<p class="notes"><a href="{esc(app_root or "./", quote=True)}">All models</a> · '
        "Per configuration (model, backend/device, precision, batch, policy, dataset); "
        f'points coloured by gate verdict. Data as <a href="{esc(app_root)}api/trends">JSON</a>.</p>',
    ]
    if not data["configurations"]:
        out.append("<p>No runs recorded yet.</p>")
    out.extend(_config_section(config) for config in data["configurations"])
    out.append(_recent_table(data["recent_runs"], airflow_root=airflow_root, app_root=app_root))
    out.append(_page_foot(data))
    return "\n".join(out)


def _variant_cells(model: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The cells of one index row after the model cell."""
    esc = html.escape
    latest = row["latest"]
    more = row["configurations"] - 1
    config = esc(row["configuration"]) + (
        f' <a href="{esc(model["path"], quote=True)}">+{more} more</a>' if more else ""
    )
    return (
        f'<td class="variant">{esc(row["variant"])}</td><td class="verdict">{_badge(latest["verdict"])}</td>'
        f'<td class="num ap">{_num(latest["AP"], "{:.4f}")}</td>'
        f'<td class="num fps">{_num(latest["fps"], "{:.2f}")}</td>'
        f'<td class="spark">{svg_sparkline(row["spark"])}</td>'
        f'<td class="config">{config}</td><td class="time">{esc(_when(latest["finished_at"]))}</td>'
    )


def render_index(
    index: Mapping[str, Any], *, title: str = "GFocal trends", spark_runs: int = SPARK_RUNS
) -> str:
    """The index page for `index` (from index_data): one row per model entry and variant."""
    esc = html.escape
    out = [
        *_page_head(title),
        '<p class="notes">Per model and variant: the latest run of the variant\'s configuration '
        f"(the one of its latest gated run) and its AP over the last {spark_runs} runs. "
        f'<a href="{CONFIGURATIONS_DIR}/">All configurations</a> · data as JSON: '
        '<a href="api/models">models</a>, <a href="api/trends">configurations</a>.</p>',
    ]
    if not index["models"]:
        out.append("<p>No runs recorded yet.</p>")
    else:
        out.append(
            '<table class="models"><thead><tr><th>model</th><th>variant</th><th>verdict</th><th>AP</th>'
            f"<th>fps</th><th>AP, last {spark_runs} runs</th><th>configuration</th>"
            "<th>latest (UTC)</th></tr></thead><tbody>"
        )
        for model in index["models"]:
            rows = model["variants"]
            link = f'<a href="{esc(model["path"], quote=True)}">{esc(model["entry"])}</a>'
            for i, row in enumerate(rows):
                first = f'<td class="entry" rowspan="{len(rows)}">{link}</td>' if i == 0 else ""
                out.append(
                    f'<tr class="variant-row" data-entry="{esc(model["entry"])}" '
                    f'data-variant="{esc(row["variant"])}">{first}{_variant_cells(model, row)}</tr>'
                )
        out.append("</tbody></table>")
    out.append(_page_foot(index))
    return "\n".join(out)


def _legend(series: Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]], rows: Sequence[Mapping]) -> str:
    esc = html.escape
    items = "".join(
        f'<li data-variant="{esc(name)}"><span class="swatch" style="background:{esc(color)}"></span>'
        f'<b>{esc(name)}</b> <span class="notes">{esc(row["configuration"])}</span></li>'
        for (name, color, _), row in zip(series, rows, strict=True)
    )
    return f'<ul class="legend">{items}</ul>'


def render_model_page(
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    *,
    airflow_root: str = "../",
    title: str = "GFocal trends",
    app_root: str = "../../",
) -> str:
    """The page of one model entry: `model` is its index entry (model_index), `data` the
    trend_data of its rows. AP and fps with one line per variant, then its configurations' sections
    and its recent runs. Relative roots as in render_page."""
    esc = html.escape
    entry = model["entry"]
    by_slug = {config["slug"]: config for config in data["configurations"]}
    rows = model["variants"]
    series = [
        (row["variant"], VARIANT_COLORS[i % len(VARIANT_COLORS)], by_slug[row["slug"]]["runs"])
        for i, row in enumerate(rows)
    ]
    json_href = f"{app_root}api/trends?model={quote(entry, safe='')}"
    out = [
        *_page_head(f"{title}: {entry}"),
        f'<p class="notes"><a href="{esc(app_root, quote=True)}">All models</a> · '
        f'<a href="{esc(app_root, quote=True)}{CONFIGURATIONS_DIR}/">All configurations</a> · '
        f'data as <a href="{esc(json_href, quote=True)}">JSON</a>. One line per variant (its '
        "configuration of the latest gated run), points coloured by gate verdict.</p>",
        _legend(series, rows),
        '<div class="charts">',
        *(
            svg_variant_chart(series, metric, title=f"{label} per variant", value_format=fmt)
            for metric, label, fmt in SERIES
        ),
        "</div><h2>Configurations</h2>",
        *(_config_section(config) for config in data["configurations"]),
        _recent_table(data["recent_runs"], airflow_root=airflow_root, app_root=app_root),
        _page_foot(data),
    ]
    return "\n".join(out)


def unknown_model_message(store: HistoryStore, model: str, dag_id: str | None) -> str:
    """Why `?model=` found nothing, naming the recorded model entries."""
    entries = sorted({model_entry(name)[0] for name in store.models(dag_id=dag_id)})
    shown = ", ".join(entries[:30]) + (", ..." if len(entries) > 30 else "")
    where = f" of DAG {dag_id!r}" if dag_id else ""
    return (
        f"no recorded runs of model {model!r}{where} in the history: use a model entry "
        f"(e.g. 'gfocalv2_r50', all its variants) or '<entry>/<variant>'; recorded entries: {shown or 'none'}"
    )


def create_app(
    store: HistoryStore | Callable[[], HistoryStore],
    *,
    dependencies: Sequence[Any] = (),
    airflow_root: str = "../",
    title: str = "GFocal trends",
) -> FastAPI:
    """FastAPI app serving the pages and JSON of the module docstring and the run reports. `store`
    may be a factory, called on the first request, so importing the app (e.g. by the Airflow plugin
    manager) touches no database. `dependencies` are added to every route (the plugin passes
    Airflow's authentication check)."""
    from fastapi import FastAPI

    app = FastAPI(title=title, dependencies=list(dependencies), docs_url=None, redoc_url=None)
    holder: list[HistoryStore] = []

    def get_store() -> HistoryStore:
        if not holder:
            holder.append(store if isinstance(store, HistoryStore) else store())
        return holder[0]

    _add_page_routes(app, get_store, airflow_root=airflow_root, title=title)
    _add_api_routes(app, get_store)
    _add_report_routes(app, get_store)
    return app


def _limit_query() -> Any:
    from fastapi import Query

    return Query(50, ge=1, le=1000, description="runs per configuration")


def _add_page_routes(
    app: FastAPI, get_store: Callable[[], HistoryStore], *, airflow_root: str, title: str
) -> None:
    """`/` (index), `configurations/` (every configuration) and `models/{entry}/` (one model)."""
    from fastapi.responses import HTMLResponse, RedirectResponse

    limit_query = _limit_query()

    def answer(render: Callable[[], str]) -> Response:
        try:
            return HTMLResponse(render())
        except HistoryError as exc:
            return _message_page(title, str(exc), 503)

    @app.get("/", response_class=HTMLResponse)
    def index(limit: int = limit_query, dag_id: str | None = None) -> Response:
        def render() -> str:
            data = load_trend_data(get_store(), per_config=limit, dag_id=dag_id)
            return render_index(index_data(data, spark_runs=min(limit, SPARK_RUNS)), title=title)

        return answer(render)

    # without the trailing slash: a relative redirect (any mount prefix is kept), as the pages'
    # relative links need the slash
    @app.get(f"/{CONFIGURATIONS_DIR}", include_in_schema=False)
    def configurations_without_slash() -> RedirectResponse:
        return RedirectResponse(f"{CONFIGURATIONS_DIR}/", status_code=308)

    @app.get(f"/{MODELS_DIR}/{{entry}}", include_in_schema=False)
    def model_without_slash(entry: str) -> RedirectResponse:
        return RedirectResponse(f"{quote(entry, safe='')}/", status_code=308)

    @app.get(f"/{CONFIGURATIONS_DIR}/", response_class=HTMLResponse)
    def configurations(limit: int = limit_query, dag_id: str | None = None) -> Response:
        def render() -> str:
            data = load_trend_data(get_store(), per_config=limit, dag_id=dag_id)
            return render_page(data, airflow_root="../" + airflow_root, title=title, app_root="../")

        return answer(render)

    @app.get(f"/{MODELS_DIR}/{{entry}}/", response_class=HTMLResponse)
    def model_page(entry: str, limit: int = limit_query, dag_id: str | None = None) -> Response:
        try:
            data = load_trend_data(get_store(), per_config=limit, dag_id=dag_id, model=entry)
            models = model_index(data["configurations"], spark_runs=min(limit, SPARK_RUNS))
            if not models:
                return _message_page(title, unknown_model_message(get_store(), entry, dag_id), 404)
        except HistoryError as exc:
            return _message_page(title, str(exc), 503)
        page = render_model_page(
            data, models[0], airflow_root="../../" + airflow_root, title=title, app_root="../../"
        )
        return HTMLResponse(page)


def _add_api_routes(app: FastAPI, get_store: Callable[[], HistoryStore]) -> None:
    """`api/trends` (configurations) and `api/models` (the index), both with `?model=`: the entry
    and all its variants, or `<entry>/<variant>` exactly; 404 with the recorded entries when
    nothing of that model is recorded."""
    from fastapi import Query
    from fastapi.responses import JSONResponse

    limit_query = _limit_query()
    model_query = Query(None, description="a model entry (all its variants) or <entry>/<variant>")

    def answer(limit: int, dag_id: str | None, model: str | None, shape: Callable[[dict], dict]) -> Response:
        try:
            data = load_trend_data(get_store(), per_config=limit, dag_id=dag_id, model=model)
            if model is not None and not data["configurations"]:
                return JSONResponse({"detail": unknown_model_message(get_store(), model, dag_id)}, 404)
            return JSONResponse(shape(data))
        except HistoryError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.get("/api/trends")
    def trends(
        limit: int = limit_query, dag_id: str | None = None, model: str | None = model_query
    ) -> Response:
        return answer(limit, dag_id, model, lambda data: data)

    @app.get("/api/models")
    def models(
        limit: int = limit_query, dag_id: str | None = None, model: str | None = model_query
    ) -> Response:
        return answer(limit, dag_id, model, lambda data: index_data(data, spark_runs=min(limit, SPARK_RUNS)))


class ReportUnavailable(Exception):
    """Why a run's report cannot be served: the HTTP status and a message that names the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def report_dir(store: HistoryStore, dag_id: str, run_id: str) -> Path:
    """`<run_dir>/report` of a run, the run directory taken from its history rows only (never from
    a request). ReportUnavailable(404) if the run is unknown or no row of it names a run directory;
    HistoryError if the database fails."""
    records = store.run_records(dag_id, run_id)
    if not records:
        raise ReportUnavailable(
            404,
            f"run {run_id!r} of DAG {dag_id!r} is not in the history database {store.url}: "
            "it was not recorded (its record task did not succeed), or the link is wrong",
        )
    details = [r.verdict_detail for r in records if isinstance(r.verdict_detail, dict)]
    run_dir = next((d["run_dir"] for d in details if d.get("run_dir")), None)
    if run_dir is None:
        raise ReportUnavailable(
            404,
            f"run {run_id!r} of DAG {dag_id!r} has no report: its history row names no run directory "
            "(the run predates reports, or its gate did not run); write one with "
            f"`gfocal report --run-dir <work_dir>/{dag_id}/{run_id}`",
        )
    return Path(run_dir) / REPORT_DIR


def read_report(folder: Path) -> bytes:
    """The bytes of `folder`/report.html; ReportUnavailable (404 missing, 503 unreadable) if none."""
    path = folder / REPORT_HTML
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ReportUnavailable(
            404,
            f"no report at {path}: the run predates reports, or its gate did not run; "
            f"write one with `gfocal report --run-dir {folder.parent}`",
        ) from None
    except OSError as exc:
        raise ReportUnavailable(
            503,
            f"cannot read {path}: {exc}; the api-server needs read access to the work directory "
            "(the same shared volume as the workers)",
        ) from None


def check_picture_name(name: str) -> None:
    """ReportUnavailable(404) unless `name` is a report picture's name: no path, no other file."""
    if not PICTURE_NAME.fullmatch(name):
        raise ReportUnavailable(404, f"{name!r} is not the name of a report picture (NN_<image id>.png)")


def picture_file(folder: Path, name: str) -> Path:
    """The picture `name` of the report in `folder`: a name of the report's pictures
    (`NN_<image id>.png`) whose resolved file lies directly in `folder`/pictures; else
    ReportUnavailable(404)."""
    check_picture_name(name)
    pictures = (folder / PICTURES_DIR).resolve()
    path = (pictures / name).resolve()
    if path.parent != pictures or not path.is_file():
        raise ReportUnavailable(404, f"no picture {name!r} in {pictures}")
    return path


def _message_page(title: str, message: str, status: int) -> Response:
    from fastapi.responses import HTMLResponse

    body = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
    body += f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
    return HTMLResponse(body, status_code=status)


def _add_report_routes(app: FastAPI, get_store: Callable[[], HistoryStore]) -> None:
    """`runs/{dag_id}/{run_id}/report/` (report.html) and its `pictures/{name}` (PNG), both found
    through the history; the app's dependencies (authentication) apply to them."""
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

    title = "GFocal report"

    @app.get("/runs/{dag_id}/{run_id}/report", include_in_schema=False)
    def report_without_slash(dag_id: str, run_id: str) -> RedirectResponse:
        # relative, so any mount prefix is kept; report.html's relative picture links need the slash
        return RedirectResponse(f"{REPORT_DIR}/", status_code=308)

    @app.get("/runs/{dag_id}/{run_id}/report/", response_class=HTMLResponse)
    def report(dag_id: str, run_id: str) -> Response:
        try:
            content = read_report(report_dir(get_store(), dag_id, run_id))
        except HistoryError as exc:
            return _message_page(title, str(exc), 503)
        except ReportUnavailable as exc:
            return _message_page(title, str(exc), exc.status)
        return HTMLResponse(content, headers={"Content-Security-Policy": REPORT_CSP})

    @app.get("/runs/{dag_id}/{run_id}/report/pictures/{name}", response_class=FileResponse)
    def picture(dag_id: str, run_id: str, name: str) -> Response:
        try:
            check_picture_name(name)  # before any database read
            path = picture_file(report_dir(get_store(), dag_id, run_id), name)
        except HistoryError as exc:
            return _message_page(title, str(exc), 503)
        except ReportUnavailable as exc:
            return _message_page(title, str(exc), exc.status)
        return FileResponse(path, media_type="image/png")
