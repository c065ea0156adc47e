"""The trend page's charts as inline SVG (no script, no CDN): a chart per configuration, a chart with
one line per variant of a model, and the index's AP sparklines. Pure functions of the points the
trend page's data holds (`trend.trend_data`)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

VERDICT_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", None: "#6e7781"}


def svg_chart(
    points: Sequence[Mapping[str, Any]],
    metric: str,
    *,
    title: str,
    value_format: str = "{:.4g}",
    width: int = 460,
    height: int = 180,
) -> str:
    """Inline SVG line chart of `metric` over `points` (oldest first), x spaced by run order.

    Each point is a circle coloured by verdict with a <title> tooltip (run id, time, value).
    """
    esc = html.escape
    values = [(i, p) for i, p in enumerate(points) if p.get(metric) is not None]
    left, right, top, bottom = 58, 12, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-series="{esc(metric)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<text x="{left}" y="15" class="chart-title">{esc(title)}</text>',
    ]
    if not values:
        parts.append(
            f'<text x="{left}" y="{top + plot_h / 2:.1f}" class="empty">no {esc(metric)} data</text>'
        )
        return "".join(parts) + "</svg>"
    low, high = _padded_range([float(p[metric]) for _, p in values])
    frame = _ChartFrame(left, top, plot_w, plot_h, low, high, len(points))
    parts.extend(_grid_lines(frame, value_format))
    parts.extend(_date_labels(points, frame, height))
    parts.extend(_series(values, metric, frame, value_format))
    return "".join(parts) + "</svg>"


@dataclass(frozen=True)
class _ChartFrame:
    """Where a chart's plot area lies, the value range it shows and how many runs it spans."""

    left: int
    top: int
    plot_w: int
    plot_h: int
    low: float
    high: float
    count: int

    def x_of(self, index: float) -> float:
        """x of the run at `index` (centred when there is one run)."""
        return self.left + (self.plot_w / 2 if self.count == 1 else self.plot_w * index / (self.count - 1))

    def y_of(self, value: float) -> float:
        """y of `value` (higher values further up)."""
        return self.top + self.plot_h * (self.high - value) / (self.high - self.low)


def _padded_range(numbers: Sequence[float]) -> tuple[float, float]:
    """(low, high) of `numbers` widened by 10% of their span (or a little, when all are equal)."""
    low, high = min(numbers), max(numbers)
    pad = (high - low) * 0.1 or max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad


def _grid_lines(frame: _ChartFrame, value_format: str) -> list[str]:
    """Four horizontal grid lines with their value labels, bottom to top."""
    esc = html.escape
    parts = []
    for step in range(4):
        value = frame.low + (frame.high - frame.low) * step / 3
        y = frame.y_of(value)
        parts.append(
            f'<line x1="{frame.left}" y1="{y:.1f}" x2="{frame.left + frame.plot_w}" y2="{y:.1f}" '
            'class="grid"/>'
            f'<text x="{frame.left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{esc(value_format.format(value))}</text>"
        )
    return parts


def _date_labels(points: Sequence[Mapping[str, Any]], frame: _ChartFrame, height: int) -> list[str]:
    """The dates of the first and (when there are several runs) the last run under the x axis."""
    esc = html.escape
    first, last = points[0]["finished_at"][:10], points[-1]["finished_at"][:10]
    parts = [f'<text x="{frame.left}" y="{height - 8}" class="tick">{esc(first)}</text>']
    if frame.count > 1:
        parts.append(
            f'<text x="{frame.left + frame.plot_w}" y="{height - 8}" class="tick" text-anchor="end">'
            f"{esc(last)}</text>"
        )
    return parts


def _series(
    values: Sequence[tuple[float, Mapping[str, Any]]],
    metric: str,
    frame: _ChartFrame,
    value_format: str,
    *,
    variant: str | None = None,
    line_color: str | None = None,
) -> list[str]:
    """The line through the (run index, point) `values` and one verdict-coloured circle per point;
    `variant` tags both (data-variant), `line_color` colours the line."""
    esc = html.escape
    coords = " ".join(f"{frame.x_of(i):.1f},{frame.y_of(float(p[metric])):.1f}" for i, p in values)
    tag = "" if variant is None else f' data-variant="{esc(variant)}"'
    style = "" if line_color is None else f' style="stroke:{esc(line_color)}"'
    parts = [f'<polyline class="series"{tag} data-series="{esc(metric)}"{style} points="{coords}"/>']
    for i, p in values:
        value = float(p[metric])
        color = VERDICT_COLORS.get(p.get("verdict"), VERDICT_COLORS[None])
        tip = f"{p['run_id']} ({p['finished_at'][:16]}): {metric} {value_format.format(value)}"
        parts.append(
            f'<circle class="point"{tag} data-series="{esc(metric)}" data-run-id="{esc(p["run_id"])}" '
            f'data-value="{value!r}" cx="{frame.x_of(i):.1f}" cy="{frame.y_of(value):.1f}" r="3.5" '
            f'fill="{color}"><title>{esc(tip)}</title></circle>'
        )
    return parts


def svg_sparkline(points: Sequence[Mapping[str, Any]], metric: str = "AP", *, width: int = 120) -> str:
    """A small inline SVG line of `metric` over `points` (oldest first), by run order, its last point
    coloured by verdict; a <title> gives the range and the latest value."""
    esc = html.escape
    values = [p for p in points if p.get(metric) is not None]
    height = 28
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" data-series="{esc(metric)}" '
        f'data-runs="{len(values)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
    )
    if not values:
        return head + f' role="img" aria-label="no {esc(metric)} data"></svg>'
    numbers = [float(p[metric]) for p in values]
    low, high = _padded_range(numbers)
    frame = _ChartFrame(4, 4, width - 8, height - 8, low, high, len(values))
    coords = " ".join(f"{frame.x_of(i):.1f},{frame.y_of(v):.1f}" for i, v in enumerate(numbers))
    color = VERDICT_COLORS.get(values[-1].get("verdict"), VERDICT_COLORS[None])
    tip = (
        f"{metric} over the last {len(values)} run(s): {min(numbers):.4f} to {max(numbers):.4f}, "
        f"latest {numbers[-1]:.4f}"
    )
    return (
        f'{head} role="img" aria-label="{esc(tip)}"><title>{esc(tip)}</title>'
        f'<polyline class="spark-line" points="{coords}"/>'
        f'<circle class="spark-last" cx="{frame.x_of(len(values) - 1):.1f}" '
        f'cy="{frame.y_of(numbers[-1]):.1f}" r="2.5" fill="{color}"/></svg>'
    )


def _when_fraction(points: Sequence[Mapping[str, Any]]) -> Callable[[str], float]:
    """Maps a point's finished_at (ISO) to its place in [0, 1] between the first and last time."""
    stamps = [datetime.fromisoformat(p["finished_at"]).timestamp() for p in points]
    first, span = min(stamps), (max(stamps) - min(stamps)) or 1.0
    return lambda iso: (datetime.fromisoformat(iso).timestamp() - first) / span


def svg_variant_chart(
    series: Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]],
    metric: str,
    *,
    title: str,
    value_format: str = "{:.4g}",
    width: int = 460,
    height: int = 180,
) -> str:
    """Inline SVG chart of `metric` with one line per (variant, colour, points oldest first), x by
    time (the variants' runs interleave); circles coloured by verdict, as svg_chart's."""
    esc = html.escape
    drawn = [
        (name, color, [p for p in points if p.get(metric) is not None]) for name, color, points in series
    ]
    everything = sorted((p for _, _, points in drawn for p in points), key=lambda p: p["finished_at"])
    left, right, top, bottom = 58, 12, 24, 28
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart variants" data-series="{esc(metric)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<text x="{left}" y="15" class="chart-title">{esc(title)}</text>',
    ]
    if not everything:
        parts.append(f'<text x="{left}" y="{height / 2:.1f}" class="empty">no {esc(metric)} data</text>')
        return "".join(parts) + "</svg>"
    low, high = _padded_range([float(p[metric]) for p in everything])
    times = {p["finished_at"] for p in everything}
    frame = _ChartFrame(left, top, width - left - right, height - top - bottom, low, high, min(len(times), 2))
    place = _when_fraction(everything)
    parts.extend(_grid_lines(frame, value_format))
    parts.extend(_date_labels(everything, frame, height))
    for name, color, points in drawn:
        placed = [(place(p["finished_at"]), p) for p in points]
        if placed:
            parts.extend(_series(placed, metric, frame, value_format, variant=name, line_color=color))
    return "".join(parts) + "</svg>"
