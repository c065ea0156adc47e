"""Regression gate: floors, median baselines, tolerances, noisy fps, malformed thresholds."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gfocal_pipeline.gate import (
    GateConfigError,
    GateThresholds,
    RegressionError,
    evaluate,
    format_verdict_table,
    raise_for_verdict,
    run_gate,
)
from gfocal_pipeline.history import LEGACY_DATASET, ConfigKey, HistoryStore, RunRecord

# Two datasets of the same size and image count (the policy names the image count), other images.
POLICY = "mmdet 800x1216 float32 5000img"
DATASET_A = "ann:0123456789abcdef+img:fedcba9876543210"
DATASET_B = "ann:0123456789abcdef+img:00112233aabbccdd"
CONFIG = ConfigKey("gfocal_r50_fpn_1x", "onnxruntime", "cpu", "fp32", 1, POLICY, DATASET_A)
CONFIG_B = replace(CONFIG, dataset=DATASET_B)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# the tolerance arithmetic: fps judged from one baseline run on (the noise rule is tested on its own)
LOOSE = GateThresholds(
    min_ap=0.30, min_fps=10.0, ap_tolerance=0.003, fps_tolerance=0.05, baseline_runs=3, fps_min_runs=1
)


def rec(
    run_id: str,
    ap: float,
    fps: float | None = 100.0,
    day: int = 0,
    verdict: str | None = "pass",
    config: ConfigKey = CONFIG,
) -> RunRecord:
    return RunRecord(
        dag_id="gfocal_onnxruntime",
        run_id=run_id,
        config=config,
        stats={"AP": ap},
        fps=fps,
        finished_at=T0 + timedelta(days=day),
        verdict=verdict,
    )


def history(aps_newest_first, fps=100.0):
    return [rec(f"h{i}", ap, fps, day=-i) for i, ap in enumerate(aps_newest_first)]


def check(verdict, name):
    return next(c for c in verdict["checks"] if c["name"] == name)


def test_first_run_is_judged_on_floors_only_and_says_so():
    verdict = evaluate(rec("now", 0.41, 50.0), [], LOOSE)
    assert verdict["passed"] and verdict["first_run"]
    assert [c["name"] for c in verdict["checks"]] == ["AP floor", "fps floor"]
    assert any("floors only" in note for note in verdict["notes"])
    failing = evaluate(rec("now", 0.29, 50.0), [], LOOSE)
    assert not failing["passed"] and failing["regressed"] == ["AP"]


def test_no_history_and_no_floors_passes_with_a_note():
    verdict = evaluate(rec("now", 0.1, 1.0), [], GateThresholds())
    assert verdict["passed"] and verdict["checks"] == []
    assert any("nothing to compare" in note for note in verdict["notes"])


def test_baseline_is_the_median_of_the_newest_n_runs():
    # newest three: 0.400, 0.410, 0.390 -> median 0.400; the old 0.500 is outside N=3
    verdict = evaluate(rec("now", 0.398), history([0.400, 0.410, 0.390, 0.500]), LOOSE)
    ap = check(verdict, "AP vs baseline")
    assert ap["baseline"] == pytest.approx(0.400)
    assert ap["limit"] == pytest.approx(0.397)
    assert ap["passed"] and verdict["passed"]
    assert verdict["baseline_runs"] == ["h0", "h1", "h2"]


def test_ap_below_tolerance_fails_and_names_ap():
    verdict = evaluate(rec("now", 0.396), history([0.400, 0.400, 0.400]), LOOSE)
    assert not verdict["passed"]
    assert verdict["regressed"] == ["AP"]
    assert not check(verdict, "AP vs baseline")["passed"]
    assert check(verdict, "fps vs baseline")["passed"]


def test_fps_tolerance_is_relative():
    base = history([0.4, 0.4, 0.4], fps=200.0)
    assert evaluate(rec("now", 0.4, 191.0), base, LOOSE)["passed"]  # limit 190
    verdict = evaluate(rec("now", 0.4, 189.0), base, LOOSE)
    assert verdict["regressed"] == ["fps"]
    assert check(verdict, "fps vs baseline")["limit"] == pytest.approx(190.0)


def test_fps_windows_use_their_median():
    base = history([0.4, 0.4, 0.4], fps=100.0)
    # one slow window (a noisy shard) does not fail the run: median(100, 20, 98) = 98 >= 95
    verdict = evaluate(rec("now", 0.4, fps=20.0), base, LOOSE, fps_windows=[100.0, 20.0, 98.0])
    assert verdict["passed"] and verdict["metrics"]["fps"] == 98.0


def test_unmeasured_fps_fails_a_configured_floor_and_skips_the_baseline():
    verdict = evaluate(rec("now", 0.4, fps=None), history([0.4]), LOOSE)
    assert check(verdict, "fps floor")["passed"] is False
    assert all(c["name"] != "fps vs baseline" for c in verdict["checks"])
    assert not verdict["passed"]


def test_history_of_another_configuration_is_refused():
    other = RunRecord(
        "d", "x", ConfigKey("m", "torch", "cpu", "fp32", 1, "p", DATASET_A), {"AP": 0.4}, verdict="pass"
    )
    with pytest.raises(GateConfigError, match="another configuration"):
        evaluate(rec("now", 0.4), [other], LOOSE)


def test_history_of_another_dataset_of_the_same_size_is_refused():
    with pytest.raises(GateConfigError, match=r"\['h0'\] belong to another configuration or dataset"):
        evaluate(rec("now", 0.4, config=CONFIG_B), history([0.4]), LOOSE)


def test_a_legacy_run_says_what_it_is_compared_with():
    legacy = replace(CONFIG, dataset=LEGACY_DATASET)
    verdict = evaluate(rec("now", 0.4, config=legacy), [rec("h0", 0.4, config=legacy)], LOOSE)
    assert verdict["passed"] and verdict["baseline_runs"] == ["h0"]
    assert any("before dataset keys" in note for note in verdict["notes"])
    assert verdict["config"]["dataset"] == LEGACY_DATASET


def test_verdict_is_small_json_and_has_a_readable_table():
    verdict = evaluate(rec("now", 0.39, 80.0), history([0.40, 0.40]), LOOSE)
    assert json.loads(json.dumps(verdict)) == verdict
    assert len(json.dumps(verdict)) < 4000
    table = format_verdict_table(verdict)
    lines = table.splitlines()
    assert lines[0].startswith("FAIL")
    assert lines[1].split() == ["check", "value", "baseline", "tolerance", "limit", "result"]
    ap_row = next(line for line in lines if line.startswith("AP vs baseline"))
    assert ap_row.split()[3:] == ["0.3900", "0.4000", "0.003", ">=", "0.3970", "FAIL"]
    fps_row = next(line for line in lines if line.startswith("fps vs baseline"))
    assert "5%" in fps_row and fps_row.endswith("FAIL")
    assert any("median of 2 run(s)" in line for line in lines)
    with pytest.raises(RegressionError, match="AP, fps"):
        raise_for_verdict(verdict)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"min_ap": "0.4", "fps_tolerance": "5%", "baseline_runs": "7"},
            GateThresholds(min_ap=0.4, fps_tolerance=0.05, baseline_runs=7),
        ),
        ({"min_ap": None, "min_fps": "", "ap_tolerance": 0}, GateThresholds(ap_tolerance=0.0)),
    ],
)
def test_thresholds_parse_from_params(mapping, expected):
    assert GateThresholds.from_mapping(mapping) == expected


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"min_AP": 0.4}, r"unknown gate threshold\(s\) \['min_AP'\]"),
        ({"min_ap": "forty"}, "'min_ap' must be a number"),
        ({"min_ap": 40}, r"'min_ap'=40.0 is outside \[0, 1\]"),
        ({"fps_tolerance": 5}, "looks like a percentage: write 0.05 or '5%'"),
        ({"fps_tolerance": -0.1}, "outside"),
        ({"ap_tolerance": float("inf")}, "finite number"),
        ({"baseline_runs": 0}, "'baseline_runs' must be an integer >= 1"),
        ({"baseline_runs": 2.5}, "whole number"),
        ({"min_fps": True}, "boolean"),
        ({"min_fps": [1]}, "must be a number"),
    ],
)
def test_malformed_thresholds_are_clear_errors(mapping, expected):
    with pytest.raises(GateConfigError, match=expected):
        GateThresholds.from_mapping(mapping)


def test_thresholds_must_be_a_mapping():
    with pytest.raises(GateConfigError, match="must be a mapping"):
        GateThresholds.from_mapping("min_ap=0.4")


@pytest.mark.parametrize("windows", [[], [100.0, float("nan")], [-1.0]])
def test_malformed_fps_windows_are_errors(windows):
    with pytest.raises(GateConfigError, match="fps_windows"):
        evaluate(rec("now", 0.4), [], LOOSE, fps_windows=windows)


def test_run_gate_reads_baseline_and_stores_verdicts_without_losing_rows(tmp_path):
    with HistoryStore(f"sqlite:///{tmp_path / 'h.sqlite'}") as store:
        for day, ap in enumerate([0.401, 0.400, 0.402]):
            run = rec(f"good{day}", ap, day=day, verdict=None)
            store.record(run)
            assert run_gate(store, run, LOOSE)["passed"]
        bad = rec("bad", 0.390, fps=80.0, day=5, verdict=None)
        store.record(bad)
        verdict = run_gate(store, bad, {"min_ap": 0.3, "baseline_runs": 3})
        assert verdict["regressed"] == ["AP", "fps"]
        assert verdict["baseline_runs"] == ["good2", "good1", "good0"]
        (stored,) = [
            r for r in store.runs(CONFIG, limit=10, dag_id="gfocal_onnxruntime") if r.run_id == "bad"
        ]
        assert stored.verdict == "fail" and stored.ap == pytest.approx(0.390) and stored.fps == 80.0
        assert store.count() == 4
        # the failed run is not part of the next run's baseline
        nxt = rec("next", 0.401, day=6, verdict=None)
        store.record(nxt)
        assert run_gate(store, nxt, LOOSE)["baseline_runs"] == ["good2", "good1", "good0"]


def test_a_run_on_dataset_b_has_no_baseline_in_the_history_of_dataset_a(tmp_path):
    no_floors = {"baseline_runs": 3}
    with HistoryStore(f"sqlite:///{tmp_path / 'h.sqlite'}") as store:
        for day, ap in enumerate([0.401, 0.400, 0.402]):
            run = rec(f"a{day}", ap, day=day, verdict=None)
            store.record(run)
            assert run_gate(store, run, no_floors)["passed"]
        # Far below dataset A's baseline (0.401): against A it would fail; on B it is a first run.
        b_run = rec("b0", 0.300, fps=50.0, day=3, verdict=None, config=CONFIG_B)
        store.record(b_run)
        verdict = run_gate(store, b_run, no_floors)
        assert verdict["passed"] and verdict["first_run"] and verdict["baseline_runs"] == []
        assert [c["name"] for c in verdict["checks"]] == []
        assert any("no passing history for this configuration and dataset" in n for n in verdict["notes"])
        assert verdict["config"]["dataset"] == DATASET_B and "img:00112233" in verdict["label"]
        # B's passing run does not leak into A's baseline either: A is still judged against A only.
        a_run = rec("a3", 0.300, fps=50.0, day=4, verdict=None)
        store.record(a_run)
        verdict = run_gate(store, a_run, no_floors)
        assert not verdict["passed"] and verdict["regressed"] == ["AP", "fps"]
        assert verdict["baseline_runs"] == ["a2", "a1", "a0"]
        b_next = rec("b1", 0.301, fps=50.0, day=5, verdict=None, config=CONFIG_B)
        store.record(b_next)
        assert run_gate(store, b_next, no_floors)["baseline_runs"] == ["b0"]


# fps of one configuration run 15 times back to back on the development machine (2-core VM, 2026-12-06:
# ONNX Runtime, 24 demo images at 128x128 in 3 shards, `steps.infer_step` + `combined_timing`), the machine
# otherwise idle: the spread a shared CPU gives one unchanged run (bimodal: 23-24 fps and 26-27 fps)
MEASURED_FPS = [
    22.86,
    24.83,
    25.19,
    26.46,
    26.60,
    26.50,
    23.95,
    26.48,
    26.68,
    23.87,
    26.52,
    23.63,
    26.54,
    26.61,
    26.70,
]
NOISE_DEFAULTS = GateThresholds()  # fps_tolerance 5 %, fps_noise 3 (x stdev), fps_min_runs 3


def fps_history(values):
    return [rec(f"h{i}", 0.4, fps) for i, fps in enumerate(values)]


def test_a_run_inside_the_measured_noise_passes_and_a_30_percent_drop_fails():
    window = MEASURED_FPS[9:14]  # five passing runs, the baseline (median 26.52, stdev 1.54)
    slowest = min(MEASURED_FPS)  # 22.86: an unchanged run, 13.8 % under the median
    verdict = evaluate(rec("now", 0.4, slowest), fps_history(window), NOISE_DEFAULTS)
    fps = check(verdict, "fps vs baseline")
    assert verdict["passed"] and fps["rule"]["by"] == "noise"
    assert fps["limit"] == pytest.approx(26.52 - 3 * 1.5400, abs=0.001)  # sample stdev 1.5400
    assert "3 x spread 1.54" in fps["note"] and "the noise sets it" in fps["note"]
    # the old rule (tolerance alone) called the same unchanged run a regression
    assert not evaluate(rec("now", 0.4, slowest), fps_history(window), replace(NOISE_DEFAULTS, fps_noise=0))[
        "passed"
    ]
    dropped = evaluate(rec("now", 0.4, 0.7 * 26.52), fps_history(window), NOISE_DEFAULTS)
    assert dropped["regressed"] == ["fps"]
    assert "fps vs baseline" in format_verdict_table(dropped) and "noise sets it" in format_verdict_table(
        dropped
    )


def test_every_measured_run_passes_against_most_windows_and_every_30_percent_drop_fails():
    """Over every 5-run window of the measured series, the rule calls a measured (unchanged) run a
    regression in at most 5 % of the cases (the tolerance alone: a third of them), and catches a 30 %
    drop in all."""
    windows = [MEASURED_FPS[i : i + 5] for i in range(len(MEASURED_FPS) - 4)]
    false_alarms = {0.0: 0, 3.0: 0}
    for window in windows:
        for noise in false_alarms:
            t = replace(NOISE_DEFAULTS, fps_noise=noise)
            false_alarms[noise] += sum(
                not evaluate(rec("now", 0.4, fps), fps_history(window), t)["passed"] for fps in MEASURED_FPS
            )
        drop = 0.7 * statistics.median(window)
        assert not evaluate(rec("now", 0.4, drop), fps_history(window), NOISE_DEFAULTS)["passed"]
    cases = len(windows) * len(MEASURED_FPS)
    assert false_alarms[3.0] <= 0.05 * cases < false_alarms[0.0] / 6, (false_alarms, cases)


def test_fps_is_not_judged_before_the_minimum_window():
    verdict = evaluate(rec("now", 0.4, 10.0), fps_history([30.0, 30.0]), NOISE_DEFAULTS)
    assert verdict["passed"] and all(c["name"] != "fps vs baseline" for c in verdict["checks"])
    assert any("fewer than fps_min_runs=3" in note for note in verdict["notes"])
    floor = evaluate(rec("now", 0.4, 10.0), fps_history([30.0, 30.0]), replace(NOISE_DEFAULTS, min_fps=20.0))
    assert floor["regressed"] == ["fps"]  # an absolute floor still applies from the first run


def test_the_verdict_names_where_the_run_and_its_baseline_runs_are(tmp_path) -> None:
    """The regression report finds the baseline runs' per-class AP through these directories."""
    with HistoryStore(f"sqlite:///{tmp_path / 'h.sqlite'}") as store:
        first = rec("b0", 0.40, verdict=None)
        store.record(first)
        run_gate(store, first, LOOSE, run_dir="/work/d/b0")
        nxt = rec("b1", 0.40, day=1, verdict=None)
        store.record(nxt)
        verdict = run_gate(store, nxt, LOOSE, run_dir="/work/d/b1")
    assert verdict["run_dir"] == "/work/d/b1"
    assert verdict["baseline"] == [{"dag_id": first.dag_id, "run_id": "b0", "run_dir": "/work/d/b0"}]
