#!/usr/bin/env bash
# Airflow's UI on the embedded default, to trigger the gfocal DAGs from their forms:
# `airflow standalone` (SQLite, LocalExecutor, simple auth manager) with this checkout's DAGs and plugin.
#   scripts/ui.sh                        # http://127.0.0.1:8080, user admin, password printed
#   GFOCAL_UI_PORT=8090 scripts/ui.sh    # another port
# State lives in $AIRFLOW_HOME (default .airflow/) and runs in $GFOCAL_WORK_DIR (default work/).
# Ctrl-C (or SIGTERM) stops every process it started, tasks included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" runtime
venv="${GFOCAL_VENV:-$root/.venv}"
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
