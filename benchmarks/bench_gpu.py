"""GPU path of the torch backend: model-only img/s per option set, the operator end to end, fp16 AP.

Contenders (random-weight GFocalV2 at 800x1216, float32 inputs, 395 GFLOP per image):

- model-only, batch 1 and 8, on a device-resident batch (the backend's own prepared forward,
  `TorchBackend.device_forward`): eager fp32, eager fp16 channels_last, eager fp16 channels_last +
  CUDA graphs, torch.compile ("default") + CUDA graphs fp16 channels_last;
- `operator_e2e_b8`: `TorchBackend.infer_shard` over a generated run directory at batch 8 with the
  fastest prepared option set (reading the .bin inputs, copies, host NMS, writing the shard).

Facts: COCO AP of fp16 and fp32 on the same preprocessed demo images (random weights: AP is near 0, so
the candidate score difference is reported too), compile/capture seconds, the card's name.
Goals (issue #12, anchor measured on an H100): compile + CUDA graphs fp16 >= 372 img/s at batch 1 and
>= 623 at batch 8; the operator end to end >= 0.9 of that model-only figure at batch 8.

Without CUDA the suite is skipped. `python benchmarks/bench_gpu.py --out DIR` runs it alone (< 6 min
on an H100/H200, compilation included) and writes DIR/bench_gpu.json; `--cpu-smoke` runs the same
script logic on CPU at 64x96 (fp32 standing in for fp16, no compile, no CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_backends import build_run  # random float32 inputs + manifest, as the CPU benchmark
from common import Bound, Figures, Ratio, Suite, dump, machine, quiet_logging, run_suite

from gfocal_pipeline import steps
from gfocal_pipeline.backends.torch_backend import TorchBackend
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.evaluate import evaluate_outputs
from gfocal_pipeline.layout import DONE_FILE, RunLayout, read_shard_outputs
from gfocal_pipeline.manifest import Manifest, load_manifest
from gfocal_pipeline.models.gfocalv2.checkpoint import write_random_checkpoint

GFLOP_PER_IMAGE = 395
GOAL_B1, GOAL_B8, GOAL_E2E = 372.0, 623.0, 0.9
SKIPPED = "needs a CUDA GPU (none here)"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of the suite."""

    height: int
    width: int
    device: str
    rounds: int
    iterations: dict[int, int]  # model-only forwards per round, by batch size
    e2e_images: int
    ap_images: int
    compile: str  # mode of the compiled contender; "off" leaves it out
    half: bool = True  # False on CPU: fp32 stands in for fp16
    graphs: bool = True
    budget_s: float = 300.0  # setup stops adding compiled contenders past this


FULL = Plan(800, 1216, "cuda", 5, {1: 40, 8: 12}, 64, 24, "default")
QUICK = Plan(320, 480, "cuda", 2, {1: 5, 8: 2}, 16, 8, "off", budget_s=40.0)
SMOKE = Plan(64, 96, "cpu", 1, {1: 1, 8: 1}, 16, 8, "off", half=False, graphs=False)


@dataclass
class Setup:
    """What setup built, and what failed (kept as notes instead of stopping the suite)."""

    plan: Plan
    work: Path
    started: float = field(default_factory=time.perf_counter)
    checkpoint: Path | None = None
    backends: dict[str, TorchBackend] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def attempt(self, what: str, action: Callable[[], Any]) -> Any:
        """`action()`, or None with the error recorded (the suite goes on without it)."""
        try:
            return action()
        except Exception as exc:  # a GPU path that fails is a finding, not the end of the run
            self.notes.append(f"{what} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def option_sets(plan: Plan) -> dict[str, dict[str, Any]]:
    """Backend options per configuration (fp32 and no CUDA graphs stand in on CPU)."""
    half = "fp16" if plan.half else "fp32"
    sets: dict[str, dict[str, Any]] = {
        "eager_fp32": {"precision": "fp32", "channels_last": False},
        "eager_fp16_cl": {"precision": half, "channels_last": True},
    }
    if plan.graphs:
        sets["eager_graphs_fp16_cl"] = {"precision": half, "channels_last": True, "cuda_graphs": True}
    if plan.compile != "off":
        sets["compiled_graphs_fp16_cl"] = {
            "precision": half,
            "channels_last": True,
            "compile": plan.compile,
            "cuda_graphs": plan.graphs,
        }
    return sets


def model_only(backend: TorchBackend, x: torch.Tensor, iterations: int) -> Callable[[], Figures]:
    """Forwards of the backend's prepared forward on a device batch, synchronized, as img/s."""

    def run() -> Figures:
        synchronize(x.device)
        began = time.perf_counter()
        with torch.inference_mode():
            for _ in range(iterations):
                backend.device_forward(x)
        synchronize(x.device)
        return {"img_per_s": iterations * len(x) / (time.perf_counter() - began)}

    return run


def operator_e2e(
    setup: Setup, backend: TorchBackend, root: Path, manifest: Manifest
) -> Callable[[], Figures]:
    """`infer_shard` over every shard (done markers removed first, so each round recomputes)."""
    layout = RunLayout.at(root)

    def run() -> Figures:
        for shard in manifest.shards:
            (layout.output_shard(backend.name, shard) / DONE_FILE).unlink(missing_ok=True)
        began = time.perf_counter()
        results = [backend.infer_shard(layout, manifest, shard) for shard in manifest.shards]
        wall = time.perf_counter() - began
        images = sum(r.images for r in results)
        timing = results[-1].timing
        setup.facts["e2e_profile_last_round"] = {
            "wall_ms_per_image": round(wall * 1000 / images, 3),
            "run_batch_ms_per_image": round(1000 / timing["fps"], 3),  # copies + forward + .cpu()
            "host_nms_ms_per_image": round(timing.get("host_nms_ms_per_image", 0.0), 3),
        }
        return {"img_per_s": images / wall}

    return run


def build_backends(setup: Setup, manifest: Manifest) -> None:
    """One prepared backend per option set and batch size (eager ones serve both batch sizes)."""
    plan = setup.plan
    for label, options in option_sets(plan).items():
        static = "compile" in options or options.get("cuda_graphs", False)
        for batch in sorted(plan.iterations) if static else [max(plan.iterations)]:
            if "compile" in options and setup.elapsed() > plan.budget_s:
                setup.notes.append(f"{label} batch {batch} left out: setup past {plan.budget_s:.0f} s")
                continue
            name = f"{label}_b{batch}" if static else label

            def make(options: dict[str, Any] = options, batch: int = batch) -> TorchBackend:
                backend = TorchBackend(
                    setup.checkpoint,  # type: ignore[arg-type]
                    batch_size=batch,
                    device=plan.device,
                    warmup=0,
                    **options,
                )
                backend.prepare(manifest)
                return backend

            backend = setup.attempt(f"building {name}", make)
            if backend is not None:
                setup.backends[name] = backend
                if backend.options.static_shapes:
                    setup.facts[f"prepare_s_{name}"] = round(backend.prepare_s, 1)


def model_contenders(setup: Setup) -> dict[str, Callable[[], Figures]]:
    plan = setup.plan
    device = torch.device(plan.device)
    contenders: dict[str, Callable[[], Figures]] = {}
    for batch, iterations in sorted(plan.iterations.items()):
        generator = torch.Generator().manual_seed(batch)
        x = torch.randn((batch, 3, plan.height, plan.width), generator=generator).to(device)
        for label in option_sets(plan):
            backend = setup.backends.get(f"{label}_b{batch}") or setup.backends.get(label)
            if backend is None:
                continue
            name = f"{label}_b{batch}"
            run = model_only(backend, x, iterations)
            if setup.attempt(f"first run of {name}", run) is not None:  # drop a contender that fails
                contenders[name] = run
    return contenders


def ap_facts(setup: Setup) -> None:
    """COCO AP of fp32 and fp16 (eager, the default fp16 path) on the same preprocessed demo images."""
    plan = setup.plan
    coco = make_demo_coco(setup.work / "coco", num_images=plan.ap_images, seed=1)
    run = setup.work / "ap-run"
    steps.preprocess_step(
        coco, run, policy="letterbox", dtype="float32", height=plan.height, width=plan.width, shard_size=8
    )
    manifest = load_manifest(RunLayout.at(run).manifest)
    stats, scores = {}, {}
    for label in ("eager_fp32", "eager_fp16_cl"):
        backend = setup.backends[label]
        for shard in manifest.shards:
            backend.infer_shard(RunLayout.at(run), manifest, shard)
        stats[label] = evaluate_outputs(run, "torch")["stats"]
        scores[label] = np.concatenate([shard_scores(run, shard) for shard in sorted(manifest.shards)])
    delta = abs(stats["eager_fp16_cl"]["AP"] - stats["eager_fp32"]["AP"])
    setup.facts.update(
        {
            "ap_fp32": round(stats["eager_fp32"]["AP"], 5),
            "ap_fp16": round(stats["eager_fp16_cl"]["AP"], 5),
            "ap50_fp32": round(stats["eager_fp32"]["AP50"], 5),
            "ap50_fp16": round(stats["eager_fp16_cl"]["AP50"], 5),
            "ap_delta_fp16_vs_fp32": round(delta, 6),
            "ap_delta_within_1e-3": bool(delta <= 1e-3),
            "det_score_max_abs_diff_fp16_vs_fp32": float(
                np.abs(scores["eager_fp16_cl"] - scores["eager_fp32"]).max()
            ),
            "ap_images": len(manifest.images),
        }
    )


def shard_scores(run: Path, shard: str) -> np.ndarray:
    """Each image's final detection scores, sorted high to low (comparable across precisions)."""
    _, arrays = read_shard_outputs(RunLayout.at(run).output_shard("torch", shard))
    return -np.sort(-arrays["dets"][..., 4], axis=1)


def goals(contenders: dict[str, Callable[[], Figures]]) -> tuple[list[Ratio], list[Bound]]:
    """The issue's goals (and the speed-ups between option sets) on the contenders that exist."""
    fast = "compiled_graphs_fp16_cl"
    bounds = [
        Bound(
            f"compile + CUDA graphs fp16, batch {batch}, model-only (goal >= {goal:.0f} img/s)",
            f"{fast}_b{batch}",
            "img_per_s",
            goal,
            higher_is_better=True,
        )
        for batch, goal in ((1, GOAL_B1), (8, GOAL_B8))
        if f"{fast}_b{batch}" in contenders
    ]
    pairs = (
        ("eager_fp16_cl", "eager_fp32"),
        ("eager_graphs_fp16_cl", "eager_fp16_cl"),
        (fast, "eager_fp16_cl"),
    )
    ratios = [
        Ratio(f"{num} / {den}, batch {batch}", f"{num}_b{batch}", f"{den}_b{batch}", "img_per_s")
        for batch in (1, 8)
        for num, den in pairs
        if f"{num}_b{batch}" in contenders and f"{den}_b{batch}" in contenders
    ]
    if "operator_e2e_b8" in contenders:
        candidates = (f"{fast}_b8", "eager_graphs_fp16_cl_b8", "eager_fp16_cl_b8")
        reference = next(name for name in candidates if name in contenders)
        label = f"operator end to end / model-only {reference}, batch 8 (goal >= {GOAL_E2E})"
        ratios.append(Ratio(label, "operator_e2e_b8", reference, "img_per_s", goal=GOAL_E2E))
    return ratios, bounds


def build_suite(work: Path, plan: Plan) -> Suite:
    setup = Setup(plan, work)
    setup.checkpoint = write_random_checkpoint(work / "random.pth", seed=0)
    manifest = build_run(work / "e2e-run", plan.e2e_images, 32, plan.height, plan.width)
    build_backends(setup, manifest)
    if {"eager_fp32", "eager_fp16_cl"} <= set(setup.backends):
        setup.attempt("fp16 vs fp32 AP", lambda: ap_facts(setup))
    contenders = model_contenders(setup)
    e2e = next(
        (
            setup.backends[n]
            for n in ("compiled_graphs_fp16_cl_b8", "eager_graphs_fp16_cl_b8")
            if n in setup.backends
        ),
        setup.backends.get("eager_fp16_cl"),
    )
    if e2e is not None:
        run = operator_e2e(setup, e2e, work / "e2e-run", manifest)
        if setup.attempt("first run of operator_e2e_b8", run) is not None:
            contenders["operator_e2e_b8"] = run
            setup.facts["operator_e2e_options"] = {"batch_size": e2e.batch_size, **e2e.timing_facts()}
    ratios, bounds = goals(contenders)
    device = torch.device(plan.device)
    setup.facts.update(
        {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "input": f"{plan.height}x{plan.width} float32",
            "gflop_per_image": GFLOP_PER_IMAGE if (plan.height, plan.width) == (800, 1216) else None,
        }
    )
    notes = [
        f"model-only: {plan.iterations} forwards per round on a device-resident batch; "
        f"operator end to end: {plan.e2e_images} generated images, shards of 32, batch 8",
        "anchor (H100, 800x1216): eager fp16 channels_last 80 / 304 img/s, compile + CUDA graphs fp16 "
        "372 / 623 img/s at batch 1 / 8",
        *setup.notes,
    ]
    return Suite(
        name="gpu",
        title="torch backend on the GPU: precision, channels_last, compile, CUDA graphs",
        contenders=contenders,
        metrics={"img_per_s": "img/s"},
        ratios=ratios,
        bounds=bounds,
        rounds=plan.rounds,
        setup_s=round(setup.elapsed(), 1),
        facts=setup.facts,
        notes=notes,
    )


def suite(work: Path, quick: bool = False) -> Suite:
    """The contract's entry point: skipped without CUDA."""
    if not torch.cuda.is_available():
        return Suite(
            name="gpu",
            title="torch backend on the GPU: precision, channels_last, compile, CUDA graphs",
            contenders={},
            metrics={"img_per_s": "img/s"},
            skipped=SKIPPED,
        )
    return build_suite(work, QUICK if quick else FULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write bench_gpu.json into this folder")
    parser.add_argument("--quick", action="store_true", help="small sizes, no compile")
    parser.add_argument("--cpu-smoke", action="store_true", help="the script logic on CPU at 64x96")
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        if args.cpu_smoke:
            torch.set_num_threads(1)
            built = build_suite(Path(tmp), SMOKE)
        else:
            built = suite(Path(tmp), quick=args.quick)
        result = {"machine": machine(), **run_suite(built, log=lambda line: print(line, file=sys.stderr))}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        dump(args.out / "bench_gpu.json", result)
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
