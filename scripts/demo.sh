#!/usr/bin/env bash
# Usage: scripts/demo.sh [OUT_DIR]
#   The main job: preemptible training with checkpoints on the local disk (OUT_DIR, default
#   demo-out/). A GPT-style model (launch/train.py) trains under torchrun on 2 ranks (FSDP2,
#   gloo). Mid-run the whole process group gets SIGTERM, as SLURM or Kubernetes would send it:
#   every rank saves a preemption checkpoint, commits and exits. The job resumes on 1 rank (the
#   checkpoint reshards from 2 ranks to 1) and finishes. The resumed loss curve is printed beside
#   an uninterrupted 2-rank reference run and plotted to OUT_DIR/loss.png.
#   OUT_DIR is relative to the folder you run this from. It is emptied first: the script
#   deletes it only when it is empty or holds an earlier demo's output (a `.shardckpt-demo`
#   marker), and refuses otherwise.
#   Environment: STEPS=60 SAVE_EVERY=20 SEQ_LEN=64
set -euo pipefail
OUT=$(realpath -m -- "${1:-demo-out}")
cd "$(dirname "$0")/.."
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ ! -e "$OUT/.shardckpt-demo" ]; then
  echo "demo: $OUT exists and is not an earlier demo's output; give another OUT_DIR" >&2
  exit 2
fi
bash scripts/setup.sh
STEPS=${STEPS:-60}
SAVE_EVERY=${SAVE_EVERY:-20}
SEQ_LEN=${SEQ_LEN:-64}
PY=${VENV:-.venv}/bin/python
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip -q install matplotlib >/dev/null 2>&1 \
  || echo "demo: matplotlib unavailable; the plot will be skipped" >&2
echo "demo: output in $OUT (emptied first)"
rm -rf "$OUT" && mkdir -p "$OUT" && touch "$OUT/.shardckpt-demo"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
flags=(--max-steps "$STEPS" --save-every "$SAVE_EVERY" --seq-len "$SEQ_LEN" --keep-last 2)
torchrun() { "$PY" -m torch.distributed.run --standalone --nproc-per-node "$1" "${@:2}" \
               2> >(grep -v -e '^W1' -e '^\*\*\*' -e 'OMP_NUM_THREADS' >&2); }

echo "== 1. reference: $STEPS steps on 2 ranks, uninterrupted"
torchrun 2 launch/train.py --checkpoint-dir "$OUT/reference" "${flags[@]}" > "$OUT/reference.log"
tail -n 1 "$OUT/reference.log"

echo "== 2. the same job, preempted: SIGTERM to the torchrun process group after step $SAVE_EVERY"
setsid "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 launch/train.py \
  --checkpoint-dir "$OUT/run" "${flags[@]}" > "$OUT/run.log" 2> "$OUT/run.err" &
pid=$!
for _ in $(seq 1 1200); do
  [ -e "$OUT/run/step-$(printf %08d "$SAVE_EVERY")/manifest.json" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
sleep 1
kill -TERM -- -"$pid"
status=0; wait $pid || status=$?
grep -e '^\[' "$OUT/run.log" || true
grep -h -e 'received signal' "$OUT/run.err" | head -n 2 || true
echo "torchrun exited with status $status, as expected: its workers were preempted (each saved," \
     "committed and exited with 75, EXIT_PREEMPTED, so the launcher reports a failure and a" \
     "scheduler would requeue the job)"
echo "committed checkpoints: $(ls "$OUT/run" | tr '\n' ' ')"

echo "== 3. resume on 1 rank (the 2-rank checkpoint reshards) and finish"
torchrun 1 launch/train.py --checkpoint-dir "$OUT/run" "${flags[@]}" > "$OUT/resumed.log"
grep -e '^\[' "$OUT/resumed.log"

echo "== 4. resumed loss vs the uninterrupted reference"
"$PY" - "$OUT" <<'PY'
import re, sys
out = sys.argv[1]
def losses(name):
    text = open(f"{out}/{name}.log").read()
    return {int(s): float(l) for s, l in re.findall(r"^step=(\d+) loss=(\S+)$", text, re.M)}
ref, before, after = losses("reference"), losses("run"), losses("resumed")
first = min(after)
print(f"{'step':>5} {'reference':>12} {'this run':>12} {'rel diff':>9}")
for step in sorted(ref):
    mine = after.get(step, before.get(step))
    mark = "  <- first step after resuming on 1 rank" if step == first else ""
    if mine is not None and (step % 5 == 0 or step == first or step in (1, max(ref))):
        print(f"{step:5d} {ref[step]:12.6f} {mine:12.6f} {abs(mine - ref[step]) / ref[step]:9.1e}{mark}")
rel = abs(after[first] - ref[first]) / ref[first]
print(f"first resumed loss (step {first}) vs reference: relative difference {rel:.1e}")
same = all(before[s] == ref[s] for s in before)
print(f"losses before the preemption equal the reference bit for bit: {same}")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(ref), [ref[s] for s in sorted(ref)], label="uninterrupted (2 ranks)", lw=3,
            alpha=0.4)
    ax.plot(sorted(before), [before[s] for s in sorted(before)], ".-", label="preempted run (2 ranks)")
    ax.plot(sorted(after), [after[s] for s in sorted(after)], ".-", label="resumed (1 rank)")
    ax.axvline(first - 0.5, color="grey", ls=":", label="SIGTERM, checkpoint, resume")
    ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); fig.tight_layout()
    fig.savefig(f"{out}/loss.png", dpi=100)
    print(f"plot: {out}/loss.png")
except ImportError:
    print("plot skipped (no matplotlib)")
sys.exit(0 if rel < 1e-4 and same else 1)
PY
"$PY" -m shardckpt verify "$OUT/run/step-$(printf %08d "$STEPS")"
