"""`scripts/ui.sh` as a user runs it: it prints the URL and the admin password of `airflow standalone`
(SQLite, LocalExecutor) serving the project's DAGs and plugin, with secrets of its own (generated into
$AIRFLOW_HOME/gfocal-secrets.env, never printed; a Fernet key already in airflow.cfg is kept), and
Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import jwt
import psutil
import pytest
from cryptography.fernet import Fernet

from integration.cluster import free_port, stop_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300
LINE = re.compile(r"Airflow UI: (http://\S+)\s+user: admin\s+password: (\S+)")
SECRETS = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY")


def _read_until(
    process: subprocess.Popen, pattern: re.Pattern, timeout: float
) -> tuple[re.Match | None, str]:
    """Read the output line by line until `pattern` matches (or the timeout / exit)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    out, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            out += line
            if match := pattern.search(line):
                return match, out
    return None, out


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_ui_script_prints_url_and_password_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GFOCAL_"))}
    home, work = tmp_path / "home", tmp_path / "work"
    env.update(AIRFLOW_HOME=str(home), GFOCAL_WORK_DIR=str(work), GFOCAL_UI_PORT=str(free_port()))
    home.mkdir()  # a home from before gfocal-secrets.env: its Fernet key must survive
    fernet_key = Fernet.generate_key().decode()
    (home / "airflow.cfg").write_text(f"[core]\nfernet_key = {fernet_key}\n")
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "ui.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # like a terminal: the script leads its group, Ctrl-C goes to the group
        # a terminal's foreground job gets Ctrl-C; a runner started in the background (CI) may hand its
        # children SIGINT ignored, which a shell then cannot trap
        preexec_fn=_default_sigint,
    )
    tree = [psutil.Process(process.pid)]
    try:
        match, out = _read_until(process, LINE, START_TIMEOUT_S)
        assert match, f"no URL/password line:\n{out[-3000:]}"
        url, password = match.groups()
        body = json.dumps({"username": "admin", "password": password}).encode()
        request = urllib.request.Request(
            f"{url}/auth/token", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            token = json.load(response)["access_token"]
        deadline, dags = time.monotonic() + 120, set()
        while time.monotonic() < deadline and len(dags) < 2:
            dags = {d["dag_id"] for d in _get(f"{url}/api/v2/dags", token)["dags"]}
            time.sleep(2)
        assert dags == {"gfocal_onnxruntime", "gfocal_ascend_nightly"}
        assert "configurations" in _get(f"{url}/gfocal/api/trends", token)  # the plugin is served
        tree += psutil.Process(process.pid).children(recursive=True)
        _check_secrets(home, fernet_key, token, out, tree)
        names = [" ".join(p.cmdline()) for p in tree]
        assert any("airflow standalone" in n for n in names) and any("LocalExecutor" in n for n in names)
        assert (home / "airflow.db").is_file()  # SQLite metadata
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        process.wait(timeout=90)
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        rest = process.stdout.read() if process.stdout else ""
        assert "stopped" in rest
        secrets = (home / "gfocal-secrets.env").read_text().splitlines()[1:]
        assert not [line for line in secrets if line.split("=", 1)[1] in out + rest]
    finally:  # whatever happened: nothing it started survives the test
        for proc in tree:
            if proc.is_running():
                stop_tree(proc.pid)


def _check_secrets(home: Path, fernet_key: str, token: str, output: str, tree: list[psutil.Process]) -> None:
    """The state file is private and complete, its values reach Airflow and never the terminal."""
    path = home / "gfocal-secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if not line.startswith("#"))
    assert set(values) == set(SECRETS) and all(values.values())
    assert values["AIRFLOW__CORE__FERNET_KEY"] == fernet_key  # the existing key: stored data stay readable
    assert len(values["AIRFLOW__API_AUTH__JWT_SECRET"]) == 64 and "change-me" not in path.read_text()
    assert not [name for name, value in values.items() if value in output], "a secret was printed"
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(  # the UI's token is signed with the generated secret
        token,
        values["AIRFLOW__API_AUTH__JWT_SECRET"],
        algorithms=[header["alg"]],
        options={"verify_aud": False, "verify_iss": False},
    )
    assert claims["sub"] == "admin"
    environ = next(p.environ() for p in tree if "airflow standalone" in " ".join(p.cmdline()))
    assert {name: environ.get(name) for name in SECRETS} == values
