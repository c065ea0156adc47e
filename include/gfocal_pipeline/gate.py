"""Regression gate: judge one run against absolute floors and the median of recent passing runs.

The baseline only mixes runs of the same configuration, dataset included (`ConfigKey.dataset`): a run
on another dataset of the same size has no baseline rather than one from foreign data.
AP tolerance is absolute (COCO AP is already a fraction), fps tolerance relative (speed scales with
the machine). Timing is noisy, so the gate takes the median of several fps windows (one per shard), and
judges fps against the baseline window's own spread (see `fps_limit`): a shared CPU whose fps moves by
10-20 % from run to run does not fail a night, a real drop outside that spread does.
The verdict is a small JSON-safe dict (fit for XCom) that the history stores and the alerts render.
"""

from __future__ import annotations

import logging
import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from gfocal_pipeline.errors import ConfigError, GfocalError
from gfocal_pipeline.options import OptionSpec, option, spec_of

if TYPE_CHECKING:  # sqlalchemy costs 0.15 s to import: not for `gfocal infer` (cli -> run_config -> gate)
    from gfocal_pipeline.history import HistoryStore, RunRecord

log = logging.getLogger(__name__)

_EPS = 1e-12


class GateConfigError(ConfigError):
    """Gate thresholds or timing inputs are malformed."""


class RegressionError(GfocalError):
    """The gate failed (the one "gate failed" error: CLI exit status 1, the gate task's failure)."""

    exit_code = 1

    def __init__(self, verdict: Mapping[str, Any]) -> None:
        self.verdict = dict(verdict)
        metrics = ", ".join(verdict.get("regressed", [])) or "unknown metric"
        super().__init__(
            f"regression gate failed for run {verdict.get('run_id')!r} ({verdict.get('label')}): {metrics}\n"
            + format_verdict_table(verdict)
        )


@dataclass(frozen=True)
class GateThresholds:
    """The gate's run options (bounds here are also the trigger form's): floors, tolerances, baseline."""

    min_ap: float | None = option(
        None,
        title="Minimum AP",
        description="Absolute floor, e.g. 0.400. Empty = no floor.",
        kind=float,
        nullable=True,
        minimum=0,
        maximum=1,
        hint="COCO AP is a fraction, e.g. 0.400",
    )
    published_ap: float | None = option(
        None,
        title="Published AP",
        description="The model's published COCO AP, e.g. 0.410: one-sided, the run fails only below "
        "published AP - AP tolerance. Empty = not checked.",
        kind=float,
        nullable=True,
        minimum=0,
        maximum=1,
        hint="COCO AP is a fraction, e.g. 0.410",
    )
    min_fps: float | None = option(
        None,
        title="Minimum fps",
        description="Absolute floor in frames per second. Empty = no floor.",
        kind=float,
        nullable=True,
        minimum=0,
        hint="frames per second, >= 0",
    )
    ap_tolerance: float = option(
        0.003,
        title="AP tolerance",
        description="Allowed AP drop below the baseline (absolute).",
        kind=float,
        minimum=0,
        exclusive_maximum=1,
        hint="absolute AP, e.g. 0.003",
    )
    fps_tolerance: float = option(
        0.05,
        title="fps tolerance",
        description="Allowed fps drop below the baseline (fraction: 0.05 = 5%).",
        kind=float,
        minimum=0,
        exclusive_maximum=1,
        hint="a fraction of the baseline, e.g. 0.05 or '5%'",
    )
    baseline_runs: int = option(
        5,
        title="Baseline runs",
        description="The baseline is the median of the last N passing runs of the same configuration "
        "and dataset.",
        kind=int,
        minimum=1,
        maximum=100,
    )
    fps_noise: float = option(
        3.0,
        title="fps noise factor",
        description="fps fails only below baseline - max(fps tolerance x baseline, this x the standard "
        "deviation of the baseline runs' fps). 0 = the tolerance alone.",
        kind=float,
        minimum=0,
        maximum=100,
        hint="a multiple of the baseline's spread, e.g. 3",
    )
    fps_min_runs: int = option(
        3,
        title="Runs before fps is judged",
        description="fps is compared with the baseline only once this many passing runs of the "
        "configuration have an fps (their spread is what the noise factor scales).",
        kind=int,
        minimum=1,
        maximum=100,
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            spec, value = spec_of(item), getattr(self, item.name)
            if spec.kind is int:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= spec.maximum:
                    raise GateConfigError(
                        f"gate threshold {item.name!r} must be an integer >= 1 and <= {spec.maximum:g}, "
                        f"got {value!r}"
                    )
                continue
            hint = spec.hint
            if item.name == "fps_tolerance" and isinstance(value, numbers.Real) and 1.0 <= value <= 100.0:
                hint = f"{value} looks like a percentage: write {value / 100:g} or '{value:g}%'"
            _check_range(item.name, value, spec, hint)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GateThresholds:
        """Parse thresholds from DAG params or a config file; numbers may be strings, fps_tolerance '5%'."""
        if not isinstance(data, Mapping):
            raise GateConfigError(f"gate thresholds must be a mapping, got {type(data).__name__}: {data!r}")
        known = {f.name: spec_of(f).kind for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise GateConfigError(f"unknown gate threshold(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, raw in data.items():
            if raw is None or raw == "":
                if name in NULLABLE_THRESHOLDS:
                    values[name] = None
                continue
            values[name] = _parse_number(name, raw, integer=known[name] is int)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


NULLABLE_THRESHOLDS = ("min_ap", "published_ap", "min_fps")


def _parse_number(name: str, raw: Any, *, integer: bool) -> float | int:
    if isinstance(raw, bool):
        raise GateConfigError(f"gate threshold {name!r} must be a number, got the boolean {raw!r}")
    if isinstance(raw, numbers.Real):
        value: float = float(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        scale = 1.0
        if text.endswith("%") and name == "fps_tolerance":
            text, scale = text[:-1].strip(), 0.01
        try:
            value = float(text) * scale
        except ValueError:
            raise GateConfigError(f"gate threshold {name!r} must be a number, got {raw!r}") from None
    else:
        raise GateConfigError(f"gate threshold {name!r} must be a number, got {type(raw).__name__} {raw!r}")
    if integer:
        if not value.is_integer():
            raise GateConfigError(f"gate threshold {name!r} must be a whole number, got {raw!r}")
        return int(value)
    return value


def _check_range(name: str, value: Any, spec: OptionSpec, hint: str) -> None:
    if value is None and spec.nullable:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise GateConfigError(f"gate threshold {name!r} must be a finite number ({hint}), got {value!r}")
    low = spec.minimum or 0.0
    upper_open = spec.exclusive_maximum is not None
    high = spec.exclusive_maximum if upper_open else spec.maximum if spec.maximum is not None else math.inf
    if value < low or (value >= high if upper_open else value > high):
        bracket = ")" if upper_open else "]"
        raise GateConfigError(
            f"gate threshold {name!r}={value!r} is outside [{low:g}, {high:g}{bracket}: {hint}"
        )


def _median_fps(values: Sequence[float] | float, what: str) -> float:
    items = [values] if isinstance(values, numbers.Real) else list(values)
    if not items:
        raise GateConfigError(f"{what} is empty: pass at least one fps measurement")
    for item in items:
        if (
            isinstance(item, bool)
            or not isinstance(item, numbers.Real)
            or not math.isfinite(item)
            or item < 0
        ):
            raise GateConfigError(f"{what} must hold finite fps values >= 0, got {item!r}")
    return float(statistics.median(items))


def _check(
    name: str,
    metric: str,
    value: float | None,
    limit: float | None,
    *,
    baseline: float | None = None,
    tolerance: float | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    passed = value is not None and limit is not None and value >= limit - _EPS
    return {
        "name": name,
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "tolerance": tolerance,
        "limit": limit,
        "passed": passed,
        "note": note,
    }


def fps_limit(values: Sequence[float], t: GateThresholds) -> dict[str, Any]:
    """The fps rule: the lowest fps that passes against a baseline window of passing runs' fps.

    limit = median - max(fps_tolerance x median, fps_noise x stdev), stdev being the window's sample
    standard deviation (its spread); the larger allowance wins and is recorded (`by`: tolerance |
    noise). The standard deviation, not the median absolute deviation: CPU timings are bimodal (a
    quiet and a busy machine), where the MAD of a few runs is the spread of one mode only."""
    baseline = float(statistics.median(values))
    spread = float(statistics.stdev(values)) if len(values) > 1 else 0.0
    by_tolerance, by_noise = t.fps_tolerance * baseline, t.fps_noise * spread
    allowed = max(by_tolerance, by_noise)
    return {
        "baseline": baseline,
        "window": len(values),
        "spread": spread,
        "allowed_drop": allowed,
        "by": "noise" if by_noise > by_tolerance else "tolerance",
        "limit": baseline - allowed,
    }


def _fps_rule_note(rule: Mapping[str, Any], t: GateThresholds) -> str:
    return (
        f"limit = median of {rule['window']} run(s) {rule['baseline']:.2f} - max({t.fps_tolerance:g} x "
        f"median = {t.fps_tolerance * rule['baseline']:.2f}, {t.fps_noise:g} x spread {rule['spread']:.2f} "
        f"= {t.fps_noise * rule['spread']:.2f}): the {rule['by']} sets it"
    )


def _fps_checks(
    fps: float | None, values: Sequence[float], t: GateThresholds, note: str | None, notes: list[str]
) -> list[dict]:
    checks = []
    if t.min_fps is not None:
        checks.append(
            _check(
                "fps floor", "fps", fps, t.min_fps, note=note or (None if fps is not None else "not measured")
            )
        )
    if fps is None or not values:
        return checks
    if len(values) < t.fps_min_runs:
        notes.append(
            f"fps not compared with the baseline: {len(values)} passing run(s) with an fps, fewer than "
            f"fps_min_runs={t.fps_min_runs} (too few to know this machine's noise)"
        )
        return checks
    rule = fps_limit(values, t)
    detail = _fps_rule_note(rule, t) + (f"; {note}" if note else "")
    check = _check(
        "fps vs baseline", "fps", fps, rule["limit"], baseline=rule["baseline"], tolerance=t.fps_tolerance
    )
    checks.append({**check, "note": detail, "rule": rule})
    return checks


def _ap_checks(ap: float, base: Sequence[RunRecord], t: GateThresholds) -> list[dict[str, Any]]:
    checks = []
    if t.min_ap is not None:
        checks.append(_check("AP floor", "AP", ap, t.min_ap))
    if t.published_ap is not None:
        limit = t.published_ap - t.ap_tolerance
        check = _check("AP vs published", "AP", ap, limit, baseline=t.published_ap, tolerance=t.ap_tolerance)
        checks.append(check)
    if base:
        baseline = statistics.median(r.ap for r in base)
        limit = baseline - t.ap_tolerance
        checks.append(_check("AP vs baseline", "AP", ap, limit, baseline=baseline, tolerance=t.ap_tolerance))
    return checks


def _baseline_notes(runs: int, wanted: int, any_checks: bool) -> list[str]:
    notes = []
    if not runs:
        notes.append("no passing history for this configuration and dataset: judged on absolute floors only")
    elif runs < wanted:
        notes.append(f"baseline is the median of {runs} run(s), fewer than the {wanted} requested")
    if not any_checks:
        notes.append("no floors configured and no baseline: nothing to compare")
    return notes


def _baseline_entries(base: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Where each baseline run's results are (the regression report reads their per-class AP)."""
    return [
        {"dag_id": r.dag_id, "run_id": r.run_id, "run_dir": (r.verdict_detail or {}).get("run_dir")}
        for r in base
    ]


def evaluate(
    record: RunRecord,
    history: Sequence[RunRecord],
    thresholds: GateThresholds | Mapping[str, Any],
    *,
    fps_windows: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Judge `record` against floors and the median of the newest `baseline_runs` of `history`
    (passing runs of the same configuration and dataset, newest first). Pure."""
    t = thresholds if isinstance(thresholds, GateThresholds) else GateThresholds.from_mapping(thresholds)
    foreign = [r.run_id for r in history if r.config != record.config]
    if foreign:
        raise GateConfigError(
            f"history runs {foreign} belong to another configuration or dataset than "
            f"{record.config.label}: pass only the store's passing_history of the run's config"
        )
    base = [r for r in history if not (r.dag_id == record.dag_id and r.run_id == record.run_id)]
    base = base[: t.baseline_runs]
    notes: list[str] = []
    if record.config.legacy:
        notes.append("run recorded before dataset keys: compared with other runs of that time only")

    fps = record.fps
    fps_note = None
    if fps_windows is not None:
        fps = _median_fps(fps_windows, "fps_windows")
        fps_note = f"median of {len(fps_windows)} timing windows"
    if fps is None:
        notes.append("fps was not measured: speed checks skipped" + (" (floor fails)" if t.min_fps else ""))

    fps_values = [r.fps for r in base if r.fps is not None]
    checks = [*_ap_checks(record.ap, base, t), *_fps_checks(fps, fps_values, t, fps_note, notes)]
    notes += _baseline_notes(len(base), t.baseline_runs, bool(checks))

    regressed = list(dict.fromkeys(c["metric"] for c in checks if not c["passed"]))
    verdict = {
        "passed": not regressed,
        "dag_id": record.dag_id,
        "run_id": record.run_id,
        "config": record.config.as_dict(),
        "label": record.config.label,
        "metrics": {"AP": record.ap, "fps": fps, "ap_delta": record.ap_delta},
        "checks": checks,
        "regressed": regressed,
        "baseline_runs": [r.run_id for r in base],
        "baseline": _baseline_entries(base),
        "first_run": not base,
        "notes": notes,
        "thresholds": t.as_dict(),
    }
    log.info(
        "gate %s for %s:\n%s",
        "passed" if verdict["passed"] else "FAILED",
        record.run_id,
        format_verdict_table(verdict),
    )
    return verdict


def run_gate(
    store: HistoryStore,
    record: RunRecord,
    thresholds: GateThresholds | Mapping[str, Any],
    *,
    fps_windows: Sequence[float] | None = None,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Read the baseline from `store`, judge `record` (already recorded) and store the verdict on its row.

    `run_dir` is kept in the verdict (the report page and later reports find the run's files by it).
    A HistoryError (database unreachable) propagates and fails the task (its alert names the error).
    """
    t = thresholds if isinstance(thresholds, GateThresholds) else GateThresholds.from_mapping(thresholds)
    history = store.passing_history(
        record.config, limit=t.baseline_runs, exclude=(record.dag_id, record.run_id)
    )
    verdict = evaluate(record, history, t, fps_windows=fps_windows)
    if run_dir is not None:
        verdict["run_dir"] = str(run_dir)
    store.set_verdict(record.dag_id, record.run_id, record.config, verdict)
    return verdict


def raise_for_verdict(verdict: Mapping[str, Any]) -> None:
    """Raise RegressionError when the verdict failed."""
    if not verdict.get("passed"):
        raise RegressionError(verdict)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if metric == "AP" else f"{value:.2f}"


def verdict_rows(verdict: Mapping[str, Any]) -> list[list[str]]:
    """Table rows (header first) of formatted cells: check, value, baseline, tolerance, limit, result."""
    rows = [["check", "value", "baseline", "tolerance", "limit", "result"]]
    for check in verdict.get("checks", []):
        metric, tolerance = check["metric"], check["tolerance"]
        if tolerance is None:
            tol = "-"
        elif metric == "fps":
            tol = f"{tolerance * 100:g}%"
        else:
            tol = f"{tolerance:g}"
        limit = "-" if check["limit"] is None else ">= " + _fmt(metric, check["limit"])
        rows.append(
            [
                check["name"],
                _fmt(metric, check["value"]),
                _fmt(metric, check["baseline"]),
                tol,
                limit,
                "ok" if check["passed"] else "FAIL",
            ]
        )
    return rows


def format_verdict_table(verdict: Mapping[str, Any]) -> str:
    """Plain-text summary: headline, aligned checks table, notes."""
    status = "PASS" if verdict.get("passed") else "FAIL"
    lines = [f"{status}  {verdict.get('label', '')}  run {verdict.get('run_id', '')}"]
    rows = verdict_rows(verdict)
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
    lines += [f"note: {note}" for note in verdict.get("notes", [])]
    lines += [f"{c['name']}: {c['note']}" for c in verdict.get("checks", []) if c.get("note")]
    return "\n".join(lines)


def model_verdict(
    model: str,
    verdicts: Mapping[str, Mapping[str, Any]],
    expected_failures: Mapping[str, str | None],
    *,
    dag_id: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """One verdict over every variant of a models file entry's night (a verdict per variant).

    A variant listed in `expected_failures` (name -> reason) that fails does not fail the model; one
    that passes does (`now_passing`: the list must be updated, so it does not rot). Pure."""
    expected = {name: why for name, why in expected_failures.items() if why}
    failing = [name for name, v in verdicts.items() if not v.get("passed") and name not in expected]
    known = [name for name, v in verdicts.items() if not v.get("passed") and name in expected]
    now_passing = [name for name, v in verdicts.items() if v.get("passed") and name in expected]
    regressed = {name: list(verdicts[name].get("regressed", [])) for name in failing}
    return {
        "passed": not failing and not now_passing,
        "model": model,
        "dag_id": dag_id,
        "run_id": run_id,
        "label": model,
        "failing": failing,
        "regressed_by_variant": regressed,
        "expected_failing": known,
        "now_passing": now_passing,
        "expected_failures": expected,
        "variants": {name: dict(v) for name, v in verdicts.items()},
    }


def model_verdict_headline(verdict: Mapping[str, Any]) -> str:
    """`<model>: <variant> (<metrics>), ...; expected failure now passes: <variant>` or `... OK`."""
    parts = [
        f"{name} ({', '.join(metrics) or 'no comparison'})"
        for name, metrics in verdict.get("regressed_by_variant", {}).items()
    ]
    text = f"{verdict.get('model')}: " + (", ".join(parts) if parts else "")
    if verdict.get("now_passing"):
        text += ("; " if parts else "") + "expected failure now passes: " + ", ".join(verdict["now_passing"])
    return text if parts or verdict.get("now_passing") else f"{verdict.get('model')}: all variants OK"


def format_model_verdict(verdict: Mapping[str, Any]) -> str:
    """Plain text: the headline, then each variant's table (expected failures marked with their reason)."""
    status = "PASS" if verdict.get("passed") else "FAIL"
    lines = [f"{status}  {model_verdict_headline(verdict)}  run {verdict.get('run_id', '')}"]
    expected = verdict.get("expected_failures", {})
    for name, variant in verdict.get("variants", {}).items():
        mark = ""
        if name in verdict.get("now_passing", []):
            mark = f"  [expected failure NOW PASSES: remove it from expected_failures ({expected[name]})]"
        elif name in expected:
            mark = f"  [expected failure: {expected[name]}]"
        lines += ["", f"variant {name}{mark}", format_verdict_table(variant)]
    return "\n".join(lines)


class ModelGateError(RegressionError):
    """The gate of a models file entry's night failed (a variant regressed, or an expected failure passes)."""

    def __init__(self, verdict: Mapping[str, Any]) -> None:
        self.verdict = dict(verdict)
        GfocalError.__init__(
            self,
            f"regression gate failed for run {verdict.get('run_id')!r}: {model_verdict_headline(verdict)}\n"
            + format_model_verdict(verdict),
        )
