#!/usr/bin/env bash
# Usage: scripts/demo.sh [OUT_DIR]
#   The main job: a preemptible training run checkpointing to the local disk (OUT_DIR, default
#   demo-out/). It trains, is preempted by SIGTERM (saves and exits), resumes, is killed with
#   SIGKILL mid-run (no warning), resumes from the last periodic checkpoint, and finishes. Then it
#   runs the same training uninterrupted and checks that both end bit-identical.
#   Environment: STEPS=240 SAVE_EVERY=40
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-demo-out}
STEPS=${STEPS:-240}
SAVE_EVERY=${SAVE_EVERY:-40}
PY=${VENV:-.venv}/bin/python
rm -rf "$OUT" && mkdir -p "$OUT"
train() { "$PY" launch/train.py --steps "$STEPS" --save-every "$SAVE_EVERY" "$@"; }
train_bg() {  # sets $pid to the training process itself, so signals reach Python directly
  "$PY" launch/train.py --steps "$STEPS" --save-every "$SAVE_EVERY" --step-sleep 0.02 "$@" &
  pid=$!
}

wait_for() {  # wait_for FILE PID: until FILE exists (or the run ends by itself)
  for _ in $(seq 1 1200); do
    [ -e "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 0
    sleep 0.05
  done
}

step_dir() { printf '%s/run/step-%08d' "$OUT" "$1"; }

echo "== 1. train, then preempt with SIGTERM after step $SAVE_EVERY's checkpoint"
train_bg --checkpoint-dir "$OUT/run"
wait_for "$(step_dir "$SAVE_EVERY")/manifest.json" $pid
kill -TERM $pid; wait $pid

echo "== 2. resume; crash it with SIGKILL after step $((3 * SAVE_EVERY))'s checkpoint"
train_bg --checkpoint-dir "$OUT/run"
wait_for "$(step_dir $((3 * SAVE_EVERY)))/manifest.json" $pid
sleep 0.3; kill -KILL $pid; wait $pid || echo "(killed: exit $?)"

echo "== 3. resume and finish"
train --checkpoint-dir "$OUT/run"

echo "== 4. the same training without interruptions"
train --checkpoint-dir "$OUT/reference" > "$OUT/reference.log"
tail -n 1 "$OUT/reference.log"

echo "== 5. compare the final checkpoints"
"$PY" - "$(step_dir "$STEPS")" "$OUT/reference/$(basename "$(step_dir "$STEPS")")" <<'PY'
import sys, torch, shardckpt
a, b = (shardckpt.load_full(p) for p in sys.argv[1:3])
def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items(): yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x): yield from leaves(v, f"{path}/{i}")
    else: yield path, x
la, lb = dict(leaves(a)), dict(leaves(b))
same = la.keys() == lb.keys() and all(
    torch.equal(v, lb[k]) if isinstance(v, torch.Tensor) else v == lb[k] for k, v in la.items())
print(f"interrupted run vs uninterrupted run: {len(la)} values, bit-identical: {same}")
sys.exit(0 if same else 1)
PY
"$PY" -m shardckpt.cli verify "$(step_dir "$STEPS")"
