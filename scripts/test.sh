#!/usr/bin/env bash
# The project's test command: sets up everything it needs, then lint + the whole pytest suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh test
venv="${GFOCAL_VENV:-$root/.venv}"

# Postgres backs the history tests; these machines run it, start it if it is installed but down
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
export GFOCAL_REQUIRE_POSTGRES="${GFOCAL_REQUIRE_POSTGRES:-1}"
export GFOCAL_REQUIRE_COMPOSE="${GFOCAL_REQUIRE_COMPOSE:-1}"  # the compose config tests must run
# Redis is the Celery broker of tests/integration; start it the way these machines do if it is down
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && command -v redis-server >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi

"$venv/bin/ruff" format --check .
"$venv/bin/ruff" check .
"$venv/bin/ruff" check --select C901 .  # complexity <= 12 ([tool.ruff.lint.mccabe])
"$venv/bin/lint-imports"  # import contracts ([tool.importlinter] in pyproject.toml)
exec "$venv/bin/pytest" -q "$@"
