#!/usr/bin/env bash
# Usage: scripts/screenshot_trackers.sh
#   Takes the MLflow UI screenshots of docs/trackers.md (docs/img/mlflow-checkpoints.png and
#   docs/img/mlflow-checkpoint-page.png): an `mlflow server` on loopback (sqlite store in a
#   temporary folder), a short training whose CheckpointManager registers its checkpoints with
#   MLflowCheckpoints, then headless Chromium on the UI. Installs Debian's chromium with apt-get
#   when it is missing. Not needed by CI or the tests. Environment:
#     VENV=.venv  OUT=docs/img  WIDTH=1500
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-docs/img}
WIDTH=${WIDTH:-1500}
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q chromium >/dev/null
fi
mkdir -p "$OUT"
PYTHONPATH=. "$VENV/bin/python" scripts/screenshot_trackers.py --out "$OUT" --width "$WIDTH"
