"""report.html from report.json's data: static HTML, inline CSS, no script, pictures linked relatively.

The page is served by the plugin at `<airflow>/gfocal/runs/<dag_id>/<run_id>/report/`, so the Airflow
run is `../../../../../dags/<dag_id>/runs/<run_id>` and the trend page `../../../../`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

CLASS_ROWS_SHOWN = 15
IMAGE_ROWS_SHOWN = 20
AIRFLOW_ROOT = "../../../../../"
TREND_PAGE = "../../../../"
_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
td.num{text-align:right;font-family:monospace}
.neg{color:#cf222e;font-weight:bold}.pos{color:#1a7f37}
.badge{padding:2px 8px;border-radius:10px;color:#fff}.pass{background:#1a7f37}.fail{background:#cf222e}
.none{background:#6e7781}.notes{color:#57606a;font-size:90%}
figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:85%;max-width:480px}
"""
esc = html.escape
CLASS_ORDER = (
    "Sorted by the largest AP drop (vs the reference or the baseline median, whichever is worse), then by "
    "the loss of detections (any score) vs the reference."
)
IMAGE_RANKING = (
    "Per image, the boxes scoring >= {score_thr} of the {against} are matched to device boxes of the same "
    "class at IoU >= {iou_thr}: missed (no device box of the class overlaps it by 0.1), mislocated (one "
    "overlaps it, below {iou_thr}), extra (a device box left over). Disagreement = the scores of the "
    "missed, mislocated and extra boxes (a ground-truth box scores 1); ties by image id. Pictures: "
    "ground truth green and solid, reference blue and dashed, device red with a filled label."
)


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return '<td class="num">-</td>'
    cls = (
        ' class="num neg"'
        if signed and value < 0
        else (' class="num pos"' if signed and value > 0 else ' class="num"')
    )
    return f"<td{cls}>{value:+.4f}</td>" if signed else f"<td{cls}>{value:.4f}</td>"


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    heads = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def class_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = (
        "class",
        "GT boxes",
        "AP",
        "AP reference",
        "Δ reference",
        "AP baseline",
        "Δ baseline",
        "boxes",
        "boxes reference",
    )
    body = []
    for r in rows:
        ref_boxes = "-" if r["boxes_reference"] is None else str(r["boxes_reference"])
        body.append(
            f"<tr><td>{esc(str(r['name']))}</td><td class='num'>{r['gt_boxes']}</td>{_num(r['AP'])}"
            f"{_num(r['AP_reference'])}{_num(r['delta_reference'], True)}{_num(r['AP_baseline'])}"
            f"{_num(r['delta_baseline'], True)}<td class='num'>{r['boxes']}</td>"
            f"<td class='num'>{ref_boxes}</td></tr>"
        )
    return _table(head, body)


def _size_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [
        f"<tr><td>{esc(r['size'])}</td><td>{esc(r['metric'])}</td>{_num(r['value'])}{_num(r['reference'])}"
        f"{_num(r['delta_reference'], True)}{_num(r['baseline'])}{_num(r['delta_baseline'], True)}</tr>"
        for r in rows
    ]
    return _table(("objects", "metric", "device", "reference", "Δ reference", "baseline", "Δ baseline"), body)


def _orientation_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = [
        f"<tr><td>{esc(r['orientation'])}</td><td class='num'>{r['images']}</td>"
        f"<td class='num'>{r['mean_disagreement']:.3f}</td><td class='num'>{r['missed']}</td>"
        f"<td class='num'>{r['extra']}</td></tr>"
        for r in rows
    ]
    return _table(("orientation", "images", "mean disagreement", "missed + mislocated", "extra"), body)


def _image_rows(images: Sequence[Mapping[str, Any]]) -> str:
    body = [
        f"<tr><td class='num'>{i['image_id']}</td><td>{esc(i['file_name'])}</td>"
        f"<td>{esc(i['orientation'])}</td>"
        f"<td class='num'>{i['disagreement']:.3f}</td><td class='num'>{i['missed']}</td>"
        f"<td class='num'>{i['mislocated']}</td><td class='num'>{i['extra']}</td></tr>"
        for i in images
    ]
    return _table(("image", "file", "orientation", "disagreement", "missed", "mislocated", "extra"), body)


def _figures(images: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for i in images:
        if not i.get("picture"):
            continue
        caption = (
            f"image {i['image_id']} ({esc(i['file_name'])}): {i['missed']} missed, {i['mislocated']} "
            f"mislocated, {i['extra']} extra"
        )
        out.append(
            f'<figure><img src="{esc(i["picture"], quote=True)}" alt="image {i["image_id"]}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "".join(out) or "<p>No image disagrees: no pictures.</p>"


def _header(data: Mapping[str, Any]) -> list[str]:
    verdict = data.get("verdict") or {}
    dag_id, run_id = data.get("dag_id") or "", data.get("run_id") or ""
    if verdict:
        state = "pass" if verdict.get("passed") else "fail"
        regressed = ", ".join(verdict.get("regressed") or [])
        badge = f'<span class="badge {state}">{state.upper()}</span>' + (
            f" regressed: <b>{esc(regressed)}</b>" if regressed else ""
        )
    else:
        badge = '<span class="badge none">not gated</span>'
    parts = [
        f"<h1>Regression report: {esc(dag_id)} / {esc(run_id)}</h1>",
        f"<p>{badge} {esc(str(verdict.get('label', '')))}</p>",
    ]
    baseline = f"{data['baseline_found']} of {len(data['baseline_runs'])} baseline run(s) found"
    parts.append(
        f"<p>Device backend <code>{esc(data['backend'])}</code> compared with the "
        f"<b>{esc(data['against'])}</b>"
        f"{' (' + esc(str(data['reference'])) + ')' if data.get('reference') else ''}; {esc(baseline)}. "
        f"Created {esc(data['created'])}.</p>"
    )
    if dag_id and run_id:
        run = f"{AIRFLOW_ROOT}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
        parts.append(
            f'<p><a href="{esc(run, quote=True)}" target="_top">Airflow run</a> | '
            f'<a href="{TREND_PAGE}">Trend page</a></p>'
        )
    return parts


def render_report(data: Mapping[str, Any]) -> str:
    """The whole page for report.json's `data`."""
    opts = data["options"]
    classes = data["per_class"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>gfocal report {esc(str(data.get('run_id') or ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        *_header(data),
        "<h2>Classes that changed most</h2>",
        f"<p class='notes'>{esc(CLASS_ORDER.format(**opts))}</p>",
        class_table(classes[:CLASS_ROWS_SHOWN]),
        f"<details><summary>All {len(classes)} classes</summary>{class_table(classes)}</details>",
        "<h2>By object size</h2>",
        _size_table(data["by_size"]),
        "<h2>By image orientation</h2>",
        _orientation_table(data["by_orientation"]),
        "<h2>Images that disagree most</h2>",
        f"<p class='notes'>{esc(IMAGE_RANKING.format(against=data['against'], **opts))}</p>",
        _figures(data["images"]),
        _image_rows(data["images"][:IMAGE_ROWS_SHOWN]),
        f"<p class='notes'>{data['images_total']} images ranked.</p>",
    ]
    if data.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in data["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
