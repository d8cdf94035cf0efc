#!/usr/bin/env bash
# Usage: sudo scripts/slurm_local.sh [--test | COMMAND...]
#   A real SLURM cluster on this machine, from Debian's slurm-wlm and munge (installed with
#   apt-get when missing): slurmctld and one slurmd per node. Debian's slurmd cannot run twice
#   on one host, so each node is a network-namespace host (shardckpt.testing.hosts) with its own
#   hostname and address. Everything (configuration, state, logs) lives in $SLURM_DIR (default
#   a new temporary folder, removed afterwards); every daemon stops when this script ends.
#     --test     run the requeue check: tests/launch/test_slurm.py (sbatch launch/slurm.sbatch,
#                preempt it, see it requeue, resume and finish bit for bit)
#     COMMAND    run it on the controller's node with SLURM_CONF set, e.g.
#                scripts/slurm_local.sh sinfo     scripts/slurm_local.sh sbatch --wrap 'srun hostname'
#     (nothing)  keep the cluster up until Ctrl-C
#   Environment: NODES=2, SLURM_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
bash scripts/need_packages.sh slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-client \
  munged:munge ip:iproute2 nsenter:util-linux
PY=${VENV:-.venv}/bin/python
if [ "${1:-}" = --test ]; then
  SHARDCKPT_SLOW=1 exec "$PY" -m pytest -q tests/launch/test_slurm.py
fi
if [ -z "${SLURM_DIR:-}" ]; then
  SLURM_DIR=$(mktemp -d -t shardckpt-slurm-XXXXXX)
  trap 'rm -rf "$SLURM_DIR"' EXIT
fi
"$PY" -m shardckpt.testing.slurm "${NODES:-2}" "$SLURM_DIR" "$@"
