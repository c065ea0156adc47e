"""The benchmark harness: interleaved rounds, per-round ratios, goals, and the BENCHMARKS.md section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run as bench_run  # noqa: E402


def _suite(calls: list[str], rounds: int = 3, **kwargs) -> common.Suite:
    figures = {"fast": iter([10.0, 12.0, 8.0, 11.0]), "slow": iter([5.0, 5.0, 5.0, 5.0])}

    def contender(name: str):
        def call() -> common.Figures:
            calls.append(name)
            return {"img_per_s": next(figures[name])}

        return call

    return common.Suite(
        name="toy",
        title="Toy",
        contenders={"fast": contender("fast"), "slow": contender("slow")},
        metrics={"img_per_s": "img/s"},
        rounds=rounds,
        **kwargs,
    )


def test_rounds_rotate_order_and_ratios_are_per_round() -> None:
    calls: list[str] = []
    suite = _suite(
        calls,
        warmup=False,
        ratios=[common.Ratio("fast/slow", "fast", "slow", "img_per_s", goal=1.7, every_round=True)],
        bounds=[common.Bound("fast img/s", "fast", "img_per_s", goal=9.0, higher_is_better=True)],
    )
    result = common.run_suite(suite, log=lambda _: None)
    assert calls == ["fast", "slow", "slow", "fast", "fast", "slow"]
    ratio = result["ratios"][0]
    assert ratio["per_round"] == [2.0, 2.4, 1.6]
    assert ratio["median"] == 2.0 and ratio["worst"] == 1.6
    assert ratio["met"] is False  # the median meets 1.7, the worst round does not
    assert result["bounds"][0]["median"] == 10.0 and result["bounds"][0]["met"] is True
    assert result["table"]["fast"]["img_per_s"] == {"median": 10.0, "min": 8.0, "max": 12.0}


def test_warmup_calls_each_contender_once_unmeasured() -> None:
    calls: list[str] = []
    result = common.run_suite(_suite(calls, rounds=2), log=lambda _: None)
    assert calls[:2] == ["fast", "slow"] and len(calls) == 6
    assert [r["fast"]["img_per_s"] for r in result["rounds"]] == [12.0, 8.0]


def test_lower_is_better_goal_judges_the_median() -> None:
    suite = _suite([], warmup=False)
    suite.ratios = [common.Ratio("slow/fast", "slow", "fast", "img_per_s", goal=0.45, higher_is_better=False)]
    ratio = common.run_suite(suite, log=lambda _: None)["ratios"][0]
    assert ratio["worst"] == pytest.approx(5 / 8) and ratio["median"] == pytest.approx(0.5)
    assert ratio["met"] is False


def test_markdown_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Nightly\n\nhand-written\n")
    result = common.run_suite(_suite([], warmup=False), log=lambda _: None)
    report = {
        "date": "today",
        "machine": common.machine(),
        "load_start": [0.0],
        "wall_s": 1.0,
        "suites": [result, {"name": "gpu", "title": "GPU", "skipped": "needs a CUDA GPU"}],
    }
    bench_run.write_markdown(path, bench_run.render(report))
    first = path.read_text()
    assert "hand-written" in first and "| fast |" in first and "Not run: needs a CUDA GPU." in first
    report["suites"] = [{"name": "eval", "title": "Eval", "error": "boom"}]
    bench_run.write_markdown(path, bench_run.render(report))
    second = path.read_text()
    assert "hand-written" in second and "| fast |" not in second and "`boom`" in second
    assert second.count(bench_run.BEGIN) == 1 and second.count(bench_run.END) == 1


@pytest.mark.slow
def test_every_suite_runs_quick() -> None:
    """The benchmark command itself works: each suite on tiny data, nothing written."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--rounds", "1", "--no-write"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Failed to run" not in out.stdout
    for name in bench_run.SUITES:
        assert f"(`{name}`)" in out.stdout


def test_machine_names_the_cpu_and_cores() -> None:
    info = common.machine()
    assert info["cores"] and info["cpu"] and "numpy" in info
    assert len(info["load_avg"]) == 3
