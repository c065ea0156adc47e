#!/usr/bin/env bash
# The main job on the embedded default: the gfocal_onnxruntime DAG with real Airflow on a
# project-local SQLite home, ONNX Runtime on CPU, generated demo data and RANDOM weights.
# Extra arguments are passed as DAG params, e.g.  scripts/demo.sh '{"max_images": 8}'
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh runtime
venv="${GFOCAL_VENV:-$root/.venv}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$root/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export GFOCAL_WORK_DIR="${GFOCAL_WORK_DIR:-$root/work}"
mkdir -p "$AIRFLOW_HOME" "$GFOCAL_WORK_DIR"

"$venv/bin/airflow" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || {
  cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
"$venv/bin/gfocal" demo-data --work-dir "$GFOCAL_WORK_DIR" >/dev/null
conf="${1:-}"; [[ -n "$conf" ]] || conf="{}"
log="$GFOCAL_WORK_DIR/last-demo.log"
echo "== running DAG gfocal_onnxruntime (log: $log)"
if ! "$venv/bin/airflow" dags test gfocal_onnxruntime --conf "$conf" >"$log" 2>&1; then
  tail -n 60 "$log"; echo "DAG run failed; full log: $log"; exit 1
fi
grep -qE "DagRun Finished: .*state=success" "$log" || { tail -n 60 "$log"; echo "DAG run did not succeed; see $log"; exit 1; }
echo
"$venv/bin/gfocal" summary --latest "$GFOCAL_WORK_DIR/gfocal_onnxruntime"
