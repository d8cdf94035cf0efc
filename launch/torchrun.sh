#!/usr/bin/env bash
# Usage: launch/torchrun.sh --checkpoint-dir DIR [train.py flags...]
#   Runs launch/train.py under torchrun on this node; run it on every node of the job. Every
#   (re)start of the worker group resumes from the newest committed checkpoint, at whatever world
#   size the rendezvous produced (the checkpoint reshards). Environment (defaults in brackets):
#     NPROC [2]            processes on this node (one per GPU when there are GPUs)
#     NNODES [1]           nodes in the job: N (fixed) or MIN:MAX (elastic: the job starts once
#                          MIN nodes joined, keeps going while at least MIN remain, and grows up
#                          to MAX when nodes join later; each change restarts the worker group)
#     NODE_RANK [0]        this node's index (ignored with a c10d rendezvous)
#     MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  rendezvous host and port (the node whose
#                          address this is hosts the rendezvous store: it must outlive the job)
#     RDZV_ID [shardckpt]  rendezvous id shared by the job's nodes
#     RDZV_BACKEND [c10d]  torchrun's --rdzv-backend (c10d: the store on MASTER_ADDR's node;
#                          only c10d is tested here)
#     MAX_RESTARTS [3 when elastic, else 0]  worker-group restarts after a failure, before the
#                          agent gives up (membership changes restart the group without
#                          counting)
#     RDZV_JOIN_TIMEOUT [600]    seconds a rendezvous may take to reach MIN nodes, else the
#                                agent exits with an error (a lost host that never comes back)
#     RDZV_LAST_CALL_TIMEOUT [30] once MIN nodes joined, seconds to wait for more (up to MAX)
#     RDZV_CLOSE_TIMEOUT [30]    seconds to close the rendezvous at the end
#     RDZV_READ_TIMEOUT [60]     seconds to reach the rendezvous store (an unreachable
#                                rendezvous host ends the agent with an error after this)
#     RDZV_KEEP_ALIVE [5]        seconds between agents' heartbeats; a node missing 3 is dead
#     MONITOR_INTERVAL [5]       seconds between the agent's checks of its workers
#     GRACE [60]           seconds between SIGTERM and SIGKILL that torchrun's agent allows its
#                          workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); the checkpoint's grace
#                          (SHARDCKPT_GRACE_SECONDS) is set 5 s shorter, so the save finishes or
#                          the worker exits by itself before the agent kills it
#     PG_TIMEOUT [300]     seconds a worker's collective waits for a lost peer before it fails
#                          and the agent restarts the group (SHARDCKPT_PG_TIMEOUT)
#     PYTHON [.venv/bin/python if present, else python3]
#     TRAIN [launch/train.py]    the training script torchrun runs
#   Exit status: 0 training finished; 75 this node was preempted (SIGTERM or SIGINT reached
#   this script or torchrun): the workers were told to save, so restart the same command to
#   resume; otherwise torchrun's status (1 when the workers failed past MAX_RESTARTS or the
#   rendezvous timed out).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-shardckpt}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
case "$NNODES" in *:*) elastic=1 ;; *) elastic=0 ;; esac
MAX_RESTARTS=${MAX_RESTARTS:-$([ "$elastic" = 1 ] && echo 3 || echo 0)}
GRACE=${GRACE:-60}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$GRACE}
export SHARDCKPT_GRACE_SECONDS=${SHARDCKPT_GRACE_SECONDS:-$((GRACE > 10 ? GRACE - 5 : GRACE))}
export SHARDCKPT_PG_TIMEOUT=${SHARDCKPT_PG_TIMEOUT:-${PG_TIMEOUT:-300}}
conf="join_timeout=${RDZV_JOIN_TIMEOUT:-600},last_call_timeout=${RDZV_LAST_CALL_TIMEOUT:-30}"
conf+=",close_timeout=${RDZV_CLOSE_TIMEOUT:-30},read_timeout=${RDZV_READ_TIMEOUT:-60}"
conf+=",keep_alive_interval=${RDZV_KEEP_ALIVE:-5}"
# torch 2.13's agents share one TCP store between the rendezvous and the workers. That store
# outlives a worker group, so a restarted group reads the previous group's addresses (gloo:
# "Connection refused"), and an agent joining an existing job waits forever for a MASTER_ADDR key
# the job's rank-0 agent publishes only on its own first rendezvous (the grow deadlock:
# docs/elastic-deadlock.md, scripts/repro_grow_deadlock.py). A store per worker group, hosted by
# its rank 0, avoids both.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv-id "$RDZV_ID" --rdzv-conf "$conf")
fi
# torchrun runs in the background so that a preemption signal sent to this script reaches it
# (forwarded) and this script can tell the requeue logic it was a preemption: torchrun itself
# exits 1 whether its workers committed (75) or failed.
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
  --monitor-interval "${MONITOR_INTERVAL:-5}" "${rdzv[@]}" "${TRAIN:-launch/train.py}" "$@" &
agent=$!
preempted=0
forward() { preempted=1; kill -"$1" "$agent" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
while :; do
  wait "$agent" && status=0 || status=$?
  kill -0 "$agent" 2>/dev/null || break  # wait returns early when a trapped signal arrives
done
if [ "$status" != 0 ] && [ "$preempted" = 1 ]; then
  echo "torchrun.sh: preempted (torchrun exited $status after the signal); restart to resume" >&2
  exit 75
fi
exit "$status"
