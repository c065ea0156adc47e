"""The shape every side-by-side benchmark shares, so `run.py` can interleave and report them alike.

A benchmark module exposes ``suite(work: Path, quick: bool) -> Suite``. `run.py` calls each
contender once per round, in a rotating order (so no contender always runs first or last on a
loaded machine), and reports medians, minima and per-round ratios.

A contender is a zero-argument callable returning the round's figures, e.g.
``{"img_per_s": 41.2}`` or ``{"seconds": 6.9}``; every contender of a suite reports the same keys.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Figures = dict[str, float]


@dataclass
class Ratio:
    """`numerator.metric / denominator.metric`, computed per round; `goal` is the bound to meet.

    ``higher_is_better`` decides whether the goal is a minimum (``>= goal``) or a maximum.
    ``every_round`` makes the goal apply to the worst round instead of the median.
    """

    label: str
    numerator: str
    denominator: str
    metric: str
    goal: float | None = None
    higher_is_better: bool = True
    every_round: bool = False


@dataclass
class Bound:
    """An absolute goal on one contender's median figure (e.g. evaluation <= 10 s)."""

    label: str
    contender: str
    metric: str
    goal: float
    higher_is_better: bool = False


@dataclass
class Suite:
    """One benchmark: its contenders, what to compare, and facts established once (bytes identical...)."""

    name: str
    title: str
    contenders: dict[str, Callable[[], Figures]]
    metrics: dict[str, str]  # metric key -> unit shown in the table, e.g. {"img_per_s": "img/s"}
    ratios: list[Ratio] = field(default_factory=list)
    bounds: list[Bound] = field(default_factory=list)
    rounds: int = 5
    warmup: bool = True  # call every contender once before the measured rounds
    setup_s: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)  # shown under the table; may be set by contenders
    notes: list[str] = field(default_factory=list)  # conditions, profile of a miss, ...
    close: Callable[[], None] | None = None
    skipped: str | None = None  # why the suite did not run (e.g. "needs a CUDA GPU")


def run_suite(suite: Suite, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `suite`'s rounds interleaved; return every figure, medians, minima and ratios."""
    if suite.skipped:
        log(f"[{suite.name}] skipped: {suite.skipped}")
        return {"name": suite.name, "title": suite.title, "skipped": suite.skipped, "notes": suite.notes}
    names = list(suite.contenders)
    started = time.perf_counter()
    if suite.warmup:
        for name in names:
            suite.contenders[name]()
    rounds: list[dict[str, Figures]] = []
    for index in range(suite.rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        figures = {name: suite.contenders[name]() for name in order}
        rounds.append({name: figures[name] for name in names})
        log(f"[{suite.name}] round {index + 1}/{suite.rounds}: " + _round_text(rounds[-1]))
    result = _summarize(suite, rounds)
    result["wall_s"] = round(time.perf_counter() - started + suite.setup_s, 1)
    if suite.close:
        suite.close()
    return result


def _round_text(figures: dict[str, Figures]) -> str:
    return "; ".join(f"{n} " + ", ".join(f"{k}={v:.4g}" for k, v in f.items()) for n, f in figures.items())


def _goal_met(value: float, goal: float | None, higher: bool) -> bool | None:
    if goal is None:
        return None
    return value >= goal if higher else value <= goal


def _summarize(suite: Suite, rounds: list[dict[str, Figures]]) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in suite.contenders:
        table[name] = {}
        for metric in suite.metrics:
            values = [r[name][metric] for r in rounds if metric in r[name]]
            if values:
                table[name][metric] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
    ratios = []
    for ratio in suite.ratios:
        per_round = [r[ratio.numerator][ratio.metric] / r[ratio.denominator][ratio.metric] for r in rounds]
        median = statistics.median(per_round)
        worst = min(per_round) if ratio.higher_is_better else max(per_round)
        judged = worst if ratio.every_round else median
        ratios.append(
            {
                "label": ratio.label,
                "numerator": ratio.numerator,
                "denominator": ratio.denominator,
                "metric": ratio.metric,
                "per_round": per_round,
                "median": median,
                "worst": worst,
                "goal": ratio.goal,
                "goal_applies_to": "every round" if ratio.every_round else "median",
                "higher_is_better": ratio.higher_is_better,
                "met": _goal_met(judged, ratio.goal, ratio.higher_is_better),
            }
        )
    bounds = []
    for bound in suite.bounds:
        median = table[bound.contender][bound.metric]["median"]
        bounds.append(
            {
                "label": bound.label,
                "contender": bound.contender,
                "metric": bound.metric,
                "median": median,
                "goal": bound.goal,
                "higher_is_better": bound.higher_is_better,
                "met": _goal_met(median, bound.goal, bound.higher_is_better),
            }
        )
    return {
        "name": suite.name,
        "title": suite.title,
        "rounds": rounds,
        "metrics": suite.metrics,
        "table": table,
        "ratios": ratios,
        "bounds": bounds,
        "facts": suite.facts,
        "notes": suite.notes,
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["ram_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    for module in ("numpy", "cv2", "onnxruntime", "torch", "faster_coco_eval", "pycocotools"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            continue
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if gpu.returncode == 0 and gpu.stdout.strip():
            info["gpu"] = gpu.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def dump(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    tmp.replace(path)


def quiet_logging() -> None:
    """Keep the library's INFO progress out of benchmark output."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
