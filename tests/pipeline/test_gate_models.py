"""The gate of a models file entry: the one-sided published-AP check and one verdict over variants."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_gate import CONFIG, rec

from gfocal_pipeline.gate import (
    GateConfigError,
    GateThresholds,
    ModelGateError,
    evaluate,
    format_model_verdict,
    model_verdict,
)

PUBLISHED = 0.410


@pytest.mark.parametrize(
    ("ap", "tolerance", "passed"),
    [
        (0.406, 0.005, True),
        (0.405, 0.005, True),
        (0.4049, 0.005, False),
        (0.392, 0.003, False),
        (0.5, 0.0, True),
    ],
)
def test_published_ap_is_one_sided(ap: float, tolerance: float, passed: bool) -> None:
    thresholds = GateThresholds(published_ap=PUBLISHED, ap_tolerance=tolerance)
    verdict = evaluate(rec("night", ap), [], thresholds)
    (check,) = [c for c in verdict["checks"] if c["name"] == "AP vs published"]
    assert check["limit"] == pytest.approx(PUBLISHED - tolerance)
    assert check["baseline"] == PUBLISHED
    assert check["passed"] is passed and verdict["passed"] is passed
    assert ("AP" in verdict["regressed"]) is not passed


def test_published_ap_is_a_run_option_like_the_floors() -> None:
    assert GateThresholds.from_mapping({"published_ap": ""}).published_ap is None
    assert GateThresholds.from_mapping({"published_ap": "0.41"}).published_ap == pytest.approx(0.41)
    with pytest.raises(GateConfigError, match="published_ap"):
        GateThresholds(published_ap=41.0)


def _verdict(run_id: str, ap: float, published: float | None = None) -> dict:
    config = replace(CONFIG, model=f"zoo/{run_id}")
    return evaluate(rec(run_id, ap, config=config), [], GateThresholds(published_ap=published))


def test_one_verdict_names_every_failing_variant_and_an_expected_failure_that_passes() -> None:
    verdicts = {
        "fp16": _verdict("fp16", 0.30, published=PUBLISHED),  # regressed
        "mix": _verdict("mix", 0.10, published=PUBLISHED),  # known broken, still broken
        "keep": _verdict("keep", 0.409, published=PUBLISHED),  # known broken, now passes
        "fp32": _verdict("fp32", 0.409, published=PUBLISHED),
    }
    expected = {"mix": "allow_mix_precision collapses AP", "keep": "atc 7 dropped NMS", "fp32": None}
    verdict = model_verdict("zoo", verdicts, expected, dag_id="zoo_nightly", run_id="r1")
    assert verdict["passed"] is False
    assert verdict["failing"] == ["fp16"]
    assert verdict["expected_failing"] == ["mix"] and verdict["now_passing"] == ["keep"]
    assert verdict["regressed_by_variant"] == {"fp16": ["AP"]}
    text = str(ModelGateError(verdict))
    assert "zoo: fp16 (AP)" in text and "expected failure now passes: keep" in text
    assert "allow_mix_precision collapses AP" in format_model_verdict(verdict)


def test_known_failures_alone_pass_the_model() -> None:
    verdicts = {"fp16": _verdict("fp16", 0.409, PUBLISHED), "mix": _verdict("mix", 0.1, PUBLISHED)}
    verdict = model_verdict("zoo", verdicts, {"mix": "known"})
    assert verdict["passed"] is True and verdict["expected_failing"] == ["mix"]
    assert format_model_verdict(verdict).startswith("PASS  zoo: all variants OK")
