"""Retention of a work directory: old run directories shrink to their small results, the cache to a size.

`prune_runs` keeps the newest `keep_runs` run directories (`<work_dir>/<dag_id>/<run_id>/`) of each
DAG whole and prunes older ones to what the history, the trend page and a post-mortem read:

    KEPT      run.json, manifest.json, summary.json, pruned.json, uses/**, eval/**, timing/**, report/**,
              outputs/<backend>/<shard>/{outputs.npz,done.json}, model/*.json, *.log, logs/**
    REMOVED   everything else: inputs/, model/*.onnx, model/*.om, candidates.npz, temporaries
              (dot-files, *.tmp) even inside the kept folders, ...

A pruned directory gets `pruned.json` (when, what, bytes freed); a later pass skips it, and a late
retry of one of its tasks fails clearly (`check_not_pruned`). A run directory is never touched when
it is protected (the current run) or in use: a live process holds one of its step locks
(`.locks/<step>.lock`, `fileio.step_lock`), whatever its file times, or it is not finished (no
summary.json) and changed within `grace_s`. `gc` then evicts least-recently-used cache entries down
to a size, never one that a run in use names in its `uses/`, and removes what killed cache builders
left behind. A work directory that does not exist is an error (a misspelt path frees nothing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gfocal_pipeline.cache_store import Cache, dir_size, reclaim_stale
from gfocal_pipeline.errors import ConfigError, GfocalError
from gfocal_pipeline.fileio import held_step_locks, write_json
from gfocal_pipeline.layout import DONE_FILE, OUTPUTS_FILE, VARIANTS_DIR, RunLayout

log = logging.getLogger(__name__)

PRUNED_FILE = "pruned.json"
RUN_FILES = ("run.json", "manifest.json", "summary.json")  # any of them makes a folder a run directory
SUMMARY_FILE = "summary.json"
USES_DIR = "uses"
KEPT_TOP_FILES = frozenset({*RUN_FILES, PRUNED_FILE})
KEPT_TREES = frozenset({USES_DIR, "eval", "timing", "logs", "report"})
KEPT_SHARD_FILES = frozenset({OUTPUTS_FILE, DONE_FILE})
CACHE_DIR = "cache"

DEFAULT_KEEP_RUNS = 14
DEFAULT_CACHE_MAX_GB = 100.0
DEFAULT_GRACE_S = 24 * 3600.0
GB = 10**9
# an entry used this recently is never evicted: a run that just reused it may not have named it in
# its uses/ yet
RECENT_USE_S = 600.0
EXAMPLES = 20  # paths listed per pruned directory in pruned.json


class RunPrunedError(GfocalError):
    """A task ran on a run directory that retention has pruned (its bulk artifacts are gone)."""


def check_keep_runs(value: Any, source: str = "") -> int:
    """`value` as a keep_runs count (an int >= 1), else a ConfigError naming the setting and the fix."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    where = source or "keep_runs ([gfocal] keep_runs in airflow.cfg, or `gfocal gc --keep-runs`)"
    raise ConfigError(
        f"{where}: expected an integer >= 1 (how many of the newest run directories of each DAG are "
        f"kept whole), got {value!r}; set it to 1 or more (default {DEFAULT_KEEP_RUNS})"
    )


def check_cache_max_gb(value: Any, source: str = "") -> float:
    """`value` as a cache size limit in GB (a finite number >= 0), else a ConfigError naming the setting."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    where = source or "cache_max_gb ([gfocal] cache_max_gb in airflow.cfg, or `gfocal gc --cache-max-gb`)"
    raise ConfigError(
        f"{where}: expected a size in GB >= 0 (0 empties the cache except the entries runs in progress "
        f"use), got {value!r}; set it to e.g. {DEFAULT_CACHE_MAX_GB:g}"
    )


def is_kept(relative: str) -> bool:
    """Whether a file at `relative` (to its run directory, '/'-separated) survives pruning."""
    parts = relative.split("/")
    name = parts[-1]
    if any(part.startswith(".") for part in parts) or name.endswith(".tmp"):
        return False  # temporaries of atomic writes and staging folders
    if len(parts) == 1:
        return name in KEPT_TOP_FILES or name.endswith(".log")
    top = parts[0]
    if top == VARIANTS_DIR and len(parts) >= 3:  # variants/<name>/<what a run keeps>
        return is_kept("/".join(parts[2:]))
    if top in KEPT_TREES:
        return True
    if top == "outputs" and len(parts) == 4 and name in KEPT_SHARD_FILES:
        return True
    if top == "model" and len(parts) == 2 and name.endswith(".json"):
        return True
    return name.endswith(".log")


@dataclass
class _Scan:
    """One walk of a run directory: its size and what pruning would remove."""

    bytes: int = 0
    junk: list[tuple[str, int, bool]] = field(default_factory=list)  # (relative path, bytes, shared)


def _scan(root: Path) -> _Scan:
    """Walk `root` without following symbolic links (a link is removed or kept as itself)."""
    scan = _Scan()
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            items = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in items:
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if item.is_dir(follow_symlinks=False):
                folders.append(Path(item.path))
                continue
            size = info.st_size if item.is_file(follow_symlinks=False) else 0
            scan.bytes += size
            relative = Path(item.path).relative_to(root).as_posix()
            if not is_kept(relative):
                scan.junk.append((relative, size, info.st_nlink > 1))
    return scan


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _changed_since(root: Path, since: float) -> bool:
    """Whether anything under `root` changed after `since` (stops at the first such file)."""
    if _mtime(root) > since:
        return True
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            if _mtime(Path(folder) / name) > since:
                return True
    return False


@dataclass(frozen=True)
class RunDir:
    """A run directory found under a work directory."""

    path: Path
    dag_id: str
    created: float

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY_FILE).is_file()

    @property
    def pruned(self) -> dict[str, Any] | None:
        """Its pruned.json when retention pruned it completely, else None."""
        record = _pruned_record(self.path)
        return record if record is not None and record.get("complete") else None

    def in_use(self, grace_s: float, now: float) -> bool:
        """A live process holds one of its step locks (whatever its file times), or it is not finished
        and changed within `grace_s`: a run in progress (or one being retried)."""
        held = held_step_locks(self.path)
        if held:
            log.info("run directory %s is in use: a live process holds the lock of %s", self.path, held)
            return True
        return not self.finished and _changed_since(self.path, now - grace_s)


def _pruned_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PRUNED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _created(run_dir: Path) -> float:
    """run.json's "created", else the directory's mtime."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        created = json.loads((run_dir / "run.json").read_text()).get("created")
        if isinstance(created, int | float) and not isinstance(created, bool):
            return float(created)
    return _mtime(run_dir)


def find_runs(work_dir: str | os.PathLike[str]) -> dict[str, list[RunDir]]:
    """{dag_id: its run directories, newest first} (skips `cache/`, dot-folders and symbolic links)."""
    root = Path(work_dir)
    found: dict[str, list[RunDir]] = {}
    if not root.is_dir():
        return found
    for dag_dir in sorted(root.iterdir()):
        if dag_dir.name == CACHE_DIR or dag_dir.name.startswith(".") or not _real_dir(dag_dir):
            continue
        runs = [
            RunDir(path, dag_dir.name, _created(path))
            for path in sorted(dag_dir.iterdir())
            if not path.name.startswith(".")
            and _real_dir(path)
            and any((path / name).is_file() for name in RUN_FILES)
        ]
        if runs:
            found[dag_dir.name] = sorted(runs, key=lambda run: (run.created, run.path.name), reverse=True)
    return found


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _resolved(paths: Iterable[str | os.PathLike[str] | None]) -> set[str]:
    return {os.path.realpath(path) for path in paths if path}


def _group(relative: str) -> str:
    """What pruned.json sums a removed file under: its top folder (`inputs/`) or its name."""
    top, sep, _ = relative.partition("/")
    return top + "/" if sep else top


def _remove(root: Path, junk: list[tuple[str, int, bool]]) -> None:
    """Delete the files in `junk`, then the folders that this left empty (deepest first)."""
    folders: set[Path] = set()
    for relative, _, _ in junk:
        path = root / relative
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        folders.update(parent for parent in path.parents if parent != root and root in parent.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds kept files
            folder.rmdir()


def prune_run(run_dir: str | os.PathLike[str], *, keep_runs: int, dry_run: bool = False) -> dict[str, Any]:
    """Prune one run directory to its small results (see the module docstring) and write pruned.json.

    Returns {"path", "bytes_freed", "bytes_shared", "files_removed", "bytes_kept"}; `bytes_shared`
    is the size of removed files hard-linked elsewhere (e.g. an OM linked from the OM cache), which
    frees no space yet. With `dry_run` nothing is removed or written.
    """
    root = Path(run_dir)
    scan = _scan(root)
    freed = sum(size for _, size, shared in scan.junk if not shared)
    shared = sum(size for _, size, is_shared in scan.junk if is_shared)
    removed: dict[str, dict[str, int]] = {}
    for relative, size, _ in scan.junk:
        slot = removed.setdefault(_group(relative), {"files": 0, "bytes": 0})
        slot["files"] += 1
        slot["bytes"] += size
    result = {
        "path": str(root),
        "bytes_freed": freed,
        "bytes_shared": shared,
        "files_removed": len(scan.junk),
        "bytes_kept": scan.bytes - freed - shared,
    }
    if dry_run:
        return result
    now = time.time()
    record = {
        "pruned_at": now,
        "pruned_at_utc": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "keep_runs": keep_runs,
        "complete": False,  # written first, so a task that starts meanwhile already sees it
        "removed": removed,
        "examples": sorted(relative for relative, _, _ in scan.junk)[:EXAMPLES],
    }
    write_json(root / PRUNED_FILE, record)
    _remove(root, scan.junk)
    write_json(root / PRUNED_FILE, {**record, **result, "complete": True})
    log.info("pruned run directory %s: %d files, %d bytes freed", root, len(scan.junk), freed)
    return result


def prune_runs(
    work_dir: str | os.PathLike[str],
    keep_runs: int,
    *,
    protect: Iterable[str | os.PathLike[str] | None] = (),
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Keep the newest `keep_runs` run directories of each DAG whole; prune the older ones.

    Ordered by run.json "created", else the directory's mtime. Never touches a `protect`ed directory
    or one in use (see `RunDir.in_use`). Returns {"work_dir", "keep_runs", "dry_run", "pruned"
    [prune_run results], "kept", "already_pruned", "protected", "in_use" [paths], "bytes_freed",
    "bytes_before", "bytes_after"}.
    """
    keep_runs = check_keep_runs(keep_runs)
    protected, now = _resolved(protect), time.time()
    report: dict[str, Any] = {
        "work_dir": str(work_dir),
        "keep_runs": keep_runs,
        "dry_run": dry_run,
        **{name: [] for name in ("pruned", "kept", "already_pruned", "protected", "in_use")},
    }
    before = 0
    for runs in find_runs(work_dir).values():
        for index, run in enumerate(runs):
            record = run.pruned
            if record is not None:
                report["already_pruned"].append(str(run.path))
                before += int(record.get("bytes_kept", 0))
                continue
            if index < keep_runs or os.path.realpath(run.path) in protected or run.in_use(grace_s, now):
                slot = "kept" if index < keep_runs else _why_kept(run, protected)
                report[slot].append(str(run.path))
                before += dir_size(run.path)
                continue
            result = prune_run(run.path, keep_runs=keep_runs, dry_run=dry_run)
            report["pruned"].append(result)
            before += result["bytes_freed"] + result["bytes_shared"] + result["bytes_kept"]
    report["bytes_freed"] = sum(result["bytes_freed"] for result in report["pruned"])
    report["bytes_before"] = before
    report["bytes_after"] = before - report["bytes_freed"]
    return report


def _why_kept(run: RunDir, protected: set[str]) -> str:
    return "protected" if os.path.realpath(run.path) in protected else "in_use"


def cache_keys_in_use(
    work_dir: str | os.PathLike[str],
    *,
    protect: Iterable[str | os.PathLike[str] | None] = (),
    grace_s: float = DEFAULT_GRACE_S,
) -> set[str]:
    """Keys of the cache entries named in `uses/<kind>-<key>` of the runs in use and the protected ones.

    Keys, not (kind, key): a key kept in every kind keeps at least what must stay.
    """
    protected, now = _resolved(protect), time.time()
    folders = [Path(path) for path in protected]
    for runs in find_runs(work_dir).values():
        folders += [run.path for run in runs if run.pruned is None and run.in_use(grace_s, now)]
    keys = set()
    variants = [variant for folder in folders for variant in sorted(folder.glob(f"{VARIANTS_DIR}/*"))]
    for folder in [*folders, *variants]:  # a variant that owns its inputs has uses of its own
        uses = folder / USES_DIR
        for marker in sorted(uses.iterdir()) if uses.is_dir() else []:
            kind, sep, key = marker.name.rpartition("-")
            if sep and kind and key and not marker.name.startswith("."):
                keys.add(key)
    return keys


def _evict_cache(
    work_dir: str | os.PathLike[str], max_bytes: int, keep: set[str], dry_run: bool
) -> dict[str, Any]:
    """Evict least-recently-used entries down to `max_bytes` and reclaim stale build folders."""
    cache = Cache(work_dir)
    usage = cache.usage()
    before = dir_size(cache.root)
    evicted = cache.evict(max_bytes, keep=keep, min_idle_s=RECENT_USE_S, dry_run=dry_run)
    stale = []
    for kind_dir in cache.kind_dirs():
        sizes = {path: dir_size(path) for path in reclaim_stale(kind_dir, dry_run=True)}
        removed = reclaim_stale(kind_dir, dry_run=dry_run)
        stale += [{"path": str(path), "bytes": sizes.get(path, 0)} for path in removed]
    freed = sum(size for _, size in evicted) + sum(item["bytes"] for item in stale)
    managed = sum(use.bytes for use in usage)
    return {
        "max_bytes": max_bytes,
        "entries_before": len(usage),
        "entries_after": len(usage) - len(evicted),
        "managed_bytes_before": managed,
        "unmanaged_bytes": max(0, before - managed),  # stale folders, OM entries of releases before 3
        "in_use": sorted(keep),
        "evicted": [
            {"kind": entry.kind, "key": entry.key, "bytes": size, "path": str(entry.path)}
            for entry, size in evicted
        ],
        "stale": stale,
        "bytes_freed": freed,
        "bytes_before": before,
        "bytes_after": before - freed,
    }


def gc(
    work_dir: str | os.PathLike[str],
    keep_runs: int,
    cache_max_bytes: int,
    *,
    protect: Iterable[str | os.PathLike[str] | None] = (),
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Prune run directories (`prune_runs`), then evict the cache down to `cache_max_bytes`.

    Returns a JSON-able report: {"work_dir", "dry_run", "keep_runs", "cache_max_bytes", "runs"
    (`prune_runs`' report), "cache" ({"evicted": [{kind, key, bytes, path}], "stale", "in_use",
    "entries_before", "entries_after", "bytes_before", "bytes_after", ...}), "totals"
    ({"runs_pruned", "entries_evicted", "run_bytes_freed", "cache_bytes_freed", "bytes_freed"}),
    "bytes_before", "bytes_after"}. With `dry_run` it says what would go and removes nothing.
    """
    keep_runs = check_keep_runs(keep_runs)
    check_work_dir(work_dir)
    if isinstance(cache_max_bytes, bool) or not isinstance(cache_max_bytes, int) or cache_max_bytes < 0:
        raise ConfigError(
            f"cache_max_bytes: expected an integer >= 0, got {cache_max_bytes!r}; "
            "pass the cache size limit in bytes (0 keeps only the entries of runs in progress)"
        )
    protect = list(protect)
    runs = prune_runs(work_dir, keep_runs, protect=protect, grace_s=grace_s, dry_run=dry_run)
    keep = cache_keys_in_use(work_dir, protect=protect, grace_s=grace_s)
    cache = _evict_cache(work_dir, cache_max_bytes, keep, dry_run)
    totals = {
        "runs_pruned": len(runs["pruned"]),
        "entries_evicted": len(cache["evicted"]),
        "run_bytes_freed": runs["bytes_freed"],
        "cache_bytes_freed": cache["bytes_freed"],
        "bytes_freed": runs["bytes_freed"] + cache["bytes_freed"],
    }
    return {
        "work_dir": str(work_dir),
        "dry_run": dry_run,
        "keep_runs": keep_runs,
        "cache_max_bytes": cache_max_bytes,
        "grace_s": grace_s,
        "runs": runs,
        "cache": cache,
        "totals": totals,
        "bytes_before": runs["bytes_before"] + cache["bytes_before"],
        "bytes_after": runs["bytes_after"] + cache["bytes_after"],
    }


def check_work_dir(work_dir: str | os.PathLike[str]) -> Path:
    """`work_dir` as a Path when it is a directory, else a ConfigError naming it and the fix (retention
    of a misspelt work directory would otherwise report "0 B freed" and succeed)."""
    path = Path(work_dir)
    if path.is_dir():
        return path
    state = "is not a directory" if path.exists() else "does not exist"
    raise ConfigError(
        f"work directory {str(path)!r} {state}; pass the work directory the runs use (--work-dir, "
        "[gfocal] work_dir, $GFOCAL_WORK_DIR; it holds one folder per DAG and cache/)"
    )


def human_bytes(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the GB of cache_max_gb)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def format_summary(report: dict[str, Any]) -> str:
    """One line saying what a `gc` report freed (or, for a dry run, would free)."""
    totals, cache = report["totals"], report["cache"]
    verb = "would free" if report["dry_run"] else "freed"
    return (
        f"{verb} {human_bytes(totals['bytes_freed'])}: {totals['runs_pruned']} run directories pruned "
        f"({human_bytes(totals['run_bytes_freed'])}), {totals['entries_evicted']} cache entries evicted "
        f"({human_bytes(totals['cache_bytes_freed'])}); cache {human_bytes(cache['bytes_before'])} -> "
        f"{human_bytes(cache['bytes_after'])} (limit {human_bytes(report['cache_max_bytes'])}, "
        f"{len(cache['in_use'])} entries in use); work directory {human_bytes(report['bytes_before'])} -> "
        f"{human_bytes(report['bytes_after'])}"
    )


def small_report(report: dict[str, Any], cap: int = 20) -> dict[str, Any]:
    """A `gc` report small enough for XCom: counts and bytes, lists cut to `cap` items."""
    runs, cache = report["runs"], report["cache"]
    lists = {
        "pruned": [item["path"] for item in runs["pruned"]],
        "evicted": [f"{item['kind']}/{item['key']}" for item in cache["evicted"]],
        "in_use_runs": runs["in_use"] + runs["protected"],
    }
    return {
        **{key: report[key] for key in ("work_dir", "dry_run", "keep_runs", "cache_max_bytes")},
        **report["totals"],
        "runs_kept": len(runs["kept"]) + len(runs["protected"]) + len(runs["in_use"]),
        "runs_already_pruned": len(runs["already_pruned"]),
        "cache_entries_in_use": len(cache["in_use"]),
        "cache_bytes_before": cache["bytes_before"],
        "cache_bytes_after": cache["bytes_after"],
        "bytes_before": report["bytes_before"],
        "bytes_after": report["bytes_after"],
        **{name: items[:cap] for name, items in lists.items()},
        "truncated": any(len(items) > cap for items in lists.values()),
    }


def check_not_pruned(run_dir: str | os.PathLike[str], what: str) -> None:
    """Raise RunPrunedError when retention has pruned `run_dir` (its `what` is gone): a late retry of
    a task of an old run fails clearly instead of on a missing file."""
    record = _pruned_record(RunLayout.at(run_dir).run_folder)  # a variant's folder: its run's
    if record is None:
        return
    when = record.get("pruned_at_utc") or "an unknown date"
    keep = record.get("keep_runs")
    raise RunPrunedError(
        f"run directory {str(run_dir)!r} was pruned by retention on {when} (keep_runs={keep}: only the "
        f"newest runs of each DAG are kept whole); its {what} was removed; trigger a new run"
    )
