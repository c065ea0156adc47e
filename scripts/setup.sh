#!/usr/bin/env bash
# Idempotent environment setup for gfocal-airflow.
#   scripts/setup.sh runtime   venv + the product (Airflow, torch CPU, ONNX Runtime, COCO tools)
#   scripts/setup.sh test      runtime + dev tools + the `celery` and `integration` extras + the mmdet/mmcv
#                              reference + Chromium for UI tests
# A stamp inside .venv records what was installed; an unchanged tree re-runs in about a second.
set -euo pipefail
profile="${1:-runtime}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GFOCAL_VENV:-$root/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3

# One stamp line per installed profile; `test` includes everything `runtime` needs.
hash="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"
stamp="$venv/.gfocal-stamp"
if [[ -f "$stamp" ]] && { grep -qx -- "$hash-$profile" "$stamp" || grep -qx -- "$hash-test" "$stamp"; }; then
  exit 0
fi

echo "== gfocal setup ($profile) into $venv (pip log: $venv/setup.log)"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
log="$venv/setup.log"
: > "$log"
pipq() {  # pip, quiet on success, its log shown on failure
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; then
    tail -n 40 "$log"; echo "pip $* failed; full log: $log" >&2; exit 1
  fi
}
pipq install --upgrade "pip>=24" "setuptools>=77,<81" wheel
# torch first, pinned, so no other package pulls a different build. On a host whose index serves the
# CUDA build for torch==2.13.0, set GFOCAL_TORCH_INDEX_URL to a CPU wheel index.
if [[ -n "${GFOCAL_TORCH_INDEX_URL:-}" ]]; then
  pipq install "torch==2.13.0" --index-url "$GFOCAL_TORCH_INDEX_URL"
else
  pipq install "torch==2.13.0"
fi
extras="dev"
# test: also what the multi-process integration test runs (Celery workers, the REST API client)
if [[ "$profile" == "test" ]]; then extras="dev,celery,integration"; fi
pipq install -e "$root[$extras]"

if [[ "$profile" == "test" ]]; then
  # mmcv 2.1.0 has no wheel for torch 2.13: built from source with its ops (~9 min on 2 cores, then
  # cached by pip). It needs torch at build time, hence no build isolation.
  MAX_JOBS="${MAX_JOBS:-2}" pipq install --no-build-isolation -e "$root[reference]"
  # mmcv/mmengine pull the GUI opencv; keep the headless one the product pins (same cv2 module)
  "$venv/bin/python" -m pip uninstall -q -y opencv-python >/dev/null 2>&1 || true
  pipq install --force-reinstall --no-deps "opencv-python-headless>=4.9,<5"
  has_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! has_compose; then
    # chromium: headless UI tests; docker-compose: `compose config` checks of docker-compose.yaml
    echo "== installing Debian chromium + chromium-driver + docker-compose (UI and deployment tests)"
    export DEBIAN_FRONTEND=noninteractive
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    packages=(chromium chromium-driver)
    has_compose || packages+=(docker-compose)
    "${sudo_cmd[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null
  fi
fi
{ [[ -f "$stamp" ]] && grep -x -- "$hash-.*" "$stamp"; echo "$hash-$profile"; } | sort -u > "$stamp.new" || true
mv "$stamp.new" "$stamp"
echo "== gfocal setup ($profile) done"
