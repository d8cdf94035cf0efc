#!/usr/bin/env bash
# Usage: scripts/gpu_check.sh
#   The CUDA checks, for the rare session with a GPU machine, in one command under 5 minutes:
#   tests/gpu and scripts/bench/gpu.py (device-to-host staging throughput vs a bare pinned
#   copy_, the stall of async_save for a multi-GiB state, and with --guarded how much of a
#   guarded save's device-to-host copy hides behind the next forward/backward). Uses the python3 on PATH and its
#   CUDA torch. Offline machines: put wheels of scikit-build-core, nanobind, zstandard, crc32c in
#   wheels/ (pip download ... -d wheels) to build the native core; without them it runs on the
#   reference codec. Environment: PYTHON=python3 SIZE_GIB=2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_check: no CUDA device here'"
if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --find-links wheels scikit-build-core nanobind zstandard crc32c || true
fi
"$PY" -m pip install -q --no-build-isolation --no-deps -e . \
  || echo "gpu_check: native build failed here; the checks run on the reference codec"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu
"$PY" scripts/bench/gpu.py --size-gib "${SIZE_GIB:-2}"
"$PY" scripts/bench/gpu.py --guarded --size-gib "${SIZE_GIB:-2}"
