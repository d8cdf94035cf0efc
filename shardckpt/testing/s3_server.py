"""An S3 API server on loopback for tests and benchmarks: moto's server mode.

``moto_s3()`` starts one on a free port (in a thread of this process, or with
``process=True`` as a child process, so the server does not share this interpreter's GIL), creates
a bucket and yields the ``storage_options`` that reach it through s3fs. The region is left unset:
with one, moto's bucket creation fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request

from .ranks import free_port


def storage_options(endpoint: str) -> dict:
    """s3fs options for the test server (moto accepts any credentials)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint},
            "skip_instance_cache": True}


def _wait(endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto server at {endpoint} did not start") from None
            time.sleep(0.1)


@contextlib.contextmanager
def moto_s3(bucket: str = "shardckpt-test", process: bool = False):
    """Yields ``(storage_options, "s3://<bucket>")`` of a fresh moto S3 server on loopback."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if process:
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        stop = lambda: (proc.terminate(), proc.wait(10))  # noqa: E731
    else:
        import logging
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        stop = server.stop
    try:
        _wait(endpoint)
        import s3fs
        opts = storage_options(endpoint)
        s3fs.S3FileSystem(**opts).mkdir(bucket)
        yield opts, f"s3://{bucket}"
    finally:
        stop()
