"""The default shard size: few, full tasks (`gfocal_pipeline.sharding`), and a run that leaves
`shard_size` empty getting it. Expected sizes are worked out by hand from the documented rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfocal_pipeline.sharding import ShardPlan, resolve_shard_size

NPU = ShardPlan()  # one slot, 29 ms per image at 800x1216, 5 s per task, 5 %
CPU = ShardPlan(seconds_per_image=1.0)


@pytest.mark.parametrize(
    ("plan", "images", "size", "expected"),
    [
        # 5 s / (0.05 x 1/34.49 s) = 3449 images per task at least: val2017 is one shard
        (NPU, 5000, (800, 1216), 5000),
        (NPU, 6897, (800, 1216), 6897),
        (NPU, 6898, (800, 1216), 3449),
        (ShardPlan(slots=2), 5000, (800, 1216), 2500),
        # at 64x64 an image is 1/237.5 of the work: one shard for any realistic set on one slot
        (NPU, 2000, (64, 64), 2000),
        # two device slots: at least two shards (3 images -> 2 + 1)
        (ShardPlan(slots=2), 3, (64, 64), 2),
        (ShardPlan(slots=4), 2000, (800, 1216), 500),
        (ShardPlan(slots=4), 20000, (800, 1216), 4000),  # 5 full tasks beat 4
        # never more shards than images
        (ShardPlan(slots=8), 3, (64, 64), 1),
        # ONNX Runtime on a CPU, ~1 s per image: 100 images per task
        (CPU, 5000, (800, 1216), 100),
        (CPU, 24, (800, 1216), 24),
    ],
)
def test_the_rule(plan: ShardPlan, images: int, size: tuple[int, int], expected: int) -> None:
    assert plan.shard_size(images, *size) == expected


def test_a_task_fixed_cost_is_at_most_five_percent_of_its_work() -> None:
    for size in ((800, 1216), (320, 320), (64, 64)):
        per_image = NPU.seconds_per_image * size[0] * size[1] / (800 * 1216)
        for images in (100_000, 12_345, 7_000):
            shard = NPU.shard_size(images, *size)
            assert NPU.task_overhead_s <= 0.05 * shard * per_image * 1.0001 or shard == images


def test_an_explicit_shard_size_wins() -> None:
    assert resolve_shard_size(7, 5000, 800, 1216, NPU) == 7
    assert resolve_shard_size(None, 5000, 800, 1216, None) == 5000  # no plan: one NPU


def test_preprocess_sizes_shards_by_the_plan(tmp_path: Path) -> None:
    from gfocal_pipeline.demo_data import make_demo_coco
    from gfocal_pipeline.preprocess import preprocess

    coco = make_demo_coco(tmp_path / "coco", num_images=5)
    manifest = preprocess(coco, tmp_path / "run", height=64, width=64, shard_plan=ShardPlan(slots=2))
    assert manifest.shard_size == 3
    assert [len(ids) for _, ids in sorted(manifest.shards.items())] == [3, 2]
