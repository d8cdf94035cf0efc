#!/usr/bin/env bash
# Usage: launch/torchrun.sh --checkpoint-dir DIR [train.py flags...]
#   Runs launch/train.py under torchrun on this node. Environment (defaults in brackets):
#     NPROC [2]            processes on this node (one per GPU when there are GPUs)
#     NNODES [1]           nodes in the job
#     NODE_RANK [0]        this node's index (ignored with a c10d rendezvous)
#     MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  rendezvous host and port
#     RDZV_ID [shardckpt]  rendezvous id shared by the job's nodes
#     GRACE [60]           seconds between SIGTERM and SIGKILL that torchrun's agent allows its
#                          workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); the checkpoint's grace
#                          (SHARDCKPT_GRACE_SECONDS) is set 5 s shorter, so the save finishes or
#                          the worker exits by itself before the agent kills it
#     PYTHON [.venv/bin/python if present, else python3]
#   Exit status: 0 training finished; non-zero otherwise. After a preemption the workers exit 75
#   (checkpoint committed) or 76 (grace expired, previous checkpoint intact) and torchrun exits
#   non-zero: restart the same command to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-shardckpt}
GRACE=${GRACE:-60}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$GRACE}
export SHARDCKPT_GRACE_SECONDS=${SHARDCKPT_GRACE_SECONDS:-$((GRACE > 10 ? GRACE - 5 : GRACE))}
if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
fi
# exec: a signal sent to this script's process reaches torchrun's agent itself.
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC" "${rdzv[@]}" launch/train.py "$@"
