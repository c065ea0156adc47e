#!/usr/bin/env bash
# Airflow's UI on the embedded default, to trigger the gfocal DAGs from their forms:
# `airflow standalone` (SQLite, LocalExecutor, simple auth manager) with this checkout's DAGs and plugin.
#   scripts/ui.sh                        # http://127.0.0.1:8080, user admin, password printed
#   GFOCAL_UI_PORT=8090 scripts/ui.sh    # another port
#   scripts/ui.sh --write-env [FILE]     # only write FILE (default .env) for docker compose: fresh secrets
# State lives in $AIRFLOW_HOME (default .airflow/) and runs in $GFOCAL_WORK_DIR (default work/).
# Its JWT secret, Fernet key and API secret key are generated once into $AIRFLOW_HOME/gfocal-secrets.env
# (mode 0600, reused on every start; a Fernet key already in $AIRFLOW_HOME/airflow.cfg is kept, so
# stored connections stay readable); a value already exported in the environment wins. Secrets are
# never printed. Ctrl-C (or SIGTERM) stops every process it started, tasks included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GFOCAL_VENV:-$root/.venv}"

# write_secrets MODE FILE: create FILE (mode 0600, temp file then link: never half-written, never
# overwritten) with fresh secrets; MODE `compose` fills the empty secrets of .env.example, MODE
# `standalone` writes the AIRFLOW__* settings of `airflow standalone`.
write_secrets() {
  local python="$venv/bin/python"
  [[ -x "$python" ]] || python="${PYTHON:-python3}"
  "$python" - "$1" "$2" "$root/.env.example" "${AIRFLOW_CONFIG:-${AIRFLOW_HOME:-}/airflow.cfg}" <<'PY'
import base64, configparser, contextlib, os, secrets, sys

mode, target, template, airflow_cfg = sys.argv[1:5]


def hex32() -> str:
    return secrets.token_hex(32)


def fernet() -> str:  # what cryptography's Fernet.generate_key() returns
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


if mode == "compose":
    fresh = {
        "AIRFLOW_JWT_SECRET": hex32,
        "AIRFLOW_FERNET_KEY": fernet,
        "AIRFLOW_API_SECRET_KEY": hex32,
        "GFOCAL_DB_PASSWORD": lambda: secrets.token_hex(24),
    }
    lines = []
    with open(template) as src:
        for line in src.read().splitlines():
            name, sep, value = line.partition("=")
            if sep and name in fresh and not value.strip():
                line = f"{name}={fresh.pop(name)()}"
            lines.append(line)
    if fresh:
        sys.exit(f"{template} has no empty line for {', '.join(sorted(fresh))}; restore it from git")
    text = "\n".join(lines) + "\n"
else:
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cfg.read(airflow_cfg)
    except configparser.Error:
        pass
    key = cfg.get("core", "fernet_key", fallback="").strip() or fernet()
    text = (
        "# airflow standalone's secrets (scripts/ui.sh); delete this file to rotate them\n"
        f"AIRFLOW__API_AUTH__JWT_SECRET={hex32()}\nAIRFLOW__CORE__FERNET_KEY={key}\n"
        f"AIRFLOW__API__SECRET_KEY={hex32()}\n"
    )
tmp = f"{target}.{os.getpid()}.tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
try:
    with os.fdopen(fd, "w") as out:
        out.write(text)
    try:
        os.link(tmp, target)  # atomic, and never replaces a file written meanwhile
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not os.path.exists(target):
            os.replace(tmp, target)
finally:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
PY
}

if [[ "${1:-}" == "--write-env" ]]; then
  target="${2:-$root/.env}"
  if [[ -e "$target" ]]; then
    echo "== $target exists: kept (delete it to generate new secrets)"
    [[ "$(stat -c %a "$target")" == *00 ]] || echo "warning: $target is readable by others: chmod 600 $target" >&2
  else
    write_secrets compose "$target"
    echo "== wrote $target (mode 0600) with fresh secrets; now: docker compose up -d"
  fi
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: scripts/ui.sh [--write-env [FILE]]" >&2
  exit 2
fi

"$root/scripts/setup.sh" runtime
port="${GFOCAL_UI_PORT:-8080}"

export AIRFLOW_HOME="${AIRFLOW_HOME:-$root/.airflow}"
export GFOCAL_WORK_DIR="${GFOCAL_WORK_DIR:-$root/work}"
export AIRFLOW__CORE__DAGS_FOLDER="$root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__PORT="$port"
export AIRFLOW__API__HOST="${GFOCAL_UI_HOST:-127.0.0.1}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$port"
export PATH="$venv/bin:$PATH"
mkdir -p "$AIRFLOW_HOME" "$GFOCAL_WORK_DIR"
log="$AIRFLOW_HOME/standalone.log"

secrets_file="$AIRFLOW_HOME/gfocal-secrets.env"
[[ -f "$secrets_file" ]] || write_secrets standalone "$secrets_file"
chmod 600 "$secrets_file"
while IFS= read -r line; do  # split at the first `=` only: a Fernet key ends with `=`
  key="${line%%=*}"
  case "$key" in
    AIRFLOW__API_AUTH__JWT_SECRET | AIRFLOW__CORE__FERNET_KEY | AIRFLOW__API__SECRET_KEY)
      [[ -n "${!key:-}" ]] || export "$key=${line#*=}" ;;
  esac
done <"$secrets_file"
passwords="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"

descendants() {  # every live descendant PID of $1, deepest first
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$child"
    echo "$child"
  done
}

airflow_pid=""
stop() {
  local rc=$?
  trap - INT TERM EXIT
  [[ -n "$airflow_pid" ]] || exit "$rc"
  echo; echo "== stopping Airflow (pid $airflow_pid and its children)"
  local pids
  pids="$(descendants "$airflow_pid") $airflow_pid"
  kill -TERM -- "-$airflow_pid" 2>/dev/null || true  # its process group (it leads its own session)
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 30); do
    # shellcheck disable=SC2086
    kill -0 $pids 2>/dev/null || break
    sleep 1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  wait "$airflow_pid" 2>/dev/null || true
  echo "== stopped"
  exit "$rc"
}
trap stop INT TERM EXIT

echo "== starting airflow standalone (log: $log)"
setsid "$venv/bin/airflow" standalone >"$log" 2>&1 &
airflow_pid=$!

for _ in $(seq 300); do
  if ! kill -0 "$airflow_pid" 2>/dev/null; then
    tail -n 40 "$log"; echo "airflow standalone exited; full log: $log" >&2
    airflow_pid=""; exit 1
  fi
  if [[ -f "$passwords" ]] && "$venv/bin/python" - "$port" <<'PY' 2>/dev/null; then
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v2/monitor/health", timeout=5) as r:
    sys.exit(json.load(r)["metadatabase"]["status"] != "healthy")
PY
    password="$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["admin"])' "$passwords")"
    echo "== Airflow UI: http://127.0.0.1:$port   user: admin   password: $password"
    echo "== DAGs: gfocal_onnxruntime (embedded, CPU) and gfocal_ascend_nightly; Ctrl-C stops everything"
    status=0
    wait "$airflow_pid" || status=$?
    airflow_pid=""
    exit "$status"
  fi
  sleep 1
done
echo "Airflow did not become healthy in 300 s; see $log" >&2
exit 1
