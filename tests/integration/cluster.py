"""A real Airflow 3 CeleryExecutor deployment on this machine's PostgreSQL and Redis, for the integration
tests: one `Cluster` owns a fresh metadata database and history database (`gfocal_it_<random>`), one
Redis DB index, an AIRFLOW_HOME and every process it starts (api-server, scheduler, dag-processor,
triggerer, celery workers), each in its own session so that it is stopped by PID with all of its
descendants (`stop_tree`), whatever the tests did.

The project under test is `root` (default: this checkout; `GFOCAL_IT_ROOT` picks another tree, e.g. a
`git archive` snapshot): its dags/, plugins/, include/ and operators/ come first on every process's
PYTHONPATH, ahead of the editable install.

Like separate hosts, each worker reports its own hostname (`[core] hostname_callable` returning
`$GFOCAL_IT_HOSTNAME`); only the ascend worker's environment names the CANN `set_env.sh`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import email
import email.policy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

PG_ADMIN_URL = os.environ.get("GFOCAL_IT_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("GFOCAL_IT_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("GFOCAL_IT_REDIS_DB", "7"))
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
HOSTNAME_MODULE = "gfocal_it_hostname"
CPU_HOST, ASCEND_HOST = "gfocal-cpu-host", "gfocal-npu-host"  # the two simulated worker hosts
DEADLINE_S = 36  # the nightly's deadline in the tests ([gfocal] nightly_deadline_hours = 0.01)
START_TIMEOUT_S = 180
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


class Inbox:
    """An SMTP server on loopback (aiosmtpd) that keeps every alert the deployment e-mails."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"

    def texts(self) -> list[str]:
        """Subject and text of every message (all text parts)."""
        out = []
        for message in list(self.messages):
            parts = [p.get_content() for p in message.walk() if p.get_content_maintype() == "text"]
            out.append("\n".join([str(message["Subject"]), *parts]))
        return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_tree(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM `pid`, its process group and every descendant (Airflow runs each task in a process group
    of its own), wait, then SIGKILL whatever is left."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            groups.add(os.getpgid(proc.pid))
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Cluster:
    """Databases, Redis DB, environment and processes of one throw-away deployment (see module doc)."""

    root: Path
    tmp: Path
    redis_db: int = REDIS_DB
    name: str = field(default_factory=lambda: f"gfocal_it_{secrets.token_hex(4)}")
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    port: int = field(default_factory=free_port)
    trigger_log_port: int = field(default_factory=free_port)
    services: dict[str, Service] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. the SMTP connection of the alert inbox
    dags_folder: Path | None = None  # default: the project's dags/ (a benchmark adds its own DAG beside them)

    def __post_init__(self) -> None:
        self.home = self.tmp / "airflow"
        self.work_dir = self.tmp / "work"  # the shared volume: every process sees the same work_dir
        self.logs = self.tmp / "logs"
        self.hostmod = self.tmp / "pythonpath"
        for folder in (self.home, self.work_dir, self.logs, self.hostmod):
            folder.mkdir(parents=True, exist_ok=True)
        (self.hostmod / f"{HOSTNAME_MODULE}.py").write_text(
            '"""Hostname of a simulated worker host (gfocal integration test)."""\n\nimport os\n\n\n'
            'def hostname() -> str:\n    return os.environ["GFOCAL_IT_HOSTNAME"]\n'
        )
        (self.tmp / "passwords.json").write_text(json.dumps({"admin": self.password}))
        self._secrets = {key: secrets.token_urlsafe(32) for key in ("jwt", "api")}
        from cryptography.fernet import Fernet

        self._fernet = Fernet.generate_key().decode()

    # -- names and URLs --------------------------------------------------------------------------
    @property
    def meta_db(self) -> str:
        return self.name

    @property
    def history_db(self) -> str:
        return f"{self.name}_history"

    def pg_url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        base = PG_ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1]
        return f"{driver}://{base}/{database}"

    @property
    def broker_url(self) -> str:
        return f"{REDIS_HOST}/{self.redis_db}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- databases -------------------------------------------------------------------------------
    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement)

    def create_databases(self) -> None:
        self._admin(f'CREATE DATABASE "{self.meta_db}"', f'CREATE DATABASE "{self.history_db}"')

    def drop_databases(self) -> None:
        self._admin(
            f'DROP DATABASE IF EXISTS "{self.meta_db}" WITH (FORCE)',
            f'DROP DATABASE IF EXISTS "{self.history_db}" WITH (FORCE)',
        )

    @property
    def redis_prefix(self) -> str:
        """Celery's `global_keyprefix`: every key of this cluster, so that concurrent runs on the same Redis
        DB index never see each other's queues or workers."""
        return f"{self.name}:"

    def redis_keys(self) -> list[str]:
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_timeout=10)
        try:
            return [key.decode() for key in client.scan_iter(match=f"{self.redis_prefix}*")]
        finally:
            client.close()

    def clear_redis(self) -> None:
        """Delete this cluster's keys (and only those) from the shared Redis DB index."""
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_timeout=10)
        try:
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    # -- environment -----------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment every process shares (Airflow config through AIRFLOW__*), plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GFOCAL_"))}
        pythonpath = [str(self.root / "include"), str(self.root), str(self.hostmod)]
        pythonpath += [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder or self.root / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.root / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__FERNET_KEY": self._fernet,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.tmp / "passwords.json"),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__SECRET_KEY": self._secrets["api"],
                "AIRFLOW__API_AUTH__JWT_SECRET": self._secrets["jwt"],
                # as in docker-compose.yaml: psycopg 3 for the sync and the async engine
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg_url(self.meta_db),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.pg_url(self.meta_db),
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.pg_url(self.meta_db),
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
                # only manual runs: a scheduled nightly (full size, demo data) would block them
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_port),
                "AIRFLOW__GFOCAL__HISTORY_URL": self.pg_url(self.history_db),
                "AIRFLOW__GFOCAL__ALERT_CHANNELS": "smtp",
                "GFOCAL_WORK_DIR": str(self.work_dir),
            }
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def worker_env(self, hostname: str, **extra: str) -> dict[str, str]:
        return self.env(
            AIRFLOW__CORE__HOSTNAME_CALLABLE=f"{HOSTNAME_MODULE}.hostname",
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            GFOCAL_IT_HOSTNAME=hostname,
            **extra,
        )

    # -- processes -------------------------------------------------------------------------------
    @property
    def airflow_bin(self) -> str:
        return str(Path(sys.executable).with_name("airflow"))

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run an `airflow` CLI command to completion; raises with its output when it fails."""
        done = subprocess.run(
            [self.airflow_bin, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            command = " ".join(args)
            raise AssertionError(f"airflow {command} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Service:
        """Start `airflow <args>` in a new session, output to logs/<name>.log."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [self.airflow_bin, *args],
                env=dict(env) if env is not None else self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.tmp,
                preexec_fn=_die_with_parent,
            )
        service = Service(name, process, log)
        self.services[name] = service
        return service

    def stop(self, name: str) -> None:
        service = self.services.pop(name, None)
        if service is not None:
            start = time.monotonic()
            stop_tree(service.process.pid)
            service.process.wait(timeout=10)
            with (self.logs / "stop-times.log").open("a") as out:
                out.write(f"{name}: stopped in {time.monotonic() - start:.1f}s\n")

    def stop_all(self) -> None:
        for name in list(self.services)[::-1]:
            self.stop(name)

    def start_worker(self, name: str, queue: str, hostname: str, concurrency: int, **env: str) -> Service:
        """`airflow celery worker` with the default (prefork) pool on one queue, as a separate host."""
        return self.start(
            name,
            "celery",
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--celery-hostname",
            f"{name}@{hostname}",
            env=self.worker_env(hostname, **env),
        )

    def check_alive(self) -> None:
        dead = [s for s in self.services.values() if not s.alive()]
        if dead:
            raise AssertionError(
                "\n".join(f"{s.name} exited with {s.process.returncode}:\n{tail(s.log)}" for s in dead)
            )

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the api-server reports a healthy metadatabase (every started process must stay up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=5) as response:
                    if json.load(response)["metadatabase"]["status"] == "healthy":
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(1)
        log = tail(self.logs / "api-server.log")
        raise AssertionError(f"api-server not healthy after {timeout}s:\n{log}")

    # -- API -------------------------------------------------------------------------------------
    def token(self, username: str = "admin", password: str | None = None) -> str:
        """A JWT from the simple auth manager's `/auth/token`."""
        body = json.dumps({"username": username, "password": password or self.password}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/auth/token", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["access_token"]

    def get_json(self, path: str, token: str | None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{self.base_url}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


@contextlib.contextmanager
def running_cluster(
    root: Path, tmp: Path, extra_env: Mapping[str, str] | None = None, dags_folder: Path | None = None
) -> Iterator[Cluster]:
    """Create the databases, migrate, start the control plane; always stop and drop everything."""
    cluster = Cluster(root=root, tmp=tmp, extra_env=dict(extra_env or {}), dags_folder=dags_folder)
    cluster.create_databases()
    try:
        cluster.airflow("db", "migrate", timeout=600)
        cluster.start(
            "api-server", "api-server", "--host", "127.0.0.1", "--port", str(cluster.port), "--workers", "1"
        )
        for name in ("scheduler", "dag-processor", "triggerer"):
            cluster.start(name, name)
        cluster.wait_healthy()
        yield cluster
    finally:
        try:
            cluster.stop_all()
        finally:
            with contextlib.suppress(Exception):
                cluster.clear_redis()
            cluster.drop_databases()
