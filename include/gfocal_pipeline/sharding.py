"""How many images one inference task gets when a run leaves `shard_size` empty: few, full tasks.

Each task has a fixed cost that does not depend on its images (on Celery: the scheduler and the
worker starting it, the task process, the tool or session starting, the outputs written; measured by
`benchmarks/bench_deployed.py`). On the NPU the device tasks run one at a time, so that cost is paid
once per task in the device phase. The rule:

    per_image     = seconds_per_image x (height x width) / (800 x 1216)   the device's work per image
    per_task      = ceil(task_overhead_s / (overhead_fraction x per_image))
    shards        = min(images, max(slots, floor(images / per_task)))
    shard_size    = ceil(images / shards)

so every task holds at least `per_task` images (its fixed cost is at most `overhead_fraction`, 5 %, of
its work) unless that would leave a device slot idle: there are at least as many shards as device tasks
can run at once (`slots`). `seconds_per_image` is the device's time per image at
the recipe's 800x1216 input (the Ascend 310P: 29 ms, 34.49 fps; ONNX Runtime on a 2-core CPU: 2.2 s),
scaled by the input's pixels. Examples (5 s per task): val2017 (5,000 images) at 800x1216 on one NPU
-> 1 shard (at least 3,449 images per task); on two NPUs -> 2 shards of 2,500; ONNX Runtime on a CPU
at 800x1216 -> 100 shards of 50.
An explicit `shard_size` always wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_PIXELS = 800 * 1216  # the recipe's input, at which `seconds_per_image` is stated
NPU_SECONDS_PER_IMAGE = 1 / 34.49  # Ascend 310P, batch 1, 800x1216 (the recipe's figure)
CPU_SECONDS_PER_IMAGE = 2.0  # ONNX Runtime on a 2-core CPU at 800x1216 (measured: p50 2215 ms)
TASK_OVERHEAD_S = 5.0  # a task's fixed cost on the Celery deployment (bench_deployed.py: 4-5 s)
OVERHEAD_FRACTION = 0.05


@dataclass(frozen=True)
class ShardPlan:
    """The inputs of the rule (see the module docstring); the defaults are one NPU."""

    slots: int = 1
    seconds_per_image: float = NPU_SECONDS_PER_IMAGE
    task_overhead_s: float = TASK_OVERHEAD_S
    overhead_fraction: float = OVERHEAD_FRACTION

    def images_per_task(self, height: int, width: int) -> int:
        per_image = self.seconds_per_image * height * width / REFERENCE_PIXELS
        return max(1, math.ceil(self.task_overhead_s / (self.overhead_fraction * per_image)))

    def shard_size(self, images: int, height: int, width: int) -> int:
        """Images per shard for a run of `images` images at `height` x `width`."""
        if images < 1:
            return 1
        full = images // self.images_per_task(height, width)  # shards that each get a full task
        shards = min(images, max(self.slots, full))
        return math.ceil(images / shards)


def resolve_shard_size(
    shard_size: int | None, images: int, height: int, width: int, plan: ShardPlan | None = None
) -> int:
    """`shard_size` when given, else the plan's (default: one NPU)."""
    if shard_size is not None:
        return shard_size
    return (plan or ShardPlan()).shard_size(images, height, width)
