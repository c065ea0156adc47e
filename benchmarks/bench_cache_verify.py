"""What verifying an inputs cache entry on reuse costs (issue #18), through the real `CacheEntry`.

An entry of N preprocessed-input-sized files is built with `Cache.entry(..., verify=...)`, then
`CacheEntry.record()` (what every reuse runs: sizes, then the checksum of every file) is timed:

- warm: the files are in the page cache (a nightly that just wrote or read them);
- cold: each file's pages are dropped first (`posix_fadvise(DONTNEED)` on these files only, so other
  processes' caches are left alone): the disk read is part of the cost.

Modes: ``crc32`` (what the inputs cache records), ``sha256`` (the ONNX / reference entries; for
comparison) and ``size`` (the old check: one stat per file). Sizes: float32 and uint8 inputs at
800x1216 (11,673,600 and 2,918,400 bytes) and a small uint8 input (64x96) for the per-file overhead.
The figures are extrapolated linearly to 5,000 inputs (val2017) in the printed table.

Run alone: ``.venv/bin/python benchmarks/bench_cache_verify.py [--float32 300] [--uint8 1000]
[--small 5000] [--rounds 3]``; it needs about (float32 x 11.7 MB + uint8 x 2.9 MB) of free disk in
$TMPDIR and removes its files when done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gfocal_pipeline.cache_store import CRC32, SHA256, Cache, CacheEntry, _checksums

SIZES = {"float32 800x1216": 3 * 800 * 1216 * 4, "uint8 800x1216": 3 * 800 * 1216, "uint8 64x96": 3 * 64 * 96}
FULL_SET = 5000


def _build(root: Path, count: int, size: int) -> CacheEntry:
    """An inputs entry (CRC-32 per file) of `count` files of `size` bytes: one random block, each
    file's first 8 bytes its number (so no two files are equal)."""
    block = os.urandom(size)

    def build(tmp: Path) -> None:
        for n in range(count):
            shard = tmp / "inputs" / f"{n // 256:05d}"
            shard.mkdir(parents=True, exist_ok=True)
            (shard / f"{n:012d}.bin").write_bytes(n.to_bytes(8, "little") + block[8:])

    entry = Cache(root).entry("inputs", {"count": count, "size": size}, verify=CRC32)
    entry.get_or_build(build)
    return entry


def _drop_pages(entry: CacheEntry) -> None:
    for path in entry.path.rglob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time_check(entry: CacheEntry, mode: str, cold: bool) -> float:
    """Seconds of one reuse check of `entry` in `mode`: `record()` (crc32, what the inputs cache
    runs), the same checksum pass with sha256 (`cache._checksums`), or the old stat-per-file check."""
    if cold:
        _drop_pages(entry)
    record = json.loads(entry.record_path.read_text())
    paths = [entry.path / name for name in sorted(record["files"])]
    start = time.perf_counter()
    if mode == CRC32:
        assert entry.record() is not None, f"entry {entry.path} did not verify"
    elif mode == SHA256:
        _checksums(paths, SHA256)
    else:
        for path, name in zip(paths, sorted(record["files"]), strict=True):
            assert path.stat().st_size == record["files"][name]["size"]
    return time.perf_counter() - start


def measure(root: Path, label: str, count: int, rounds: int, modes: tuple[str, ...]) -> list[dict]:
    size = SIZES[label]
    entry = _build(root, count, size)
    rows = []
    for mode in modes:
        for cold in (False, True) if mode != "size" else (False,):
            _time_check(entry, mode, cold=False)  # first touch outside the timing
            times = [_time_check(entry, mode, cold) for _ in range(rounds)]
            seconds = statistics.median(times)
            rows.append(
                {
                    "inputs": label,
                    "files": count,
                    "bytes": count * size,
                    "mode": mode,
                    "cache": "cold" if cold else "warm",
                    "seconds": seconds,
                    "per_file_ms": 1000 * seconds / count,
                    "gb_per_s": count * size / seconds / 1e9,
                    "seconds_for_5000": seconds / count * FULL_SET,
                    "rounds": [round(t, 4) for t in times],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(entry.path)
    return rows


def _machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.1f} GiB RAM, load {os.getloadavg()[0]:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| inputs | files measured | check | page cache | median s | ms / file | GB/s | 5,000 inputs (s) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['inputs']} | {row['files']} | {row['mode']} | {row['cache']} | {row['seconds']:.3f} | "
            f"{row['per_file_ms']:.3f} | {row['gb_per_s']:.2f} | {row['seconds_for_5000']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float32", type=int, default=300, help="float32 800x1216 inputs to measure")
    parser.add_argument("--uint8", type=int, default=1000, help="uint8 800x1216 inputs to measure")
    parser.add_argument("--small", type=int, default=5000, help="small (64x96 uint8) inputs to measure")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="gfocal-bench-verify-") as tmp:
        rows = measure(Path(tmp), "float32 800x1216", args.float32, args.rounds, (CRC32, SHA256, "size"))
        rows += measure(Path(tmp), "uint8 800x1216", args.uint8, args.rounds, (CRC32, "size"))
        rows += measure(Path(tmp), "uint8 64x96", args.small, args.rounds, (CRC32, "size"))
    print(f"{started}; {machine}; load at end {os.getloadavg()[0]:.2f}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
