"""Real tracker back ends for the tracker tests: an ``mlflow server`` on loopback (sqlite store,
local artifact root), a TCP relay in front of it that a test switches off and on (the
tracker is down, then back), and the records of an offline W&B run."""

from __future__ import annotations

import glob
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: str) -> None:
    """Wait until ``url``/health answers; raise with the server's log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    with open(log) as f:
        raise RuntimeError(f"mlflow server did not start in {timeout} s:\n{f.read()[-3000:]}")


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend store and a local artifact root."""

    def __init__(self, folder: str):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(folder, "server.log")
        self.artifacts = os.path.join(folder, "artifacts")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                 "--artifacts-destination", self.artifacts],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_healthy(self.url, self.proc, timeout, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server's own process group (uvicorn workers)
            try:  # nothing of its state is needed after the tests: a short grace
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


class Relay:
    """A TCP relay on loopback to ``port``; ``down()`` makes it drop every connection."""

    def __init__(self, port: int):
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        self.up.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self._closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()  # the tracker is "down": the connection dies at once
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        pair = {client: upstream, upstream: client}
        try:
            while self.up.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


def wandb_offline_records(folder, name, timeout=20.0):
    """Artifact and summary records of the offline run under ``folder`` (the file is written by
    W&B's own service process: wait until it holds the run's exit record)."""
    from shardckpt.integrations.wandb import run_records
    deadline = time.monotonic() + timeout
    while True:
        records = [r for f in glob.glob(f"{folder}/wandb/offline-run-*/run-*.wandb")
                   for r in run_records(f)]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
            and r.artifact.name == name]
    removed = [json.loads(u.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for u in r.summary.update
               if u.key == "shardckpt/removed_steps"]
    return arts, removed
