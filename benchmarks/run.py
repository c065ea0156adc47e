"""Every side-by-side benchmark in one command; writes BENCHMARKS.md and a JSON file.

    .venv/bin/python benchmarks/run.py                # all suites, < 10 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --only eval    # one suite
    .venv/bin/python benchmarks/run.py --quick --no-write  # smoke run (seconds per suite)

Each suite (benchmarks/bench_<name>.py, see common.py) generates its own data, then its contenders
run interleaved, round after round. The measured section of BENCHMARKS.md sits between two marker
lines and is replaced on each run; everything else in the file (e.g. the nightly benchmark) is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from common import dump, machine, quiet_logging, run_suite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUITES = ("preprocess", "eval", "infer", "gpu")
BEGIN = "<!-- benchmarks/run.py: begin (generated; edits here are overwritten) -->"
END = "<!-- benchmarks/run.py: end -->"


def _run_one(name: str, work: Path, quick: bool, rounds: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench_{name}")
        suite = module.suite(work / name, quick=quick)
        if rounds is not None and not suite.skipped:
            suite.rounds = rounds
        return run_suite(suite, log=lambda line: print(line, flush=True))
    except Exception as exc:  # one broken suite must not hide the others' numbers
        traceback.print_exc()
        return {
            "name": name,
            "title": name,
            "error": f"{type(exc).__name__}: {exc}",
            "wall_s": round(time.perf_counter() - started, 1),
        }


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


def _contender_table(result: dict[str, Any]) -> list[str]:
    metrics = result["metrics"]
    head = "| contender | " + " | ".join(f"{key} ({unit}): median [min-max]" for key, unit in metrics.items())
    lines = [head + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, figures in result["table"].items():
        cells = []
        for key in metrics:
            cell = figures.get(key)
            cells.append(
                "-" if cell is None else f"{_fmt(cell['median'])} [{_fmt(cell['min'])}-{_fmt(cell['max'])}]"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _goal_table(result: dict[str, Any]) -> list[str]:
    rows = []
    for ratio in result["ratios"]:
        sign = ">=" if ratio["higher_is_better"] else "<="
        goal = "-" if ratio["goal"] is None else f"{sign} {_fmt(ratio['goal'])} ({ratio['goal_applies_to']})"
        rounds = ", ".join(_fmt(v) for v in ratio["per_round"])
        rows.append(
            f"| {ratio['label']} | {_fmt(ratio['median'])} | {_fmt(ratio['worst'])} | {rounds} | {goal} "
            f"| {_verdict(ratio['met'])} |"
        )
    for bound in result["bounds"]:
        sign = ">=" if bound["higher_is_better"] else "<="
        rows.append(
            f"| {bound['label']} | {_fmt(bound['median'])} | - | - | {sign} {_fmt(bound['goal'])} (median) "
            f"| {_verdict(bound['met'])} |"
        )
    if not rows:
        return []
    return [
        "",
        "| figure | median | worst round | per round | goal | |",
        "|---|---:|---:|---|---|---|",
        *rows,
    ]


def render_suite(result: dict[str, Any]) -> list[str]:
    """The Markdown of one suite's result."""
    lines = [f"### {result['title']} (`{result['name']}`)", ""]
    if "error" in result:
        return [*lines, f"**Failed to run**: `{result['error']}`", ""]
    if "skipped" in result:
        return [
            *lines,
            f"Not run: {result['skipped']}.",
            "",
            *[f"- {n}" for n in result.get("notes", [])],
            "",
        ]
    rounds = len(result["rounds"])
    lines += [
        f"{rounds} rounds, contenders interleaved (rotating order); suite wall {result['wall_s']} s.",
        "",
    ]
    lines += _contender_table(result)
    lines += _goal_table(result)
    if result["facts"]:
        lines += ["", *[f"- {key}: {value}" for key, value in result["facts"].items()]]
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    """The generated section of BENCHMARKS.md."""
    info = report["machine"]
    versions = ", ".join(
        f"{key} {info[key]}"
        for key in ("python", "numpy", "cv2", "onnxruntime", "torch", "faster_coco_eval", "pycocotools")
        if key in info
    )
    lines = [
        BEGIN,
        "## Side by side (benchmarks/run.py)",
        "",
        "`.venv/bin/python benchmarks/run.py` runs every suite below on data it generates, interleaving the "
        "contenders round by round, and rewrites this section and `benchmarks/results.json`. "
        "Ratios are computed per round (both sides measured in the same round), then the median and "
        "the worst round are shown. The recipe-style contenders live in `benchmarks/recipe/`: they "
        "reimplement the ModelZoo scripts from the documented facts, as baselines.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {report['date']} |",
        f"| CPU | {info['cpu']}, {info['cores']} cores |",
        f"| RAM | {info.get('ram_gib', '?')} GiB |",
        f"| GPU | {info.get('gpu', 'none')} |",
        f"| software | {versions} |",
        f"| load average at start / end | {report['load_start']} / {info['load_avg']} |",
        f"| total wall | {report['wall_s']} s |",
        "",
        "**No figure here comes from an NPU.** ONNX Runtime runs on the CPU of the machine above.",
        "",
    ]
    for result in report["suites"]:
        lines += render_suite(result)
    return "\n".join([*lines, END]) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the generated section of `path` (append it when the file has none)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=SUITES, help="run this suite (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny data, for a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="override every suite's round count")
    parser.add_argument(
        "--work", type=Path, default=None, help="where data is generated (default: a temp dir)"
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--no-write", action="store_true", help="print the section; write no file")
    args = parser.parse_args(argv)
    quiet_logging()
    started = time.perf_counter()
    load_start = machine()["load_avg"]
    with tempfile.TemporaryDirectory(prefix="gfocal-bench-") as tmp:
        work = args.work or Path(tmp)
        results = [_run_one(name, work, args.quick, args.rounds) for name in args.only or SUITES]
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_start": load_start,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - started, 1),
        "suites": results,
    }
    section = render(report)
    if args.no_write:
        print(section)
    else:
        dump(args.json, report)
        write_markdown(args.markdown, section)
        print(f"wrote {args.markdown} and {args.json} ({report['wall_s']} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
