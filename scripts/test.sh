#!/usr/bin/env bash
# Usage: scripts/test.sh [pytest args...]
#   Sets up the machine (scripts/setup.sh) and runs the test suite. Slow soak tests are marked
#   `slow` and sampled; SHARDCKPT_SLOW=1 runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
