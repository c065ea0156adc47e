"""Throughput of the in-process backends (onnxruntime, torch) on random-weight GFocalV2.

Builds a throw-away run directory (random checkpoint, portable ONNX with dynamic batch, random
float32 inputs, manifest), runs each backend over it for each batch size and prints one JSON line per
configuration with the fps and latency statistics the pipeline itself records. Numbers are for the
machine it runs on: compare only rows from the same run.

    .venv/bin/python benchmarks/bench_backends.py --size 256x320 --images 8 --batch 1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from gfocal_pipeline.backends.registry import get_backend
from gfocal_pipeline.layout import RunLayout, input_file_name, shard_name
from gfocal_pipeline.manifest import Geometry, ImageEntry, Manifest, load_manifest
from gfocal_pipeline.models.gfocalv2 import DeployModel
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, write_random_checkpoint


def export_portable(checkpoint: Path, path: Path, height: int, width: int) -> Path:
    deploy = DeployModel(load_model(checkpoint), "portable", height, width).eval()
    names = ["input.1", "boxes", "scores"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is what atc needs
        torch.onnx.export(
            deploy,
            (torch.randn(1, 3, height, width),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names[:1],
            output_names=names[1:],
            dynamic_axes={n: {0: "batch"} for n in names},
        )
    return path


def build_run(root: Path, images: int, shard_size: int, height: int, width: int) -> Manifest:
    layout = RunLayout.at(root)
    rng = np.random.default_rng(0)
    shards: dict[str, list[int]] = {}
    entries = []
    for index in range(images):
        shard = shard_name(index // shard_size)
        shards.setdefault(shard, []).append(index + 1)
        layout.input_shard(shard).mkdir(parents=True, exist_ok=True)
        rng.standard_normal((3, height, width), dtype=np.float32).tofile(
            layout.input_shard(shard) / input_file_name(index + 1)
        )
        entries.append(
            ImageEntry(
                index + 1,
                f"{index + 1}.jpg",
                shard,
                Geometry(width, height, 1.0, 1.0, width, height, (0, 0, 0, 0)),
            )
        )
    Manifest("letterbox", "float32", height, width, shard_size, "-", "-", "-", entries, shards).write(
        layout.manifest
    )
    return load_manifest(layout.manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x320", help="HxW model input (multiples of 32)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", default="1,2", help="comma-separated batch sizes")
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument("--providers", default="cpu", help="onnxruntime providers, e.g. cpu or cuda")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both backends")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    height, width = (int(v) for v in args.size.lower().split("x"))
    batches = [int(b) for b in args.batch.split(",")]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        root = Path(tmp)
        checkpoint = write_random_checkpoint(root / "random.pth")
        model = export_portable(checkpoint, root / "portable.onnx", height, width)
        for name in args.backends.split(","):
            for batch in batches:
                run = root / f"run-{name}-{batch}"
                manifest = build_run(run, args.images, max(batches) * 4, height, width)
                if name == "onnxruntime":
                    backend = get_backend(
                        name,
                        model=model,
                        batch_size=batch,
                        providers=args.providers,
                        intra_op_num_threads=args.threads,
                    )
                else:
                    backend = get_backend(
                        name, model=checkpoint, batch_size=batch, device=args.device, num_threads=args.threads
                    )
                results = [backend.infer_shard(RunLayout.at(run), manifest, s) for s in manifest.shards]
                latencies = [
                    ms
                    for r in results
                    for ms in json.loads(RunLayout.at(run).timing_file(name, r.shard).read_text())[
                        "latencies_ms"
                    ]
                ]
                images = sum(r.images for r in results)
                rows.append(
                    {
                        "backend": name,
                        "batch": batch,
                        "size": f"{height}x{width}",
                        "images": images,
                        "fps": round(images / (sum(latencies) / 1000.0), 2),
                        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
                        "p90_ms": round(float(np.percentile(latencies, 90)), 2),
                    }
                )
                print(json.dumps(rows[-1]))
    base = rows[0]
    for row in rows[1:]:  # ratios measured side by side in this one run
        print(
            f"ratio fps {row['backend']}/b{row['batch']} vs {base['backend']}/b{base['batch']}: "
            f"{row['fps'] / base['fps']:.2f}x"
        )


if __name__ == "__main__":
    main()
