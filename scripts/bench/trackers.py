"""What an experiment tracker adds to each save: MLflowCheckpoints and WandbCheckpoints.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/bench/trackers.py [--saves 20] [--mib 16] [--reps 2]

Saves a state of ``--mib`` MiB ``--saves`` times through ``CheckpointManager.save`` (synchronous,
so the time in the call is the whole save), with no tracker, with ``MLflowCheckpoints`` against
a real ``mlflow server`` on loopback (sqlite store) and with ``WandbCheckpoints`` in an offline
run, in round-robin order. Prints per save: the median time in ``save`` (what the training
loop waits for), the difference to no tracker, the longest time one ``on_event`` call took on
the training thread, and how long the background registration still ran after the last save
(until ``flush`` returns, divided by the saves). Target (issue 30): the added
time per save is noise next to the save (the callback only queues an event).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import harness as bh

sys.path.insert(0, bh.REPO)


def one_run(kind: str, saves: int, mib: int, server_url: str | None, work: str) -> dict:
    """Seconds in each ``save`` call, and the registration time per save after the last."""
    import torch

    import shardckpt
    state = {"model": {"w": torch.randn(mib * (1 << 18))}}
    tracker = None
    if kind == "mlflow":
        import mlflow
        from shardckpt.integrations.mlflow import MLflowCheckpoints
        client = mlflow.MlflowClient(server_url)
        exp = client.get_experiment_by_name("bench") or None
        exp_id = exp.experiment_id if exp else client.create_experiment("bench")
        tracker = MLflowCheckpoints(client.create_run(exp_id).info.run_id, server_url)
    elif kind == "wandb":
        import wandb
        from shardckpt.integrations.wandb import WandbCheckpoints
        run = wandb.init(project="bench", dir=work, mode="offline")
        tracker = WandbCheckpoints(run)
    times, in_callback = [], []

    def on_event(event):  # the time the training thread spends handing the event over
        t0 = time.perf_counter()
        tracker(event)
        in_callback.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(dir=work) as root:
        with shardckpt.CheckpointManager(root, keep_last=2, keep_best=1, monitor="loss",
                                         async_save=False,
                                         on_event=on_event if tracker else None) as mgr:
            for step in range(1, saves + 1):
                t0 = time.perf_counter()
                mgr.save(step, state, metrics={"loss": 1.0 / step})
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            if tracker is not None:
                tracker.flush(120)
            drain = time.perf_counter() - t0
    if tracker is not None:
        tracker.close()
    if kind == "wandb":
        run.finish()
    return {"save_s": statistics.median(times), "drain_s": drain,
            "callback_max_s": max(in_callback, default=0.0),
            "callback_med_s": statistics.median(in_callback) if in_callback else 0.0,
            "failures": getattr(tracker, "failures", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saves", type=int, default=20)
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    from tests.integrations.tracker_servers import MlflowServer
    with tempfile.TemporaryDirectory(dir=bh.REPO, prefix=".bench-trackers-") as work:
        bh.log("starting mlflow server")
        server = MlflowServer(work).start()
        try:
            runs = {k: [] for k in ("none", "mlflow", "wandb")}
            for rep in range(args.reps):
                for kind in bh.rotated(list(runs), rep):
                    bh.log(f"rep {rep}: {kind}")
                    runs[kind].append(one_run(kind, args.saves, args.mib, server.url, work))
        finally:
            server.stop()
    print(bh.header("trackers", f"{args.saves} saves of {args.mib} MiB, sync, keep_last=2"))
    base = bh.med(runs["none"], "save_s")
    rows = []
    for kind, recs in runs.items():
        save = bh.med(recs, "save_s")
        rows.append([kind, f"{save * 1e3:.1f}", f"{(save - base) * 1e3:+.2f}",
                     f"{bh.med(recs, 'callback_med_s') * 1e6:.0f} / "
                     f"{bh.med(recs, 'callback_max_s') * 1e6:.0f}",
                     f"{bh.med(recs, 'drain_s') / args.saves * 1e3:.2f}",
                     str(sum(r["failures"] for r in recs))])
    print(bh.table(["tracker", "save ms (median)", "added ms", "on_event us (median / max)",
                    "registration ms/save after",
                    "failed tries"], rows))


if __name__ == "__main__":
    main()
