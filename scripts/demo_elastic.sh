#!/usr/bin/env bash
# Usage: sudo scripts/demo_elastic.sh [OUT_DIR]
#   Elastic training across two hosts made of network namespaces on this machine (needs root
#   and iproute2, installed with apt-get when missing): a host lost (a), the host back and the
#   job grown (b), every host preempted and one restarting the job (c), a host dead in the
#   middle of a save (d). Every resumed loss is compared with an uninterrupted run's.
#   Logs of every agent go to OUT_DIR (default demo-elastic-out/). Environment: STEPS=40,
#   HOW=kill|cut (how host1 is lost in job 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/need_packages.sh ip:iproute2 nsenter:util-linux
OUT=${1:-demo-elastic-out}
rm -rf "$OUT" && mkdir -p "$OUT"
exec "${VENV:-.venv}/bin/python" scripts/demo_elastic.py "$OUT"
