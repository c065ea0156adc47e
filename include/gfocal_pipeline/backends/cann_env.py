"""The environment of CANN's `set_env.sh`, captured once and reused for every Ascend tool call.

On an Ascend host every tool (atc, msame, `python3 -m ais_bench`) needs the variables that
`<toolkit>/set_env.sh` exports (PATH, LD_LIBRARY_PATH, PYTHONPATH, ASCEND_*). We never run the tools
through a shell; instead we source the script once in `bash` (its path passed as `$1`, never pasted
into the command), dump the resulting environment with `env -0`, and keep only what the script
changed. That delta is laid over the caller's current environment for each tool call, so variables
the caller sets later (a proxy, a log level) still reach the tool. The capture is cached per
(path, mtime, size): editing or upgrading the toolkit is picked up without a restart.

CANN version (`cann_version`) is read from the first of these files under the toolkit home
(`ASCEND_TOOLKIT_HOME` as set by the script, else `<dir of set_env.sh>/latest`) that has a
`version=` line:
    `*/ascend_toolkit_install.info`, `ascend_toolkit_install.info`, `version.info`,
    `compiler/version.info`, `runtime/version.info`, `version.cfg`.
When none is found the version is `"unknown"` (logged), so caches keyed by it are not invalidated by
an upgrade that hides its version; set `ASCEND_TOOLKIT_HOME` correctly to avoid that.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gfocal_pipeline.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
SET_ENV_VARIABLE = "GFOCAL_CANN_SET_ENV"  # overrides the default path when no path is passed
UNKNOWN_VERSION = "unknown"
# variables bash itself sets or updates; never part of what set_env.sh "changed"
_BASH_OWN = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})
_CAPTURE_SCRIPT = '. "$1" >/dev/null 2>&1 && env -0'
_VERSION_FILES = (
    "*/ascend_toolkit_install.info",
    "ascend_toolkit_install.info",
    "version.info",
    "compiler/version.info",
    "runtime/version.info",
    "version.cfg",
)
_VERSION_LINE = re.compile(r"^\s*(?:version|Version|VERSION)\s*=\s*(\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class CannEnv:
    """What sourcing one `set_env.sh` changed: variables set (`delta`) and variables removed."""

    set_env: Path
    delta: Mapping[str, str]
    removed: tuple[str, ...] = ()

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a tool process: current `os.environ` + the CANN delta + `extra`."""
        env = dict(os.environ)
        for name in self.removed:
            env.pop(name, None)
        env.update(self.delta)
        if extra:
            env.update(extra)
        return env

    def which(self, tool: str) -> str | None:
        """Full path of `tool` on the CANN PATH, or None."""
        return shutil.which(tool, path=self.environ().get("PATH", ""))

    def require_tool(self, tool: str) -> str:
        """Full path of `tool`, or a BackendError saying where it was looked for."""
        found = self.which(tool)
        if found is None:
            raise BackendError(
                f"{tool!r} was not found on PATH after sourcing {str(self.set_env)!r}; install the CANN "
                f"toolkit component that provides it (or put it on PATH in that script) and retry"
            )
        return found

    @property
    def toolkit_home(self) -> Path:
        home = self.delta.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_TOOLKIT_HOME")
        return Path(home) if home else self.set_env.parent / "latest"


_cache: dict[tuple[str, int, int], CannEnv] = {}
_lock = threading.Lock()


def resolve_set_env(set_env: str | os.PathLike[str] | None = None) -> Path:
    """The `set_env.sh` to use: the argument, else `$GFOCAL_CANN_SET_ENV`, else the CANN default."""
    chosen = set_env or os.environ.get(SET_ENV_VARIABLE) or DEFAULT_SET_ENV
    return Path(chosen)


def load_cann_env(set_env: str | os.PathLike[str] | None = None, timeout_s: float = 120.0) -> CannEnv:
    """Source `set_env.sh` once (cached per path + mtime + size) and return what it changed."""
    from gfocal_pipeline.backends.process import check_safe_path

    path = resolve_set_env(set_env)
    check_safe_path(path, "set_env.sh path")
    try:
        stat = path.resolve().stat()
    except FileNotFoundError:
        raise BackendError(
            f"CANN environment script {str(path)!r} does not exist; install the Ascend CANN toolkit or pass "
            f"the path of its set_env.sh (parameter set_env / ${SET_ENV_VARIABLE})"
        ) from None
    if not path.is_file():
        raise BackendError(
            f"CANN environment script {str(path)!r} is not a file; pass the path of set_env.sh"
        )
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    env = _capture(path, timeout_s)
    with _lock:
        _cache[key] = env
    return env


def _capture(path: Path, timeout_s: float) -> CannEnv:
    bash = shutil.which("bash")
    if bash is None:
        raise BackendError("bash is needed to read the CANN environment script but is not on PATH")
    base = dict(os.environ)
    try:
        proc = subprocess.run(
            [bash, "-c", _CAPTURE_SCRIPT, "_", str(path)],
            env=base,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"sourcing {str(path)!r} did not finish within {timeout_s:.0f} s; check the script for prompts "
            "or network access"
        ) from None
    if proc.returncode != 0:
        raise BackendError(
            f"sourcing CANN environment script {str(path)!r} failed (exit {proc.returncode}); run "
            f"`bash -c '. {path}'` by hand to see why"
        )
    after: dict[str, str] = {}
    for item in proc.stdout.split(b"\0"):
        if not item or b"=" not in item:
            continue
        name, _, value = item.decode("utf-8", "surrogateescape").partition("=")
        after[name] = value
    delta = {k: v for k, v in after.items() if k not in _BASH_OWN and base.get(k) != v}
    removed = tuple(sorted(k for k in base if k not in after and k not in _BASH_OWN))
    log.info("CANN environment from %s: %d variables set/changed", path, len(delta))
    return CannEnv(set_env=path, delta=delta, removed=removed)


def cann_version(env: CannEnv) -> str:
    """The CANN toolkit version (e.g. `7.0.RC1`), or `"unknown"`; see the module docstring."""
    home = env.toolkit_home
    for pattern in _VERSION_FILES:
        for candidate in sorted(home.glob(pattern)):
            try:
                match = _VERSION_LINE.search(candidate.read_text(errors="replace"))
            except OSError:
                continue
            if match:
                return match.group(1)
    log.warning("no CANN version file found under %s; using %r", home, UNKNOWN_VERSION)
    return UNKNOWN_VERSION
