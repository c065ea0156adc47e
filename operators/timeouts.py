"""Every task's `execution_timeout`: a budget per kind of task, sized by the images it handles.

timeout = task_timeout_scale * (minutes + seconds_per_image * images) of the kind's `TaskBudget`,
or the fixed minutes `[gfocal] task_timeout_minutes` names for that kind (see `operators.settings`).

`images` is what the task handles: at DAG-parse time the form's defaults (`max_images`, else
`FULL_SET_IMAGES`; an infer task one shard of `shard_size`), and at execute time the real count
when the operator knows it (`timeout_images` of `operators.timeout_mixin.SizedTimeoutMixin`: the
shard's images, the manifest's images, the rendered `max_images`), so a run triggered with bigger
shards or the full set gets a budget for what it really does. The external tools keep their own,
shorter timeouts (`backends.process.run_tool`); this bounds the whole task, a hung in-process step
included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from gfocal_pipeline.errors import ConfigError

FULL_SET_IMAGES = 5000  # COCO val2017: the budget when a run's image count is not known at parse time


@dataclass(frozen=True)
class TaskBudget:
    """A kind of task's time: fixed minutes plus seconds per image it handles."""

    minutes: float
    seconds_per_image: float = 0.0

    def seconds(self, images: int) -> float:
        return self.minutes * 60.0 + self.seconds_per_image * max(images, 0)


# Generous bounds (a hung task, not a slow one, must hit them); the infer budgets exceed the tools'
# own default timeout (msame / ais_bench: 300 s + 10 s per image) so the tool's clearer error wins.
BUDGETS: dict[str, TaskBudget] = {
    "prepare": TaskBudget(10),
    "export": TaskBudget(60),  # export_portable too
    "convert": TaskBudget(120),  # atc's own timeout is 60 min, plus npu-smi and the OM cache lock
    "preprocess": TaskBudget(15, 0.5),
    "infer": TaskBudget(15, 15.0),  # the device backend, per shard
    "infer_reference": TaskBudget(15, 30.0),  # PyTorch, possibly on CPU, per shard
    "evaluate": TaskBudget(15, 0.5),  # evaluate_reference too
    "summary": TaskBudget(10),
    "record": TaskBudget(10),
    "gate": TaskBudget(10),
    "retention": TaskBudget(60),
    "doctor": TaskBudget(10),
}
KINDS = tuple(BUDGETS)


def parse_timeout_minutes(text: str, key: str = "task_timeout_minutes") -> tuple[tuple[str, float], ...]:
    """`"convert=240, infer=30"` -> (("convert", 240.0), ("infer", 30.0)); a ConfigError names `key`."""
    source = f"[gfocal] {key} = {text!r}"
    fixed: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, value = (piece.strip() for piece in item.partition("="))
        if not sep or kind not in BUDGETS:
            raise ConfigError(
                f"{source}: {item!r} is not <kind>=<minutes> with a kind of {', '.join(KINDS)}; "
                "e.g. 'convert=240, infer=30', or leave it empty for the sized defaults"
            )
        try:
            minutes = float(value)
        except ValueError:
            minutes = math.nan
        if not (math.isfinite(minutes) and minutes > 0):
            raise ConfigError(f"{source}: the minutes of {kind!r} must be a number > 0, got {value!r}")
        fixed[kind] = minutes
    return tuple(fixed.items())


def sized_timeout(
    kind: str, images: int | None, *, scale: float = 1.0, fixed: tuple[tuple[str, float], ...] = ()
) -> timedelta:
    """The `execution_timeout` of a task of `kind` handling `images` (None: `FULL_SET_IMAGES`)."""
    minutes = dict(fixed).get(kind)
    if minutes is not None:
        return timedelta(minutes=minutes)
    budget = BUDGETS[kind]
    return timedelta(seconds=round(scale * budget.seconds(FULL_SET_IMAGES if images is None else images)))
