"""The cache store: content-addressed entries under `<work_dir>/cache/<kind>/<key>/`, shared by runs
and workers (which entries the pipeline keeps, and their keys, are in `step_caches`).

An entry is keyed by the sha256 of the canonical JSON of everything that determines its content
(`key_inputs`), which `cache.json` inside it records together with the size and a content checksum of
every file: sha256 for few, precious files (graphs, references), CRC-32 for bulk data (the
preprocessed inputs; see `VERIFY_MODES`). It is built in a temporary directory beside it and renamed
into place only when complete: readers see a whole entry or none. Builders of one key take a lock
file (so a second one waits, then reuses the first one's result); where locks do not work across
hosts (some network file systems) the rename still decides: first rename wins, the loser's copy is
discarded. On reuse every file is verified against its record (size, then content); a damaged entry,
or one recorded without the checksum its kind needs (an older version's), is moved aside and
rebuilt, never used. The record file's mtime is the entry's last use, which drives
least-recently-used eviction (`gfocal gc`, `gfocal_pipeline.retention`).

A read-only cache (e.g. a shared, mounted one) serves its valid entries: the last-use time is then
not updated; only a damaged or missing entry, which needs a write, is an error naming the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfocal_pipeline.errors import GfocalError, os_error_fix
from gfocal_pipeline.fileio import crc32_file, owner_is_dead, owner_tag, sha256_file

log = logging.getLogger(__name__)

RECORD = "cache.json"
STALE_TMP_S = 6 * 3600  # a build directory untouched this long belongs to a killed builder
SHA256, CRC32 = "sha256", "crc32"
# how an entry's files are checked on reuse (after their sizes): the record's field and its function
VERIFY_MODES: dict[str, Callable[[Path], str]] = {SHA256: sha256_file, CRC32: crc32_file}
VERIFY_THREADS = 4  # files checksummed at once on reuse (reads and zlib/hashlib release the GIL)


class CacheError(GfocalError):
    """A cache entry could not be built or stored (the message names the entry and the fix)."""


def cache_key(key_inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `key_inputs` (sorted keys, no whitespace)."""
    text = json.dumps(key_inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksums(paths: list[Path], verify: str) -> list[str]:
    """The `verify` checksum of each of `paths`, computed by up to `VERIFY_THREADS` threads."""
    function = VERIFY_MODES[verify]
    if len(paths) < 2:
        return [function(path) for path in paths]
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS, thread_name_prefix="gfocal-verify") as pool:
        return list(pool.map(function, paths))


def _files(root: Path, verify: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", <verify>: checksum}} of every file under `root`."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != RECORD)
    sums = _checksums(paths, verify)
    return {
        str(path.relative_to(root)): {"size": path.stat().st_size, verify: checksum}
        for path, checksum in zip(paths, sums, strict=True)
    }


def dir_size(root: Path) -> int:
    """Bytes of the regular files under `root` (0 when it does not exist)."""
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass(frozen=True)
class CacheEntry:
    """One entry: `<root>/<kind>/<key>/`; see the module docstring."""

    root: Path
    kind: str
    key: str
    key_inputs: dict[str, Any]
    verify: str = SHA256  # the checksum recorded per file and checked on reuse (`VERIFY_MODES`)

    @property
    def path(self) -> Path:
        return self.root / self.kind / self.key

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    def record(self) -> dict[str, Any] | None:
        """The entry's record when it is present and intact, else None (a damaged entry is set aside)."""
        if not self.record_path.is_file():
            if self.path.exists():
                self._discard("has no record (a half-written entry)")
            return None
        try:
            record = json.loads(self.record_path.read_text())
            problem = self._check(record) if isinstance(record, dict) else "has a record that is not a record"
        except (OSError, ValueError) as exc:
            problem = f"has an unreadable record ({exc})"
        if problem:
            self._discard(problem)
            return None
        return record

    def _check(self, record: dict[str, Any]) -> str:
        """Why the entry's files do not match `record` ("" when they all do): a lost or resized file,
        a file recorded without the checksum this entry needs, or one whose content changed."""
        if record.get("key") != self.key:
            return "records another key"
        files = record.get("files")
        if not isinstance(files, dict):
            return "has no file list in its record"
        for name, info in files.items():
            try:
                size = (self.path / name).stat().st_size
            except OSError:
                return f"lost {name}"
            if not isinstance(info, dict):
                return f"has no size recorded for {name}"
            if size != info.get("size"):
                return f"has a truncated or resized {name} ({size} bytes; recorded {info.get('size')})"
            if self.verify not in info:
                return (
                    f"has no recorded {self.verify} of {name} (built by an older version, so its content "
                    "cannot be verified)"
                )
        names = sorted(files)
        try:
            found = _checksums([self.path / name for name in names], self.verify)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc}: {exc.filename})"
        for name, checksum in zip(names, found, strict=True):
            if checksum != files[name][self.verify]:
                return f"has a changed {name} (its {self.verify} differs from the one recorded at build time)"
        return ""

    def _discard(self, why: str) -> None:
        log.warning("cache entry %s %s: discarding it and building again", self.path, why)
        aside = self.path.with_name(f".trash-{self.key}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CacheError(
                f"cache entry {self.path} {why}, and it cannot be set aside to be rebuilt "
                f"({exc.strerror or exc}); {os_error_fix(exc)}, or turn this cache off for the run "
                f"(cache_{self.kind}=false) to work without it"
            ) from None
        shutil.rmtree(aside, ignore_errors=True)

    def touch(self) -> None:
        """Mark the entry as used now (for least-recently-used eviction); in a read-only cache the
        entry is used all the same (logged), it just keeps its old last-use time."""
        try:
            os.utime(self.record_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.info("cache entry %s used without updating its last use (%s)", self.path, exc.strerror)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        locks = self.root / self.kind / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            handle = open(locks / f"{self.key}.lock", "a+")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise _storage_error(self, exc) from exc
        with handle:
            waited = time.monotonic()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("cache entry %s is being built by another process; waiting for it", self.path)
                fcntl.flock(handle, fcntl.LOCK_EX)
                log.info("waited %.1f s for cache entry %s", time.monotonic() - waited, self.path)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_or_build(self, build: Callable[[Path], dict[str, Any] | None]) -> tuple[dict[str, Any], bool]:
        """The entry's record, building it with `build(tmp_dir)` when absent or damaged.

        Returns (record, cached). `build` fills the directory it is given and may return extra facts
        stored under "info" in the record. A failed build leaves nothing behind.
        """
        record = self.record()
        if record is not None:
            self.touch()
            return record, True
        with self._lock():
            record = self.record()  # built by the process we waited for
            if record is not None:
                self.touch()
                return record, True
            return self._build(build), False

    def _build(self, build: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        reclaim_stale(self.root / self.kind)
        tmp = self.path.with_name(f".build-{self.key}-{owner_tag()}-{uuid.uuid4().hex[:8]}")
        started = time.perf_counter()
        try:
            tmp.mkdir(parents=True)
            info = build(tmp) or {}
            record = {
                "key": self.key,
                "kind": self.kind,
                "key_inputs": self.key_inputs,
                "created": time.time(),
                "build_seconds": round(time.perf_counter() - started, 3),
                "info": info,
                "files": _files(tmp, self.verify),
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            try:
                os.rename(tmp, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or self.record() is None:
                    raise
                log.info("cache entry %s was completed by another builder first; using it", self.path)
                shutil.rmtree(tmp, ignore_errors=True)
                return json.loads(self.record_path.read_text())
            return record
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _storage_error(self, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _storage_error(entry: CacheEntry, exc: OSError) -> CacheError:
    where = entry.root
    if exc.errno == errno.ENOSPC:
        free = shutil.disk_usage(where).free if where.exists() else 0
        return CacheError(
            f"disk full while building cache entry {entry.path} ({free / 2**20:.0f} MiB free): free space "
            "on that volume, lower the cache size limit (`gfocal gc`), or point work_dir elsewhere"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(
            f"cannot build cache entry {entry.path}: {exc.strerror or exc} ({exc.filename or where}); the "
            f"cache {str(where)!r} holds no valid entry for this key and cannot be written: make it "
            f"writable for this worker, or turn this cache off for the run (cache_{entry.kind}=false)"
        )
    return CacheError(
        f"cannot build cache entry {entry.path}: {exc.strerror or exc} ({exc.filename or where}); "
        "check that the work directory is writable by this worker"
    )


def reclaim_stale(kind_dir: Path, older_than_s: float = STALE_TMP_S, *, dry_run: bool = False) -> list[Path]:
    """Remove build/trash directories that killed builders left behind: at once when the builder
    was a process of this host that no longer runs (its `owner_tag` in the name), else once
    untouched for `older_than_s`. Returns what was (with `dry_run`: would be) removed."""
    removed: list[Path] = []
    if not kind_dir.is_dir():
        return removed
    now = time.time()
    for path in sorted(kind_dir.iterdir()):
        if not path.name.startswith((".build-", ".trash-")):
            continue
        with contextlib.suppress(FileNotFoundError):
            if owner_is_dead(path) or now - path.stat().st_mtime > older_than_s:
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@dataclass(frozen=True)
class EntryUsage:
    """An entry's size on disk and its last use (its record's mtime)."""

    entry: CacheEntry
    bytes: int
    last_used: float


class Cache:
    """The cache of one work directory: `<work_dir>/cache/`."""

    def __init__(self, work_dir: str | os.PathLike[str]) -> None:
        self.root = Path(work_dir) / "cache"

    def entry(self, kind: str, key_inputs: dict[str, Any], verify: str = SHA256) -> CacheEntry:
        if verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {verify!r}; expected one of {sorted(VERIFY_MODES)}")
        return CacheEntry(self.root, kind, cache_key(key_inputs), dict(key_inputs), verify)

    def entries(self) -> list[CacheEntry]:
        """Every complete entry of every kind."""
        found = []
        for kind_dir in self.kind_dirs():
            for path in sorted(kind_dir.iterdir()):
                if path.name.startswith(".") or not (path / RECORD).is_file():
                    continue
                found.append(CacheEntry(self.root, kind_dir.name, path.name, {}))
        return found

    def kind_dirs(self) -> list[Path]:
        """`<root>/<kind>/` of every kind present."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def usage(self) -> list[EntryUsage]:
        """Size and last use of every complete entry, least recently used first."""
        found = []
        for entry in self.entries():
            with contextlib.suppress(FileNotFoundError):  # evicted or discarded meanwhile
                last_used = entry.record_path.stat().st_mtime
                found.append(EntryUsage(entry, dir_size(entry.path), last_used))
        return sorted(found, key=lambda use: (use.last_used, use.entry.kind, use.entry.key))

    def evict(
        self,
        max_bytes: int,
        keep: Iterable[str] = (),
        *,
        min_idle_s: float = 0.0,
        dry_run: bool = False,
    ) -> list[tuple[CacheEntry, int]]:
        """Remove least-recently-used entries until the cache holds at most `max_bytes`.

        Entries whose key is in `keep` (those a running DAG run uses) and entries used less than
        `min_idle_s` ago are never removed. Returns the removed (with `dry_run`: the entries that
        would be removed, nothing is touched) entries with the bytes each freed.
        """
        protected = set(keep)
        usage = self.usage()
        total = sum(use.bytes for use in usage)
        now = time.time()
        removed = []
        for use in usage:
            if total <= max_bytes:
                break
            entry = use.entry
            if entry.key in protected or now - use.last_used < min_idle_s:
                continue
            if not dry_run:
                aside = entry.path.with_name(f".trash-{entry.key}-{uuid.uuid4().hex[:8]}")
                try:
                    os.replace(entry.path, aside)
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
            total -= use.bytes
            removed.append((entry, use.bytes))
        return removed
