"""Minimal reproduction (torch only, no shardckpt): an elastic c10d job cannot grow on torch 2.13.

Usage: python scripts/repro_grow_deadlock.py [--share-store | --no-share-store] [--timeout 90]

Agent 1 starts a ``--nnodes 1:2`` job alone (one worker, world size 1). Agent 2 then joins the
same rendezvous. Agent 1's monitor sees a node waiting and restarts its group for a 2-node
round. With torch's default shared TCP store (``--share-store``), that round never completes:

* agent 2 (first rendezvous of its own) waits in ``RendezvousStoreInfo.build`` for the round's
  ``MASTER_ADDR`` key, which only a rank-0 agent on *its own first* rendezvous publishes;
* agent 1 (rank 0, which built its bootstrap info in round 1 and reuses it) has already moved on
  to the rank assignment and waits for agent 2's ``role_info`` key.

Neither key ever comes; both wait until the store's read timeout (25 s here; the traceback
shows where each waited), then the agents restart and wait again. With
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (``--no-share-store``) every round publishes a fresh
address and port, and the 2-node round starts. Separate hosts do not help (the keys are the
same): tests/launch/test_elastic.py grows across network-namespace hosts only with the store
sharing off. Exit status: 0 when the grown world-2 group ran, 1 when it hung (reproduced).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

WORKER = '''
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
world = dist.get_world_size()
print(f"worker rank {dist.get_rank()} of world {world}", flush=True)
if world == 2:
    dist.barrier()
    sys.exit(0)
time.sleep(600)  # world 1: wait until the agent restarts the group for the joining node
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(worker: str, port: int, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node",
         "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
         "grow", "--rdzv-conf", "last_call_timeout=1,join_timeout=60,read_timeout=25",
         "--monitor-interval", "1", worker], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--share-store", dest="share", action="store_true", default=True)
    p.add_argument("--no-share-store", dest="share", action="store_false")
    p.add_argument("--timeout", type=float, default=90)
    args = p.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if args.share else "1"}
    with tempfile.TemporaryDirectory() as tmp:
        worker = os.path.join(tmp, "worker.py")
        with open(worker, "w") as f:
            f.write(WORKER)
        port = free_port()
        logs = [open(os.path.join(tmp, f"agent{i}.log"), "w+") for i in (1, 2)]
        first = agent(worker, port, env, logs[0])
        procs = [first]
        try:
            deadline = time.monotonic() + args.timeout
            while "of world 1" not in open(logs[0].name).read():
                if time.monotonic() > deadline or first.poll() is not None:
                    print(open(logs[0].name).read()[-3000:])
                    return 2
                time.sleep(0.2)
            print("agent 1 runs alone (world 1); agent 2 joins", flush=True)
            procs.append(agent(worker, port, env, logs[1]))
            while time.monotonic() < deadline and any(q.poll() is None for q in procs):
                time.sleep(0.5)
            grown = all(q.poll() == 0 for q in procs)
        finally:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, 9)
                    q.wait()
        for i, log in enumerate(logs, 1):
            text = open(log.name).read()
            waits = [line.strip() for line in text.splitlines()
                     if "of world" in line or "Error" in line or "in build" in line
                     or "_assign_worker_ranks" in line or "role_info" in line]
            print(f"--- agent {i}: " + "\n    ".join(waits[-6:]))
    store = "shared TCP store" if args.share else "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    if grown:
        print(f"grown to world 2 with the {store}")
        return 0
    print(f"did not grow within {args.timeout:g} s with the {store}: the deadlock")
    return 1


if __name__ == "__main__":
    sys.exit(main())
