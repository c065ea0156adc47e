"""`gfocal doctor` against real components: the emulated CANN toolkit, the machine's Postgres and Redis,
an SMTP server on loopback, real (tmpfs / bind-mounted) file systems. All OK, then each fault gives its
FAIL line and exit status 1, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from emulators.toolkit import Toolkit, make_toolkit
from support import closed_port, mounted, read_only_tree, silent_port, smtp_server

from gfocal_pipeline import doctor
from gfocal_pipeline.cli import main
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.probes import SmtpTarget

POSTGRES = os.environ.get("GFOCAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("GFOCAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ALL_CHECKS = [
    "cann",
    "atc",
    "msame",
    "ais_bench",
    "npu-smi",
    "npu",
    "work_dir",
    "disk_space",
    "same_path",
    "metadata_db",
    "history_db",
    "broker",
    "smtp",
    "python",
    "torch",
    "onnxruntime",
    "onnx",
    "numpy",
    "opencv",
]


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    return make_toolkit(tmp_path / "cann", version="8.0.RC2")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def smtp_port() -> Iterator[int]:
    with smtp_server() as (port, _):
        yield port


@pytest.fixture(autouse=True)
def no_airflow_smtp(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "AIRFLOW__GFOCAL__", "AIRFLOW__CELERY"))
    ]:
        monkeypatch.delenv(name)


def healthy(kit: Toolkit, work: Path, smtp_port: int | None, *extra: str) -> list[str]:
    """The arguments of a host where everything works; `extra` overrides (argparse: the last wins).
    No SMTP server when `smtp_port` is None."""
    smtp = ["--smtp-host", "127.0.0.1", "--smtp-port", str(smtp_port)] if smtp_port else []
    return [
        "doctor",
        "--set-env",
        str(kit.set_env),
        "--work-dir",
        str(work),
        "--images",
        "10",
        "--metadata-url",
        POSTGRES,
        "--history-url",
        POSTGRES,
        "--broker-url",
        REDIS,
        *smtp,
        *extra,
    ]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, str], str]:
    """main(argv) in process: (exit status, {check: its line}, all output); never a traceback."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    lines = {}
    for line in out.splitlines() or err.splitlines():
        head, _, _ = line.partition(":")
        words = head.split()
        if len(words) == 2 and words[0] in ("OK", "WARN", "SKIP", "FAIL"):
            lines[words[1]] = line
    return status, lines, out + err


def statuses(lines: dict[str, str]) -> dict[str, str]:
    return {check: line.split()[0] for check, line in lines.items()}


def test_all_ok_on_a_healthy_host(
    kit: Toolkit,
    work: Path,
    smtp_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_CHIP", "910B")
    status, lines, out = run(capsys, healthy(kit, work, smtp_port))
    assert status == 0, out
    assert list(lines) == ALL_CHECKS
    assert set(statuses(lines).values()) == {"OK"}, out
    assert f"{kit.set_env} sourced: CANN 8.0.RC2" in lines["cann"]
    assert lines["atc"] == f"OK   atc: {kit.home / 'latest' / 'bin' / 'atc'}"
    assert "1 NPU(s): 0 910B (OK); soc_version Ascend910B" in lines["npu"]
    assert "postgresql" in lines["metadata_db"] and "+PONG" in lines["broker"]
    assert f"127.0.0.1:{smtp_port} (plain, from --smtp-host) answered EHLO: 250" in lines["smtp"]
    assert out.splitlines()[-1].startswith("doctor: ready for a night [19 OK, 0 WARN, 0 SKIP, 0 FAIL]")
    assert (
        lines["numpy"] == f"OK   numpy: {np.__version__}"
        and lines["opencv"] == f"OK   opencv: {cv2.__version__}"
    )
    assert [call["argv"] for call in kit.calls("npu-smi")] == [["info"]]  # the emulated npu-smi really ran
    assert not [p for p in work.iterdir() if p.name.startswith(".gfocal-doctor-probe")]


def test_json_output_and_only(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(healthy(kit, work, smtp_port, "--only", "cann,work_dir", "--only", "broker", "--json")) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    names = ["cann", "atc", "msame", "ais_bench", "npu-smi", "work_dir", "disk_space", "same_path", "broker"]
    assert data["ready"] is True and [c["check"] for c in data["checks"]] == names
    assert {c["status"] for c in data["checks"]} == {"OK"}
    assert "OK   broker:" in err  # the lines go to stderr with --json
    assert main(["doctor", "--only", "cann,bogus"]) == 2
    assert "unknown doctor check(s) bogus; choose from:" in capsys.readouterr().err


def test_missing_set_env(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = kit.home / "nowhere" / "set_env.sh"
    status, lines, out = run(capsys, healthy(kit, work, smtp_port, "--set-env", str(missing)))
    assert status == 1
    assert lines["cann"].startswith(
        f"FAIL cann: CANN environment script {str(missing)!r} does not exist; install"
    )
    assert statuses(lines) == {**dict.fromkeys(ALL_CHECKS, "OK"), "cann": "FAIL"} | dict.fromkeys(
        ["atc", "msame", "ais_bench", "npu-smi", "npu"], "SKIP"
    )
    assert "gfocal doctor: error: 1 check(s) failed (cann)" in out


def test_a_toolkit_without_msame(
    tmp_path: Path, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_toolkit(tmp_path / "partial", tools=("atc", "npu-smi", "ais_bench"))
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "cann"))
    assert status == 1
    assert lines["msame"] == (
        f"FAIL msame: 'msame' is not on PATH after sourcing {kit.set_env}; install the CANN component that "
        f"provides it, or put it on PATH in {kit.set_env}"
    )
    assert statuses(lines) == {"cann": "OK", "atc": "OK", "msame": "FAIL", "ais_bench": "OK", "npu-smi": "OK"}
    # a night with ais_bench does not need msame: a warning, exit status 0
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "cann", "--tool", "ais_bench"))
    assert status == 0 and lines["msame"].startswith(
        "WARN msame: 'msame' is not on PATH (not needed: this night"
    )


def test_a_toolkit_without_ais_bench_and_npu_smi(
    tmp_path: Path, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = make_toolkit(tmp_path / "partial", tools=("atc", "msame"))
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "cann,npu", "--tool", "ais_bench"))
    assert status == 1
    assert (
        lines["ais_bench"].startswith("FAIL ais_bench: ")
        and "-m ais_bench cannot run (ModuleNotFoundError: No module named 'ais_bench')" in lines["ais_bench"]
    )
    assert lines["npu-smi"].startswith("FAIL npu-smi: 'npu-smi' is not on PATH after sourcing")
    assert lines["npu"] == "SKIP npu: npu-smi is not on PATH (see the npu-smi line)"
    assert lines["msame"].startswith("OK   msame: ")


def test_npu_smi_lists_no_chip(
    kit: Toolkit,
    work: Path,
    smtp_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GFOCAL_EMULATOR_FAULT", "npu_smi_no_chip")
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "cann,npu"))
    assert status == 1
    assert lines["npu"].startswith("FAIL npu: `npu-smi info` listed no NPU")
    assert lines["npu"].endswith(
        "check that the NPU driver sees the card, or pass soc_version explicitly (e.g. 'Ascend310P3')."
    )
    assert lines["npu-smi"].startswith("OK")


def test_a_read_only_work_dir(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with read_only_tree(work):
        status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "work_dir"))
    assert status == 1
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert lines["work_dir"].startswith(f"FAIL work_dir: {str(work)!r} is not writable ({reason}); ")
    assert lines["same_path"].startswith("WARN same_path: absolute; device ")
    assert f"NOT written ({reason})" in lines["same_path"]


def test_a_work_dir_that_does_not_exist(
    kit: Toolkit, tmp_path: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "not-mounted"
    status, lines, _ = run(capsys, healthy(kit, missing, smtp_port, "--only", "work_dir"))
    assert status == 1
    assert lines["work_dir"] == (
        f"FAIL work_dir: {str(missing)!r} does not exist on this host; create it, or mount the shared work "
        "directory at this path ($GFOCAL_WORK_DIR, [gfocal] work_dir, gfocal doctor --work-dir)"
    )
    assert statuses(lines) == {"work_dir": "FAIL", "disk_space": "SKIP", "same_path": "SKIP"}
    assert not missing.exists()  # the doctor does not create it: a missing mount must show


def test_free_space_against_the_night(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/caches-and-retention.md: 5000 val2017 inputs at 800x1216 are 58.4 GB in float32 (54.4 GiB),
    # 14.6 GB in uint8 (13.6 GiB)
    for dtype, inputs in (("float32", "inputs 54.4"), ("uint8", "inputs 13.6")):
        _, lines, _ = run(
            capsys,
            healthy(kit, work, smtp_port, "--only", "disk_space", "--images", "5000", "--dtype", dtype),
        )
        assert f"a night of 5000 images at 800x1216 {dtype} needs about" in lines["disk_space"]
        assert f"({inputs} + outputs 4.9 + models 2.0)" in lines["disk_space"]
    small = work / "small"
    with mounted(small, "size=1m") as ok:
        if not ok:  # not root: ask for more than any disk holds instead
            small = work
        images = "5000" if ok else "100000000"
        status, lines, _ = run(
            capsys, healthy(kit, small, smtp_port, "--only", "disk_space", "--images", images)
        )
    assert status == 1
    assert lines["disk_space"].startswith("FAIL disk_space: ") and " GiB free at " in lines["disk_space"]
    assert lines["disk_space"].endswith("or point work_dir at a larger file system")


def test_same_path_markers_of_other_hosts(
    kit: Toolkit,
    work: Path,
    tmp_path: Path,
    smtp_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "npu-host")
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "same_path"))
    assert status == 0 and "marker .gfocal-doctor/npu-host.json written" in lines["same_path"]
    monkeypatch.setattr(socket, "gethostname", lambda: here)
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "same_path"))
    assert status == 0 and "markers of other hosts at the same path: npu-host (" in lines["same_path"]
    # the NPU host mounts the same directory elsewhere (here: through a symbolic link)
    alias = tmp_path / "elsewhere"
    alias.symlink_to(work)
    monkeypatch.setattr(socket, "gethostname", lambda: "npu-host")
    status, lines, _ = run(capsys, healthy(kit, alias, smtp_port, "--only", "same_path"))
    assert status == 1 and f"from another path: {here} at {str(work)!r}" in lines["same_path"]
    monkeypatch.setattr(socket, "gethostname", lambda: here)
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "same_path"))
    assert status == 1
    assert f"npu-host at {str(alias)!r}" in lines["same_path"]
    assert lines["same_path"].endswith(
        "mount the shared work directory at the same path on every worker, then run gfocal doctor there"
    )


def test_unreachable_databases(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{closed_port()}/postgres"
    no_db = POSTGRES.rsplit("/", 1)[0] + "/no_such_database"
    argv = healthy(
        kit, work, smtp_port, "--only", "databases", "--metadata-url", down, "--history-url", no_db
    )
    status, lines, out = run(capsys, argv)
    assert status == 1
    assert lines["metadata_db"].startswith(
        "FAIL metadata_db: cannot connect to postgresql+psycopg://postgres:***@"
    )
    assert "Connection refused" in lines["metadata_db"] and "s3cret" not in out
    assert lines["metadata_db"].endswith(
        "([database] sql_alchemy_conn / AIRFLOW__DATABASE__SQL_ALCHEMY_CONN / --metadata-url)"
    )
    assert 'database "no_such_database" does not exist' in lines["history_db"]


def test_sqlite_databases(
    kit: Toolkit, work: Path, tmp_path: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = f"sqlite:///{tmp_path / 'history.sqlite'}"
    nowhere = f"sqlite:///{tmp_path / 'no' / 'such' / 'airflow.db'}"
    argv = healthy(
        kit, work, smtp_port, "--only", "databases", "--metadata-url", nowhere, "--history-url", fresh
    )
    status, lines, _ = run(capsys, argv)
    assert status == 1
    assert f"{str(tmp_path / 'no' / 'such')!r} exists" in lines["metadata_db"]
    assert (
        lines["history_db"].startswith("WARN history_db: sqlite:///")
        and "does not exist yet" in lines["history_db"]
    )
    assert not (tmp_path / "history.sqlite").exists()  # checking creates nothing
    sqlite3.connect(tmp_path / "history.sqlite").execute("CREATE TABLE gfocal_run_results (id INTEGER)")
    status, lines, _ = run(
        capsys, healthy(kit, work, smtp_port, "--only", "history_db", "--history-url", fresh)
    )
    assert status == 0
    assert (
        "answered SELECT 1 (sqlite " in lines["history_db"]
        and "table gfocal_run_results present" in lines["history_db"]
    )
    assert lines["history_db"].endswith(
        "a SQLite file is local to this host; with workers on several hosts use a server database "
        "([gfocal] history_url / $GFOCAL_HISTORY_URL / --history-url)"
    )


def test_broker_faults(kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    host = REDIS.split("//", 1)[1].split("/", 1)[0]
    cases = {
        f"redis://127.0.0.1:{closed_port()}/0": "Connection refused",
        f"redis://:wrong@{host}/0": "AUTH answered",  # this Redis has no password
        f"redis://{host}/99999": "SELECT answered",
        f"amqp://guest@127.0.0.1:{closed_port()}//": "Connection refused",
    }
    for url, reason in cases.items():
        status, lines, out = run(
            capsys, healthy(kit, work, smtp_port, "--only", "broker", "--broker-url", url)
        )
        assert status == 1, out
        assert lines["broker"].startswith("FAIL broker: cannot use ") and reason in lines["broker"], out
        assert "wrong" not in out
    status, lines, _ = run(
        capsys, healthy(kit, work, smtp_port, "--only", "broker", "--broker-url", "sqs://")
    )
    assert status == 0 and lines["broker"].startswith("SKIP broker: cannot check a sqs broker URL")


def test_a_silent_service_is_a_timeout_not_a_hang(
    kit: Toolkit, work: Path, smtp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with silent_port() as port:
        argv = healthy(kit, work, smtp_port, "--only", "broker,smtp", "--timeout", "1")
        argv += ["--broker-url", f"redis://127.0.0.1:{port}/0", "--smtp-port", str(port)]
        start = time.monotonic()
        status, lines, _ = run(capsys, argv)
    assert status == 1 and time.monotonic() - start < 10
    assert "timed out" in lines["broker"] and "timed out" in lines["smtp"]


def test_a_check_that_hangs_is_bounded() -> None:
    check = doctor.Check("stuck", "test", lambda _: time.sleep(10), "net")
    start = time.monotonic()
    result = doctor.run_check(check, doctor.Doctor(doctor.DoctorSettings(timeout_s=0.1)))
    assert time.monotonic() - start < 5
    assert result.line().startswith(
        "FAIL stuck: did not finish within 2 s; check the host and the network path"
    )


def test_smtp_faults_and_the_airflow_connection(
    kit: Toolkit,
    work: Path,
    smtp_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = closed_port()
    status, lines, _ = run(capsys, healthy(kit, work, smtp_port, "--only", "smtp", "--smtp-port", str(down)))
    assert status == 1
    assert lines["smtp"].startswith(
        f"FAIL smtp: no EHLO from 127.0.0.1:{down} (plain, from --smtp-host): Connection refused"
    )
    base = healthy(kit, work, None, "--only", "smtp")
    status, lines, _ = run(capsys, base)  # nothing configured
    assert status == 0 and lines["smtp"].startswith("SKIP smtp: no SMTP server configured")
    # the deployment's connection (docker-compose.yaml's form): plain SMTP
    uri = f"smtp://127.0.0.1:{smtp_port}?disable_tls=true&disable_ssl=true"
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", uri)
    status, lines, _ = run(capsys, base)
    assert status == 0 and "(plain, from AIRFLOW_CONN_SMTP_DEFAULT) answered EHLO" in lines["smtp"]
    # without disable_ssl the SMTP provider speaks implicit TLS, which this plain server does not
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{smtp_port}")
    status, lines, _ = run(capsys, base)
    assert status == 1 and lines["smtp"].startswith(f"FAIL smtp: no EHLO from 127.0.0.1:{smtp_port} (ssl,")
    # STARTTLS asked, not offered by this server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", f"smtp://127.0.0.1:{smtp_port}?disable_ssl=true")
    status, lines, _ = run(capsys, base)
    assert status == 1 and "does not offer STARTTLS" in lines["smtp"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", "smtp://:notaport")
    status, lines, _ = run(capsys, base)
    assert status == 1 and lines["smtp"].startswith(
        "FAIL smtp: AIRFLOW_CONN_SMTP_DEFAULT is not an Airflow connection"
    )


def test_a_broken_library_is_a_fail_line(tmp_path: Path) -> None:
    """A library that cannot be imported (here: a shadowing onnx package that raises) fails its line."""
    (tmp_path / "shadow" / "onnx").mkdir(parents=True)
    (tmp_path / "shadow" / "onnx" / "__init__.py").write_text(
        "raise ImportError('libonnx.so: cannot open')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "gfocal_pipeline.cli", "doctor", "--only", "versions"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert (
        "FAIL onnx: cannot import onnx (ImportError: libonnx.so: cannot open); install it into "
        in done.stdout
    )
    assert "pip install 'onnx" in done.stdout and "OK   numpy: " in done.stdout


def test_every_fault_at_once_in_a_subprocess(kit: Toolkit, tmp_path: Path) -> None:
    """`python -m gfocal_pipeline.cli doctor` as an operator runs it: FAIL lines, exit 1, no traceback."""
    argv = [
        "doctor",
        "--set-env",
        str(tmp_path / "none" / "set_env.sh"),
        "--work-dir",
        str(tmp_path / "missing"),
        "--metadata-url",
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/postgres",
        "--history-url",
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/postgres",
        "--broker-url",
        f"redis://127.0.0.1:{closed_port()}/0",
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        str(closed_port()),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "gfocal_pipeline.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    failed = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == ["cann", "work_dir", "metadata_db", "history_db", "broker", "smtp"]
    assert "doctor: not ready: 6 FAIL (cann, work_dir, metadata_db, history_db, broker, smtp)" in done.stdout
    assert "gfocal doctor: error: 6 check(s) failed" in done.stderr


def test_settings_from_the_airflow_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(
        "[database]\nsql_alchemy_conn = postgresql+psycopg://a@db/airflow\n"
        "[celery]\nbroker_url = redis://redis:6379/0\n"
        "[gfocal]\nwork_dir = /data/gfocal\nsmtp_conn_id = mail\n"
    )
    env = {
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CELERY__BROKER_URL": "redis://other:6379/1",
        "AIRFLOW_CONN_MAIL": json.dumps({"conn_type": "smtp", "host": "mx", "extra": {"disable_ssl": True}}),
        "AIRFLOW__GFOCAL__HISTORY_URL": "postgresql+psycopg://h@db/history",
    }
    settings = doctor.settings_from_environment(env, tool="ais_bench")
    assert settings.metadata_url == "postgresql+psycopg://a@db/airflow"  # airflow.cfg
    assert settings.broker_url == "redis://other:6379/1"  # the environment wins over airflow.cfg
    assert settings.work_dir == "/data/gfocal" and settings.tool == "ais_bench"
    assert settings.smtp == SmtpTarget("mx", 25, "starttls", "AIRFLOW_CONN_MAIL")
    assert settings.history_url == "postgresql+psycopg://h@db/history"
    given = doctor.settings_from_environment(env, history_url="sqlite:////h.db", metadata_url="x://")
    assert given.history_url == "sqlite:////h.db" and given.metadata_url == "x://"
    with pytest.raises(ConfigError, match="doctor images 0: expected an integer >= 1"):
        doctor.DoctorSettings(images=0)


def test_a_relative_work_dir_is_not_the_same_path() -> None:
    results = doctor.run_doctor(doctor.DoctorSettings(work_dir="relative/work"), only=["same_path"])
    assert results[0].line() == (
        "FAIL same_path: 'relative/work' is a relative path; use the same absolute path on every worker"
    )
    with pytest.raises(doctor.DoctorFailed, match=r"1 check\(s\) failed \(same_path\)"):
        doctor.raise_for_results(results)
