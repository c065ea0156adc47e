"""`gfocal doctor`: can this worker host run a night? One line per check, OK / FAIL with the fix.

Checks (names for `--only`; a group name selects its checks):
    cann       cann (set_env.sh sourced), atc, msame, ais_bench (`python3 -m ais_bench`), npu-smi
    npu        npu (`npu-smi info` lists chips; the detected soc_version)
    work_dir   work_dir (exists, writable), disk_space (free vs a night's need), same_path
    databases  metadata_db (Airflow's `[database] sql_alchemy_conn`), history_db (`[gfocal] history_url`)
    broker     broker (the Celery broker: redis PING, else a TCP connect)
    smtp       smtp (connect + EHLO, STARTTLS or implicit TLS as configured)
    versions   python, torch, onnxruntime, onnx, numpy, opencv

A FAIL means a night needs it and it is missing (exit status 1); WARN is something a night does not
strictly need (the other inference tool, a SQLite database on a multi-host deployment); SKIP is a
check that does not apply (nothing configured) or could not run because an earlier one failed.
Every check runs in a thread with a bound (network: `3 x timeout_s + 2` s; tools: 35 s; imports:
120 s), so a dead host or a hung mount becomes a FAIL line, never a hang. docs/doctor.md says what
each check proves and what it cannot (the same path on other hosts, above all).

The network and database probes are in `gfocal_pipeline.probes`. No Airflow import here: the URLs
are parameters. `settings_from_environment` reads the Airflow environment variables and airflow.cfg
(a plain INI read) for the CLI; the operator (`operators.doctor.DoctorOperator`) asks Airflow's own
configuration and connections.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import platform
import re
import shutil
import smtplib
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from gfocal_pipeline.constants import DEFAULT_HEIGHT, DEFAULT_WIDTH
from gfocal_pipeline.errors import ConfigError, GfocalError, os_error_fix
from gfocal_pipeline.probes import (
    SmtpTarget,
    first_line,
    probe_database,
    redis_ping,
    safe_url,
    smtp_hello,
    smtp_target_from_connection,
    sqlite_missing,
    url_port,
)

if TYPE_CHECKING:
    from gfocal_pipeline.backends.cann_env import CannEnv

OK, WARN, SKIP, FAIL = "OK", "WARN", "SKIP", "FAIL"
DEFAULT_IMAGES = 5000  # COCO val2017, the nightly's default set
DEFAULT_TIMEOUT_S = 5.0
TOOL_TIMEOUT_S = 30.0  # sourcing set_env.sh, `npu-smi info`, the ais_bench probe
IMPORT_TIMEOUT_S = 120.0
MARKER_DIR = ".gfocal-doctor"  # in the work dir; retention skips dot folders
# A night's disk need (an upper bound for a night whose inputs are not cached yet):
#   inputs   images x 3 x height x width x (4 for float32, 1 for uint8)  (the preprocessed .bin files)
#   outputs  1 MiB per image: final detections are a few KB, but the tool's raw files of the shards in
#            flight (TXT is ~10x BIN) and keep_candidates (~1.1 MB per image) must fit too
#   models   2 GiB: two ONNX exports, the OM, atc's working files, logs
OUTPUT_BYTES_PER_IMAGE = 1 << 20
MODEL_BYTES = 2 << 30
GIB = 1 << 30
TOOLS = ("msame", "ais_bench")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class DoctorFailed(GfocalError):
    """At least one check a night needs failed (CLI exit status 1; the doctor task fails)."""

    exit_code = 1

    def __init__(self, failed: Sequence[CheckResult], *, with_lines: bool = True) -> None:
        self.failed = list(failed)
        names = ", ".join(result.check for result in failed)
        lines = "".join("\n" + result.line() for result in failed) if with_lines else ""
        where = ":" if with_lines else " above"
        super().__init__(
            f"{len(failed)} check(s) failed ({names}): this host cannot run a night until the FAIL lines"
            f"{where} are fixed{lines}"
        )


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: `status` OK, WARN, SKIP or FAIL, what was found, and the fix."""

    check: str
    status: str
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        text = f"{self.status:<4} {self.check}: {self.detail}"
        return f"{text}; {self.fix}" if self.fix else text

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class DoctorSettings:
    """What to check. URLs left None are reported as not configured (SKIP)."""

    set_env: str | None = None
    tool: str = "msame"  # the night's inference tool: a missing one FAILs, the other only WARNs
    work_dir: str | None = None
    images: int = DEFAULT_IMAGES
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    dtype: str = "float32"
    metadata_url: str | None = None
    history_url: str | None = None
    broker_url: str | None = None
    smtp: SmtpTarget | None = None
    smtp_error: str | None = None  # the configured SMTP connection cannot be read: the smtp check FAILs
    timeout_s: float = DEFAULT_TIMEOUT_S
    notes: Mapping[str, str] = field(default_factory=dict)  # check -> why it is not configured

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise ConfigError(f"doctor tool {self.tool!r}: expected one of {', '.join(TOOLS)}")
        if self.dtype not in ("float32", "uint8"):
            raise ConfigError(f"doctor dtype {self.dtype!r}: expected float32 or uint8")
        for name in ("images", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"doctor {name} {value!r}: expected an integer >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"doctor timeout_s {self.timeout_s!r}: expected a number of seconds > 0")


class _Skip(Exception):
    """A check that cannot run (an earlier check failed, nothing configured): its SKIP line."""


class Doctor:
    """The settings and what the checks share (the CANN environment, loaded once)."""

    def __init__(self, settings: DoctorSettings) -> None:
        self.settings = settings
        self._cann: CannEnv | None = None
        self._cann_error: str | None = None
        self._lock = threading.Lock()

    def load_cann(self) -> CannEnv:
        """The CannEnv of the settings' set_env.sh (a GfocalError when it cannot be sourced)."""
        from gfocal_pipeline.backends.cann_env import load_cann_env

        with self._lock:
            if self._cann is None and self._cann_error is None:
                try:
                    self._cann = load_cann_env(self.settings.set_env, timeout_s=TOOL_TIMEOUT_S)
                except GfocalError as exc:
                    self._cann_error = first_line(exc)
            if self._cann_error is not None:
                raise GfocalError(self._cann_error)
            return self._cann

    def cann(self) -> CannEnv:
        """The CannEnv for a tool check, or _Skip when the environment could not be loaded."""
        try:
            return self.load_cann()
        except GfocalError:
            raise _Skip("the CANN environment could not be loaded (see the cann line)") from None

    @property
    def work_dir(self) -> Path:
        if self.settings.work_dir:
            return Path(self.settings.work_dir)
        from gfocal_pipeline.workspace import default_work_dir

        return default_work_dir()


# --- CANN and the NPU ----------------------------------------------------------------------------


def check_cann(doctor: Doctor) -> CheckResult:
    from gfocal_pipeline.backends.cann_env import cann_version

    env = doctor.load_cann()
    return CheckResult(
        "cann", OK, f"{env.set_env} sourced: CANN {cann_version(env)}, {len(env.delta)} variables set"
    )


def _needed_tools(settings: DoctorSettings) -> tuple[str, ...]:
    return ("atc", "npu-smi", settings.tool)


def _missing_tool(doctor: Doctor, tool: str, what: str) -> CheckResult:
    """FAIL for a tool the night needs, WARN for the inference tool it does not use."""
    set_env = doctor.cann().set_env
    fix = f"install the CANN component that provides it, or put it on PATH in {set_env}"
    if tool in _needed_tools(doctor.settings):
        return CheckResult(tool, FAIL, f"{what} after sourcing {set_env}", fix)
    return CheckResult(tool, WARN, f"{what} (not needed: this night uses {doctor.settings.tool})", fix)


def tool_check(tool: str) -> Callable[[Doctor], CheckResult]:
    """The check that `tool` is on the PATH set_env.sh sets (the backends' own lookup)."""

    def check(doctor: Doctor) -> CheckResult:
        found = doctor.cann().which(tool)
        if found is None:
            return _missing_tool(doctor, tool, f"{tool!r} is not on PATH")
        return CheckResult(tool, OK, found)

    return check


# prints where `python3 -m ais_bench` would start, or "missing: <why>" (never a traceback)
_AIS_BENCH_PROBE = """
import importlib.util
try:
    spec = importlib.util.find_spec("ais_bench.__main__")
    print(spec.origin if spec else "missing: the package ais_bench has no __main__")
except Exception as exc:
    print(f"missing: {type(exc).__name__}: {exc}")
"""


def check_ais_bench(doctor: Doctor) -> CheckResult:
    """`python3 -m ais_bench` as the backend runs it: that python3 on the CANN PATH finds the module."""
    from gfocal_pipeline.backends.process import run_tool

    env = doctor.cann()
    python = env.which("python3")
    if python is None:
        return _missing_tool(
            doctor, "ais_bench", "'python3' (which runs `python3 -m ais_bench`) is not on PATH"
        )
    argv = [python, "-c", _AIS_BENCH_PROBE]
    result = run_tool(argv, env=env.environ(), name="ais_bench probe", timeout_s=TOOL_TIMEOUT_S)
    found = result.lines[-1].strip() if result.lines else ""
    if result.returncode != 0 or not found or found.startswith("missing: "):
        why = found.removeprefix("missing: ") if result.returncode == 0 else result.tail(1)
        return _missing_tool(doctor, "ais_bench", f"{python} -m ais_bench cannot run ({why or 'no output'})")
    return CheckResult("ais_bench", OK, f"{python} -m ais_bench ({found})")


def check_npu(doctor: Doctor) -> CheckResult:
    """`npu-smi info` lists at least one chip; reports each and the soc_version atc would get."""
    from gfocal_pipeline.backends.npu_smi import list_npus

    env = doctor.cann()
    if env.which("npu-smi") is None:
        raise _Skip("npu-smi is not on PATH (see the npu-smi line)")
    devices = list_npus(env, timeout_s=TOOL_TIMEOUT_S)
    listed = ", ".join(f"{d.npu_id} {d.name} ({d.health})" for d in devices)
    names = sorted({device.name for device in devices})
    if len(names) > 1:
        return CheckResult(
            "npu", WARN, f"{len(devices)} NPU(s) of different chips: {listed}", "pass soc_version explicitly"
        )
    unhealthy = [d for d in devices if d.health.upper() != "OK"]
    if unhealthy:
        return CheckResult(
            "npu",
            WARN,
            f"{len(devices)} NPU(s): {listed}; not all report health OK",
            "see `npu-smi info -t health -i <id>` for the chip's alarms",
        )
    return CheckResult("npu", OK, f"{len(devices)} NPU(s): {listed}; soc_version {devices[0].soc_version}")


# --- the shared work directory -------------------------------------------------------------------


def check_work_dir(doctor: Doctor) -> CheckResult:
    """The work directory exists and this user can create and delete a file in it."""
    path = doctor.work_dir
    fix = (
        "create it, or mount the shared work directory at this path ($GFOCAL_WORK_DIR, [gfocal] work_dir, "
        "gfocal doctor --work-dir)"
    )
    if not path.exists():
        return CheckResult("work_dir", FAIL, f"{str(path)!r} does not exist on this host", fix)
    if not path.is_dir():
        return CheckResult("work_dir", FAIL, f"{str(path)!r} is not a directory", fix)
    probe = path / f".gfocal-doctor-probe-{_host()}-{os.getpid()}"
    try:
        descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(descriptor, b"gfocal doctor probe\n")
        finally:
            os.close(descriptor)
        probe.unlink()
    except OSError as exc:
        return CheckResult(
            "work_dir", FAIL, f"{str(path)!r} is not writable ({exc.strerror or exc})", os_error_fix(exc)
        )
    return CheckResult("work_dir", OK, f"{path} exists, writable (a probe file was created and deleted)")


def night_need_bytes(settings: DoctorSettings) -> dict[str, int]:
    """The disk a night needs in the work directory, by part (see OUTPUT_BYTES_PER_IMAGE above)."""
    per_image = 3 * settings.height * settings.width * (4 if settings.dtype == "float32" else 1)
    return {
        "inputs": settings.images * per_image,
        "outputs": settings.images * OUTPUT_BYTES_PER_IMAGE,
        "models": MODEL_BYTES,
    }


def check_disk_space(doctor: Doctor) -> CheckResult:
    settings, path = doctor.settings, doctor.work_dir
    if not path.is_dir():
        raise _Skip(f"{str(path)!r} is not a directory (see the work_dir line)")
    parts = night_need_bytes(settings)
    need, free = sum(parts.values()), shutil.disk_usage(path).free
    shown = " + ".join(f"{name} {size / GIB:.1f}" for name, size in parts.items())
    night = f"{settings.images} images at {settings.height}x{settings.width} {settings.dtype}"
    if free < need:
        return CheckResult(
            "disk_space",
            FAIL,
            f"{free / GIB:.1f} GiB free at {path}, a night of {night} needs about {need / GIB:.1f} GiB "
            f"({shown})",
            "free space (gfocal gc, a lower [gfocal] cache_max_gb), use dtype uint8 (4x smaller inputs), "
            "limit max_images, or point work_dir at a larger file system",
        )
    return CheckResult(
        "disk_space",
        OK,
        f"{free / GIB:.1f} GiB free, a night of {night} needs about {need / GIB:.1f} GiB ({shown})",
    )


def _host() -> str:
    return _HOST_CHARS.sub("_", socket.gethostname()) or "unknown-host"


def _mount_of(path: Path) -> str:
    """'<fstype> <source> on <mount point>' of the mount holding `path` (Linux), else ''."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target, best = str(path.resolve()), ("", "")
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, f"{rest[0]} {rest[1]} on {point}")
    return best[1]


def _write_marker(marker_dir: Path, record: dict[str, Any]) -> str:
    """Write this host's marker; '' when written, else why not."""
    try:
        marker_dir.mkdir(exist_ok=True)
        tmp = marker_dir / f".{record['host']}.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(marker_dir / f"{record['host']}.json")
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _other_markers(marker_dir: Path, host: str) -> list[dict[str, Any]]:
    found = []
    for marker in sorted(marker_dir.glob("*.json")) if marker_dir.is_dir() else []:
        if marker.stem == host:
            continue
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            found.append({"host": marker.stem, "path": record.get("path"), "written": record.get("written")})
    return found


def check_same_path(doctor: Doctor) -> CheckResult:
    """What one host can show about "the same directory at the same path on every worker"."""
    path = doctor.work_dir
    if not path.is_absolute():
        return CheckResult(
            "same_path",
            FAIL,
            f"{str(path)!r} is a relative path",
            "use the same absolute path on every worker",
        )
    if not path.is_dir():
        raise _Skip(f"{str(path)!r} is not a directory (see the work_dir line)")
    status = os.stat(path)
    device = f"{os.major(status.st_dev)}:{os.minor(status.st_dev)}"
    mount, host = _mount_of(path), _host()
    record = {"host": host, "path": str(path), "device": device, "mount": mount}
    record["written"] = datetime.now(UTC).isoformat(timespec="seconds")
    marker_dir = path / MARKER_DIR
    others = _other_markers(marker_dir, host)
    unwritten = _write_marker(marker_dir, record)  # also on a mismatch: the other host then sees it too
    moved = [other for other in others if other["path"] != str(path)]
    if moved:
        shown = ", ".join(f"{o['host']} at {o['path']!r} ({o['written']})" for o in moved)
        return CheckResult(
            "same_path",
            FAIL,
            f"this directory is {str(path)!r} here, but other hosts wrote their markers in it from another "
            f"path: {shown}",
            "mount the shared work directory at the same path on every worker, then run gfocal doctor there",
        )
    marker = f"marker {MARKER_DIR}/{host}.json " + (f"NOT written ({unwritten})" if unwritten else "written")
    seen = ", ".join(f"{o['host']} ({o['written']})" for o in others) or (
        "none yet: run gfocal doctor on every worker, then here again"
    )
    where = f"device {device}" + (f", {mount}" if mount else "")
    detail = f"absolute; {where}; {marker}; markers of other hosts at the same path: {seen}"
    return CheckResult("same_path", WARN if unwritten else OK, detail)


# --- databases, broker, SMTP ---------------------------------------------------------------------


def _database_check(
    name: str, url: str | None, doctor: Doctor, *, setting: str, table: str | None
) -> CheckResult:
    if not url:
        raise _Skip(doctor.settings.notes.get(name) or f"not configured ({setting})")
    fix = (
        "check that the database server runs and this host reaches it (host, port, firewall), and the URL's "
        f"driver, user, password and database ({setting})"
    )
    sqlite = url.startswith("sqlite")
    problem, missing = sqlite_missing(url) if sqlite else ("", False)
    if problem:
        return CheckResult(name, FAIL, f"{safe_url(url)!r}: {problem}", fix)
    try:
        if missing:
            detail = f"{safe_url(url)} does not exist yet; its folder is writable (the first use creates it)"
        else:
            detail = probe_database(url, doctor.settings.timeout_s, table)
    except GfocalError as exc:
        return CheckResult(name, FAIL, str(exc), fix)
    if sqlite:
        return CheckResult(
            name,
            WARN,
            f"{detail}; a SQLite file is local to this host",
            f"with workers on several hosts use a server database ({setting})",
        )
    return CheckResult(name, OK, detail)


def check_metadata_db(doctor: Doctor) -> CheckResult:
    """Airflow's metadata database (Celery's result backend defaults to it)."""
    setting = "[database] sql_alchemy_conn / AIRFLOW__DATABASE__SQL_ALCHEMY_CONN / --metadata-url"
    return _database_check("metadata_db", doctor.settings.metadata_url, doctor, setting=setting, table=None)


def check_history_db(doctor: Doctor) -> CheckResult:
    from gfocal_pipeline.history import TABLE_NAME

    setting = "[gfocal] history_url / $GFOCAL_HISTORY_URL / --history-url"
    return _database_check(
        "history_db", doctor.settings.history_url, doctor, setting=setting, table=TABLE_NAME
    )


_BROKER_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "librabbitmq": 5672}


def check_broker(doctor: Doctor) -> CheckResult:
    """The Celery broker: redis(s):// gets AUTH/SELECT/PING, amqp(s):// a TCP connect."""
    url = doctor.settings.broker_url
    if not url:
        raise _Skip(doctor.settings.notes.get("broker") or "no broker configured")
    first, *failover = url.split(";")
    parts, shown = urlsplit(first.strip()), safe_url(first.strip())
    more = f" ({len(failover)} failover URL(s) not checked)" if failover else ""
    fix = (
        "check that the broker runs and this host reaches it (host, port, firewall, password) "
        "([celery] broker_url / AIRFLOW__CELERY__BROKER_URL / --broker-url)"
    )
    try:
        if parts.scheme in ("redis", "rediss"):
            reply = redis_ping(first.strip(), doctor.settings.timeout_s)
            return CheckResult("broker", OK, f"{shown} answered PING ({reply}){more}")
        if parts.scheme in _BROKER_PORTS:
            address = (parts.hostname or "localhost", url_port(parts) or _BROKER_PORTS[parts.scheme])
            socket.create_connection(address, timeout=doctor.settings.timeout_s).close()
            return CheckResult("broker", OK, f"{shown} accepts TCP connections (protocol not checked){more}")
    except (OSError, ssl.SSLError) as exc:
        return CheckResult("broker", FAIL, f"cannot use {shown}: {exc.strerror or exc}", fix)
    raise _Skip(f"cannot check a {parts.scheme or 'scheme-less'} broker URL ({shown}); only redis and amqp")


def check_smtp(doctor: Doctor) -> CheckResult:
    """The SMTP server answers EHLO (credentials are not tried and no mail is sent)."""
    target = doctor.settings.smtp
    if doctor.settings.smtp_error:
        raise ConfigError(doctor.settings.smtp_error)
    if target is None:
        raise _Skip(doctor.settings.notes.get("smtp") or "no SMTP server configured: alerts are only logged")
    where = f"{target.host}:{target.port} ({target.security}, from {target.source})"
    try:
        greeting = smtp_hello(target, doctor.settings.timeout_s)
    except (OSError, smtplib.SMTPException) as exc:
        return CheckResult(
            "smtp",
            FAIL,
            f"no EHLO from {where}: {getattr(exc, 'strerror', None) or exc}",
            f"check the server runs and this host reaches it, and the host/port/TLS of {target.source}",
        )
    return CheckResult("smtp", OK, f"{where} answered EHLO: {greeting}; credentials not tried, no mail sent")


# --- versions ------------------------------------------------------------------------------------

# check -> (module, distribution)
LIBRARIES = {
    "torch": ("torch", "torch"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "onnx": ("onnx", "onnx"),
    "numpy": ("numpy", "numpy"),
    "opencv": ("cv2", "opencv-python-headless"),
}


def check_python(doctor: Doctor) -> CheckResult:
    version = platform.python_version()
    if sys.version_info[:2] != (3, 11):
        return CheckResult(
            "python", WARN, f"{version} ({sys.executable}); the project supports 3.11", "use Python 3.11"
        )
    return CheckResult("python", OK, f"{version} ({sys.executable})")


def _declared(distribution: str) -> str:
    """The project's requirement on `distribution` (e.g. 'torch==2.13.0'), else its bare name."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        for requirement in requires("gfocal-airflow") or ():
            name = re.split(r"[ <>=!~;\[]", requirement, maxsplit=1)[0]
            if name.lower() == distribution.lower() and "extra ==" not in requirement:
                return requirement.split(";")[0].strip()
    except PackageNotFoundError:
        pass
    return distribution


def library_check(name: str) -> Callable[[Doctor], CheckResult]:
    """Import the library in this process: a missing or broken one is a FAIL line naming the fix."""
    module_name, distribution = LIBRARIES[name]

    def check(doctor: Doctor) -> CheckResult:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or whatever a broken install raises while importing
            return CheckResult(
                name,
                FAIL,
                f"cannot import {module_name} ({type(exc).__name__}: {first_line(exc)})",
                f"install it into {sys.executable}: pip install '{_declared(distribution)}'",
            )
        version = str(getattr(module, "__version__", "unknown version"))
        if name == "onnxruntime":
            version += f", providers {', '.join(module.get_available_providers())}"
        return CheckResult(name, OK, version)

    return check


# --- running them --------------------------------------------------------------------------------


class Check(NamedTuple):
    name: str
    group: str
    run: Callable[[Doctor], CheckResult]
    kind: str  # "net" (timeout_s based), "tool" or "import": what bounds it


CHECKS: tuple[Check, ...] = (
    Check("cann", "cann", check_cann, "tool"),
    Check("atc", "cann", tool_check("atc"), "tool"),
    Check("msame", "cann", tool_check("msame"), "tool"),
    Check("ais_bench", "cann", check_ais_bench, "tool"),
    Check("npu-smi", "cann", tool_check("npu-smi"), "tool"),
    Check("npu", "npu", check_npu, "tool"),
    Check("work_dir", "work_dir", check_work_dir, "net"),
    Check("disk_space", "work_dir", check_disk_space, "net"),
    Check("same_path", "work_dir", check_same_path, "net"),
    Check("metadata_db", "databases", check_metadata_db, "net"),
    Check("history_db", "databases", check_history_db, "net"),
    Check("broker", "broker", check_broker, "net"),
    Check("smtp", "smtp", check_smtp, "net"),
    Check("python", "versions", check_python, "import"),
    *(Check(name, "versions", library_check(name), "import") for name in LIBRARIES),
)
_HANG_FIX = {
    "tool": "check the CANN install and the NPU driver (a tool that hangs here hangs a night too)",
    "net": "check the host and the network path (a hung network mount or a firewall dropping packets)",
    "import": "check the library's install (an import that hangs here hangs every task)",
}


def select_checks(only: Sequence[str] | None = None) -> tuple[Check, ...]:
    """The checks named in `only` (check or group names); all when empty."""
    wanted = {item.strip() for entry in only or () for item in entry.split(",") if item.strip()}
    if not wanted:
        return CHECKS
    known = {check.name for check in CHECKS} | {check.group for check in CHECKS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(
            f"unknown doctor check(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}"
        )
    return tuple(check for check in CHECKS if check.name in wanted or check.group in wanted)


def bound_s(check: Check, settings: DoctorSettings) -> float:
    """How long `check` may take before it is reported as hung."""
    return {"net": 3 * settings.timeout_s + 2, "tool": TOOL_TIMEOUT_S + 5, "import": IMPORT_TIMEOUT_S}[
        check.kind
    ]


def _guarded(check: Check, doctor: Doctor) -> CheckResult:
    """Run one check; every exception becomes its line (never a traceback)."""
    try:
        return check.run(doctor)
    except _Skip as skip:
        return CheckResult(check.name, SKIP, str(skip))
    except GfocalError as exc:
        return CheckResult(check.name, FAIL, first_line(exc))
    except OSError as exc:
        return CheckResult(
            check.name, FAIL, f"{exc.filename or ''} {exc.strerror or exc}".strip(), os_error_fix(exc)
        )
    except Exception as exc:
        return CheckResult(
            check.name, FAIL, f"unexpected {type(exc).__name__}: {first_line(exc)}", "please report it"
        )


def run_check(check: Check, doctor: Doctor) -> CheckResult:
    """`check` in a daemon thread, bounded by `bound_s`: a hang is a FAIL line."""
    box: list[CheckResult] = []
    thread = threading.Thread(
        target=lambda: box.append(_guarded(check, doctor)), name=f"gfocal-doctor-{check.name}", daemon=True
    )
    thread.start()
    limit = bound_s(check, doctor.settings)
    thread.join(limit)
    if box:
        return box[0]
    return CheckResult(check.name, FAIL, f"did not finish within {limit:.0f} s", _HANG_FIX[check.kind])


def run_doctor(
    settings: DoctorSettings,
    only: Sequence[str] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run the selected checks in order; `on_result` sees each line as soon as it is known."""
    doctor, results = Doctor(settings), []
    for check in select_checks(only):
        result = run_check(check, doctor)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def raise_for_results(results: Sequence[CheckResult]) -> None:
    """DoctorFailed naming the FAIL lines, if any."""
    failed = [result for result in results if result.failed]
    if failed:
        raise DoctorFailed(failed)


# --- settings from the Airflow environment (no Airflow import) -----------------------------------


def airflow_setting(section: str, key: str, environ: Mapping[str, str] | None = None) -> str | None:
    """`AIRFLOW__<SECTION>__<KEY>`, else `[section] key` of airflow.cfg ($AIRFLOW_CONFIG, else
    $AIRFLOW_HOME/airflow.cfg), else None. Read as plain INI: `_cmd`/`_secret` variants are not run."""
    env = os.environ if environ is None else environ
    value = env.get(f"AIRFLOW__{section.upper()}__{key.upper()}", "").strip()
    if value:
        return value
    home = env.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(env.get("AIRFLOW_CONFIG") or str(Path(home) / "airflow.cfg"), encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser.get(section, key, fallback="").strip() or None


def _smtp_from_environment(conn_id: str, env: Mapping[str, str]) -> SmtpTarget | None:
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    value = env.get(variable, "").strip()
    return smtp_target_from_connection(value, variable) if value else None


def settings_from_environment(environ: Mapping[str, str] | None = None, **given: Any) -> DoctorSettings:
    """DoctorSettings from the options `given` (None = not given), else the Airflow environment.

    `smtp_conn_id` (default `[gfocal] smtp_conn_id`, else smtp_default) names the connection read from
    `AIRFLOW_CONN_<ID>` when no `smtp` target is given."""
    from gfocal_pipeline.history import default_history_url

    env = os.environ if environ is None else environ
    values = {key: value for key, value in given.items() if value is not None}
    conn_id = (
        values.pop("smtp_conn_id", None) or airflow_setting("gfocal", "smtp_conn_id", env) or "smtp_default"
    )
    values.setdefault("metadata_url", airflow_setting("database", "sql_alchemy_conn", env))
    values.setdefault("history_url", airflow_setting("gfocal", "history_url", env) or default_history_url())
    values.setdefault("work_dir", airflow_setting("gfocal", "work_dir", env))
    executor = airflow_setting("core", "executor", env) or "LocalExecutor (Airflow's default)"
    values.setdefault("broker_url", airflow_setting("celery", "broker_url", env))
    if "smtp" not in values:
        try:
            values["smtp"] = _smtp_from_environment(conn_id, env)
        except ConfigError as exc:
            values["smtp_error"] = str(exc)
    notes = {
        "metadata_db": "not configured: pass --metadata-url or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "broker": f"no broker URL configured (executor {executor}); for a Celery worker pass --broker-url "
        "or set AIRFLOW__CELERY__BROKER_URL",
        "smtp": f"no SMTP server configured (--smtp-host, or the connection {conn_id}: "
        f"AIRFLOW_CONN_{conn_id.upper()}): alerts are only logged",
    }
    return DoctorSettings(**values, notes=notes)


def verdict_line(results: Sequence[CheckResult]) -> str:
    """The last line of the report: ready or not, and the count of each status."""
    failed = [result.check for result in results if result.failed]
    verdict = f"not ready: {len(failed)} FAIL ({', '.join(failed)})" if failed else "ready for a night"
    counts = ", ".join(
        f"{sum(r.status == status for r in results)} {status}" for status in (OK, WARN, SKIP, FAIL)
    )
    return f"doctor: {verdict} [{counts}]"


def format_report(results: Sequence[CheckResult]) -> str:
    """The report: one line per check, then the verdict line."""
    return "\n".join([*(result.line() for result in results), verdict_line(results)])
