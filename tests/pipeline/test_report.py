"""The regression report on runs whose device is worse on purpose (tests/report_fixtures.py): a dropped
class, shifted boxes on portrait images; real evaluation, real pictures, the alert built from it."""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from report_fixtures import make_report_run

from gfocal_pipeline import alerts
from gfocal_pipeline.cli import main
from gfocal_pipeline.errors import EvaluationError
from gfocal_pipeline.report import REPORT_JSON, ReportOptions, load_report, report_dir, write_report
from gfocal_pipeline.retention import is_kept


def _fixture(run_dir: Path) -> dict:
    return json.loads((run_dir / "fixture.json").read_text())


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_report_run(tmp_path_factory.mktemp("dropped"))


def test_the_dropped_class_is_the_first_row(dropped_run: Path) -> None:
    report = load_report(dropped_run)
    dropped = _fixture(dropped_run)["dropped_category"]
    first, rest = report["per_class"][0], report["per_class"][1:]
    assert first["category_id"] == dropped
    # the reference is the ground truth itself (AP 1); the device never finds the class (AP 0)
    assert first["AP_reference"] == 1.0 and first["AP"] == 0.0 and first["delta_reference"] == -1.0
    assert first["boxes"] == 0 and first["boxes_reference"] == first["gt_boxes"] > 0
    assert all(row["delta_reference"] in (0.0, None) for row in rest)
    assert report["against"] == "reference" and report["reference"] == "torch"


def test_the_images_holding_the_dropped_class_rank_first(dropped_run: Path) -> None:
    report = load_report(dropped_run)
    dropped = _fixture(dropped_run)["dropped_category"]
    data = json.loads(Path(load_manifest_annotations(dropped_run)).read_text())
    holding = {a["image_id"] for a in data["annotations"] if a["category_id"] == dropped}
    ranked = report["images"]
    assert {i["image_id"] for i in ranked[: len(holding)]} == holding
    assert all(i["disagreement"] == 0 for i in ranked[len(holding) :])
    # ties are broken by image id: the ranking is a pure function of the inputs
    scores = [(-i["disagreement"], i["image_id"]) for i in ranked]
    assert scores == sorted(scores)
    for item in ranked[: len(holding)]:
        lost = sum(
            a["image_id"] == item["image_id"] and a["category_id"] == dropped for a in data["annotations"]
        )
        assert (
            item["missed"] == lost
            and item["extra"] == 0
            and item["disagreement"] == pytest.approx(0.9 * lost)
        )


def load_manifest_annotations(run_dir: Path) -> str:
    return json.loads((run_dir / "manifest.json").read_text())["annotation_file"]


def test_pictures_are_bounded_pngs_of_the_top_images(dropped_run: Path) -> None:
    report = load_report(dropped_run)
    options = ReportOptions()
    drawn = [i for i in report["images"] if i.get("picture")]
    disagreeing = [i for i in report["images"] if i["disagreement"] > 0]
    assert len(drawn) == min(options.top_images, len(disagreeing))
    assert drawn == report["images"][: len(drawn)]
    for item in drawn:
        path = report_dir(dropped_run) / item["picture"]
        assert path.stat().st_size <= options.picture_bytes
        image = cv2.imread(str(path))
        assert image is not None and max(image.shape[:2]) <= options.thumb_side + 22
        # the three styles are there: green (ground truth), blue (reference), red (device) pixels
        b, g, r = (image[..., k].astype(int) for k in range(3))
        assert ((g > 140) & (r < 80) & (b < 80)).any()
        assert ((b > 200) & (g > 100) & (g < 140) & (r < 30)).any()
        assert ((r > 200) & (g < 80) & (b < 50)).any()
    size = sum(p.stat().st_size for p in report_dir(dropped_run).rglob("*") if p.is_file())
    assert size < 2_000_000


def test_portrait_shift_ranks_portrait_images_first(tmp_path: Path) -> None:
    run_dir = make_report_run(tmp_path, drop_class=False, shift_portrait=True)
    report = load_report(run_dir)
    portrait = set(_fixture(run_dir)["portrait"])
    disagreeing = [i for i in report["images"] if i["disagreement"] > 0]
    assert disagreeing and {i["image_id"] for i in disagreeing} <= portrait
    assert all(i["mislocated"] == i["expected"] for i in disagreeing)  # shifted by half: IoU 1/3
    assert report["by_orientation"][0]["orientation"] == "portrait"
    assert all(row["mean_disagreement"] == 0 for row in report["by_orientation"][1:])


def test_baseline_runs_give_the_baseline_column_and_missing_ones_are_noted(
    dropped_run: Path, tmp_path: Path
) -> None:
    good = make_report_run(tmp_path / "good", drop_class=False, report=False)
    out = tmp_path / "copy"
    shutil.copytree(dropped_run, out)
    baseline = [
        {"dag_id": "d", "run_id": "good", "run_dir": str(good)},
        {"dag_id": "d", "run_id": "gone", "run_dir": str(tmp_path / "gone")},
        {"dag_id": "d", "run_id": "unknown", "run_dir": None},
    ]
    write_report(out, backend="onnxruntime", baseline=baseline)
    report = load_report(out)
    first = report["per_class"][0]
    assert first["category_id"] == _fixture(dropped_run)["dropped_category"]
    assert first["AP_baseline"] == 1.0 and first["delta_baseline"] == -1.0
    assert report["baseline_found"] == 1
    assert any("gone" in n for n in report["notes"]) and any("unknown" in n for n in report["notes"])


def test_without_a_reference_the_device_is_compared_with_ground_truth(
    dropped_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(dropped_run, out)
    write_report(out, backend="onnxruntime", reference=None)
    report = load_report(out)
    assert report["against"] == "ground truth" and report["reference"] is None
    assert report["per_class"][0]["AP_reference"] is None
    dropped = _fixture(dropped_run)["dropped_category"]
    data = json.loads(Path(load_manifest_annotations(out)).read_text())
    holding = {a["image_id"] for a in data["annotations"] if a["category_id"] == dropped}
    assert {i["image_id"] for i in report["images"][: len(holding)]} == holding


def test_the_report_is_deterministic_and_replaced_whole(dropped_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(dropped_run, out)
    before = {p.name: p.read_bytes() for p in (report_dir(out) / "pictures").iterdir()}
    old = load_report(out)
    (report_dir(out) / "stray.txt").write_text("from an older report")
    write_report(out, backend="onnxruntime")
    new = load_report(out)
    assert {k: v for k, v in new.items() if k != "created"} == {
        k: v for k, v in old.items() if k not in ("created", "run_dir")
    } | {"run_dir": str(out)}
    assert {p.name: p.read_bytes() for p in (report_dir(out) / "pictures").iterdir()} == before
    assert not (report_dir(out) / "stray.txt").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_bad_runs_get_a_clear_error_and_no_report(dropped_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(dropped_run, out)
    shutil.rmtree(report_dir(out))
    with pytest.raises(EvaluationError, match=r"no evaluation of backend 'ais_bench'.*evaluate step"):
        write_report(out, backend="ais_bench")
    (out / "eval" / "onnxruntime" / "stats.json").write_text("{not json")
    with pytest.raises(EvaluationError, match=r"stats\.json.*re-run the evaluate step"):
        write_report(out, backend="onnxruntime")
    assert not report_dir(out).exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(EvaluationError, match="top_images"):
        ReportOptions(top_images=51)


def test_retention_keeps_the_report() -> None:
    assert is_kept("report/report.json") and is_kept("report/pictures/01_42.png")
    assert not is_kept("report/.tmp-x.tmp")


def test_failed_alert_carries_the_worst_classes_and_inline_pictures(dropped_run: Path) -> None:
    report = load_report(dropped_run)
    verdict = {
        "passed": False,
        "label": "cfg",
        "run_id": "r1",
        "dag_id": "d",
        "regressed": ["AP"],
        "checks": [],
    }
    verdict["checks"] = [
        {
            "name": "AP floor",
            "metric": "AP",
            "value": 0.1,
            "limit": 0.4,
            "baseline": None,
            "tolerance": None,
            "passed": False,
        }
    ]
    content = alerts.build_alert(verdict, report=report, report_url="http://x/gfocal/runs/d/r1/report/")
    dropped_name = report["per_class"][0]["name"]
    assert dropped_name in content.text and "http://x/gfocal/runs/d/r1/report/" in content.text
    assert len(content.pictures) == len([i for i in report["images"] if i.get("picture")])
    message = email.message_from_bytes(
        bytes(alerts.alert_message(content, "gfocal@example.test", ["oncall@example.test"])),
        policy=email.policy.default,
    )
    _check_inline_pictures(message, len(content.pictures))
    passing = alerts.build_alert({**verdict, "passed": True, "regressed": []}, report=report)
    assert passing.pictures == () and dropped_name in passing.text  # the table, no pictures


def _check_inline_pictures(message: email.message.EmailMessage, count: int) -> None:
    """Text and HTML alternatives; every picture is an image/png part whose Content-ID the HTML cites."""
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)) is not None
    html = message.get_body(("html",)).get_content()
    cited = set(re.findall(r'src="cid:([^"]+)"', html))
    images = [p for p in message.walk() if p.get_content_type() == "image/png"]
    assert len(images) == len(cited) == count > 0
    for part in images:
        assert part["Content-ID"].strip("<>") in cited
        assert cv2.imdecode(np.frombuffer(part.get_content(), np.uint8), cv2.IMREAD_COLOR) is not None


def test_alert_pictures_stay_under_the_byte_cap(dropped_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = load_report(dropped_run)
    sizes = [
        (report_dir(dropped_run) / i["picture"]).stat().st_size for i in report["images"] if i.get("picture")
    ]
    monkeypatch.setattr(alerts, "ALERT_PICTURE_BYTES", sizes[0] + sizes[1])
    assert len(alerts.alert_pictures(report)) == 2


def test_cli_report_writes_the_report(
    dropped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(dropped_run, out)
    shutil.rmtree(report_dir(out))
    assert main(["report", "--run-dir", str(out), "--top-images", "2"]) == 0
    assert (report_dir(out) / "report.html").is_file() and (report_dir(out) / REPORT_JSON).is_file()
    assert len(list((report_dir(out) / "pictures").iterdir())) == 2
    assert main(["report", "--run-dir", str(out), "--top-images", "99"]) == 2
    assert "top_images must be 0..50" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ranking_with_no_confident_boxes_on_a_side() -> None:
    from gfocal_pipeline.disagreement import Boxes, rank_images

    none = Boxes.from_records([])
    one = Boxes.from_records([{"image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.8}])
    assert none.by_image() == {}
    ranked = rank_images(one, none, [5, 7])
    assert [(d.image_id, d.missed, d.score) for d in ranked] == [(7, 1, 0.8), (5, 0, 0.0)]
    assert [(d.image_id, d.extra) for d in rank_images(none, one, [7])] == [(7, 1)]


def test_the_fast_detections_parser_reads_what_evaluate_writes(dropped_run: Path, tmp_path: Path) -> None:
    from gfocal_pipeline.report import _load_detections

    path = dropped_run / "eval" / "onnxruntime" / "detections.json"
    records = json.loads(path.read_text())
    fast = _load_detections(path, 0.0)
    assert len(fast.scores) == len(records) > 0
    assert fast.image_ids.tolist() == [r["image_id"] for r in records]
    assert fast.classes.tolist() == [r["category_id"] for r in records]
    assert np.allclose(fast.boxes, [r["bbox"] for r in records]) and np.allclose(
        fast.scores, [r["score"] for r in records]
    )
    # any other JSON layout (another writer, pretty-printed) goes through json
    other = tmp_path / "detections.json"
    other.write_text(json.dumps(records[:3], indent=1))
    assert _load_detections(other, 0.0).image_ids.tolist() == [r["image_id"] for r in records[:3]]
