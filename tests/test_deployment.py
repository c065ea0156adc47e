"""docker-compose.yaml agrees with the code: queue, pool, DAG names, history DB (no Docker engine here);
it ships no secret: the JWT secret, Fernet key, API secret key and DB password come from `.env` only
(`docker compose config` refuses to run without them, when a compose CLI is installed)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from support import ROOT

from gfocal_pipeline.constants import ASCEND_POOL, ASCEND_QUEUE


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_compose_uses_the_queue_and_pool_of_the_code() -> None:
    services = _compose()["services"]
    assert f"--queues {ASCEND_QUEUE}" in services["airflow-worker-ascend"]["command"]
    assert ASCEND_QUEUE not in services["airflow-worker"]["command"]
    init = " ".join(services["airflow-init"]["command"])
    assert f"airflow pools set {ASCEND_POOL} " in init


def test_compose_runs_celery_with_postgres_and_redis() -> None:
    compose = _compose()
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert "postgresql" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__GFOCAL__HISTORY_URL"].startswith("postgresql+psycopg://")
    assert {
        "postgres",
        "redis",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-worker",
        "airflow-worker-ascend",
    } <= set(compose["services"])
    ascend_env = compose["services"]["airflow-worker-ascend"]["environment"]
    assert ascend_env["GFOCAL_CANN_SET_ENV"].endswith("set_env.sh")


def test_every_service_mounts_the_one_shared_work_dir() -> None:
    compose = _compose()
    work_dir = compose["x-gfocal-common"]["environment"]["GFOCAL_WORK_DIR"]
    airflow = {name: s for name, s in compose["services"].items() if name.startswith("airflow-")}
    assert "airflow-worker-ascend" in airflow and len(airflow) >= 7
    for name, service in airflow.items():
        mounts = [v.split(":")[:2] for v in service["volumes"]]
        assert ["gfocal-data", work_dir] in mounts, name
        assert service["environment"]["GFOCAL_WORK_DIR"] == work_dir, name
    assert "gfocal-data" in compose["volumes"]


def test_compose_sets_the_async_db_url_and_distinct_worker_names() -> None:
    services = _compose()["services"]
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    names = [
        services[w]["command"].split("--celery-hostname ")[1].split()[0]
        for w in ("airflow-worker", "airflow-worker-ascend")
    ]
    assert len(set(names)) == 2


def test_the_image_installs_exactly_the_celery_extra() -> None:
    import re
    import tomllib

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.findall(r'"/opt/gfocal(\[[^\]]*\])?"', dockerfile) == ["[celery]"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    celery = extras["celery"]
    assert any(r.startswith("apache-airflow-providers-celery") for r in celery)
    assert any(r.startswith("celery[redis]") and "<5.7" in r for r in celery)  # 5.7.0 breaks the provider
    assert any(r.startswith("asyncpg") for r in celery)


# -- secrets -------------------------------------------------------------------------------------------
REQUIRED = ("AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "AIRFLOW_API_SECRET_KEY", "GFOCAL_DB_PASSWORD")
KNOWN_DEFAULTS = ("change-me", "changeme", "airflow:airflow@", "secret123", "admin:admin@")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|_KEY$")
REQUIRED_REF = re.compile(r"^\$\{(?P<var>[A-Z_][A-Z0-9_]*):\?(?P<message>[^}]*)\}$")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<password>\$\{[^}]*\}|[^@\s]*)@")


def _environments() -> dict[str, dict]:
    compose = _compose()
    envs = {f"services.{name}": s.get("environment", {}) for name, s in compose["services"].items()}
    envs["x-gfocal-common"] = compose["x-gfocal-common"]["environment"]
    return envs


def test_compose_ships_no_literal_secret() -> None:
    text = (ROOT / "docker-compose.yaml").read_text()
    for default in KNOWN_DEFAULTS:
        assert default not in text.lower(), default
    for where, env in _environments().items():
        assert isinstance(env, dict), f"{where}: environment must be a mapping"
        for key, value in env.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.match(value), f"{where}.{key} = {value!r} is not ${{VAR:?...}}"
            for match in URL_PASSWORD.finditer(value):  # user:password@ in a URL
                password = match["password"]
                assert password == "" or REQUIRED_REF.match(password), f"{where}.{key} has a password"
    for path in (ROOT / "docker").iterdir():
        assert not re.search(r"(?i)password\s+'[^']", path.read_text()), path  # e.g. CREATE USER ... PASSWORD


def test_every_secret_is_required_with_a_message_naming_it_and_env_example() -> None:
    text = (ROOT / "docker-compose.yaml").read_text()
    for var in REQUIRED:
        references = re.findall(r"\$\{" + var + r"\b[^}]*\}", text)
        assert references, f"{var} is not used"
        for reference in references:
            match = REQUIRED_REF.match(reference)
            assert match, f"{reference} has a default or is optional"
            assert var in match["message"] and ".env.example" in match["message"], reference
    env = _compose()["x-gfocal-common"]["environment"]
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
    assert env["AIRFLOW__CORE__FERNET_KEY"].startswith("${AIRFLOW_FERNET_KEY:?")
    assert env["AIRFLOW__API__SECRET_KEY"].startswith("${AIRFLOW_API_SECRET_KEY:?")
    password = _compose()["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${GFOCAL_DB_PASSWORD:?")
    urls = [env[k] for k in env if k.endswith(("_CONN", "_CONN_ASYNC", "RESULT_BACKEND", "HISTORY_URL"))]
    assert len(urls) == 4 and all(":${GFOCAL_DB_PASSWORD:?" in url for url in urls), urls


def _env_example() -> str:
    return (ROOT / ".env.example").read_text()


def test_env_example_documents_every_variable_and_leaves_the_secrets_empty() -> None:
    example = _env_example()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yaml").read_text()))
    documented = set(re.findall(r"^#? ?([A-Z_][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    assert used <= documented, sorted(used - documented)
    for var in REQUIRED:
        assert re.search(rf"^{var}=$", example, flags=re.MULTILINE), f"{var}: not an empty placeholder"
    assert "openssl rand -hex 32" in example and "Fernet.generate_key()" in example


def test_env_is_ignored_by_git() -> None:
    patterns = (ROOT / ".gitignore").read_text().split()
    assert ".env" in patterns or "/.env" in patterns
    if shutil.which("git") and (ROOT / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
        assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT).returncode == 1


def _write_env(target: Path) -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "ui.sh"), "--write-env", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout + done.stderr


def _values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"^[A-Z_]+=", line))
    return dict(pairs)


def test_write_env_generates_fresh_private_secrets_once(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    output = _write_env(first) + _write_env(second)
    values = _values(first)
    assert set(REQUIRED) <= set(values) and all(len(values[v]) >= 32 for v in REQUIRED)
    assert all(values[v] != _values(second)[v] for v in REQUIRED)  # fresh per file
    for path in (first, second):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [v for v in (*values.values(), *_values(second).values()) if v and v in output]
    from cryptography.fernet import Fernet

    Fernet(values["AIRFLOW_FERNET_KEY"].encode())  # a valid key
    assert re.fullmatch(r"[0-9a-f]+", values["GFOCAL_DB_PASSWORD"])  # URL-safe
    before = first.read_text()
    assert "kept" in _write_env(first) and first.read_text() == before  # never overwritten
    assert not list(tmp_path.glob("*.tmp"))


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """docker-compose.yaml and docker/ in a folder of their own: a developer's .env is never read."""
    shutil.copy(ROOT / "docker-compose.yaml", tmp_path)
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    return tmp_path


def _config(cli: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED and not k.startswith("COMPOSE_")}
    return subprocess.run([*cli, "config"], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def compose_cli() -> list[str]:
    cli = _compose_cli()
    if cli is None:
        if os.environ.get("GFOCAL_REQUIRE_COMPOSE") == "1":  # scripts/test.sh (CI) installs docker-compose
            pytest.fail("no `docker compose` / `docker-compose` CLI: scripts/setup.sh test installs it")
        pytest.skip("no `docker compose` / `docker-compose` CLI here (the static checks above still ran)")
    return cli


def test_compose_config_refuses_to_run_without_env(compose_cli: list[str], compose_dir: Path) -> None:
    done = _config(compose_cli, compose_dir)
    assert done.returncode != 0 and ".env.example" in done.stderr, done.stderr
    assert any(var in done.stderr for var in REQUIRED), done.stderr
    shutil.copy(ROOT / ".env.example", compose_dir / ".env")  # the placeholders, unchanged
    done = _config(compose_cli, compose_dir)
    assert done.returncode != 0 and ".env.example" in done.stderr, done.stderr


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_config_names_each_missing_secret(
    compose_cli: list[str], compose_dir: Path, missing: str
) -> None:
    _write_env(compose_dir / "full.env")
    kept = [
        line for line in (compose_dir / "full.env").read_text().splitlines() if not line.startswith(missing)
    ]
    (compose_dir / ".env").write_text("\n".join(kept) + "\n")
    done = _config(compose_cli, compose_dir)
    assert done.returncode != 0, done.stdout
    assert f"{missing} is not set" in done.stderr and ".env.example" in done.stderr, done.stderr


def test_compose_config_with_a_generated_env_uses_its_secrets(
    compose_cli: list[str], compose_dir: Path
) -> None:
    _write_env(compose_dir / ".env")
    done = _config(compose_cli, compose_dir)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    values = _values(compose_dir / ".env")
    password = values["GFOCAL_DB_PASSWORD"]
    assert config["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name, service in config["services"].items():
        if not name.startswith("airflow-"):
            continue
        env = service["environment"]
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW_JWT_SECRET"], name
        assert env["AIRFLOW__CORE__FERNET_KEY"] == values["AIRFLOW_FERNET_KEY"], name
        assert env["AIRFLOW__API__SECRET_KEY"] == values["AIRFLOW_API_SECRET_KEY"], name
        assert (
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
            == f"postgresql+psycopg://airflow:{password}@postgres/airflow"
        )
        assert f"airflow:{password}@postgres/airflow" in env["AIRFLOW__CELERY__RESULT_BACKEND"], name
        assert f"airflow:{password}@postgres/gfocal_history" in env["AIRFLOW__GFOCAL__HISTORY_URL"], name


def test_the_image_keeps_build_credentials_out_of_its_environment() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG PIP_EXTRA_INDEX_URL" in dockerfile  # an index URL may carry user:token@
    assert not re.search(r"^\s*ENV\b.*(PIP_EXTRA_INDEX_URL|PIP_INDEX_URL)", dockerfile, flags=re.MULTILINE)
