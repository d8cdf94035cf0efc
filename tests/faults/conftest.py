"""Fixtures shared by the fault and hostile-input tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import shardckpt
from shardckpt.testing.hostile import AuditLog


def small_state(seed: int = 0) -> dict:
    """A few tensors of different dtypes (some compress, some do not) and plain leaves."""
    gen = torch.Generator().manual_seed(seed)
    return {"model": {"w": (torch.randn(40, 16, generator=gen) * 0.02).to(torch.bfloat16),
                      "b": torch.randn(64, generator=gen),
                      "ids": torch.arange(96, dtype=torch.int32)},
            "step": 7 + seed, "name": "run-a", "lr": 0.5}


@pytest.fixture
def saved(tmp_path):
    """``(path, state)`` of a committed checkpoint with several chunks in two data files."""
    path, state = tmp_path / "ckpt", small_state()
    shardckpt.save(state, path, codec="zstd", chunk_bytes=256)
    return path, state


@pytest.fixture
def audit():
    """Records the Python audit events (file opens, unpickling, processes) of the test."""
    with AuditLog() as log:
        yield log


_READERS_PROBE = textwrap.dedent("""
    import json, resource, sys
    limit = int(sys.argv[1])
    if limit:  # a runaway allocation fails in the probe, not on the host
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import shardckpt
    import shardckpt.codecs as codecs
    from shardckpt import _native
    from shardckpt.codecs import reference
    readers = [("load_full", lambda p: shardckpt.load_full(p)),
               ("verify", lambda p: shardckpt.verify(p))]
    if sys.argv[2] == "1":  # the pure-Python reference decoder must refuse the same chunks
        readers.append(("reference", lambda p: shardckpt.verify(p)))
    out = {}
    for path in sys.argv[3:]:
        for name, call in readers:
            codecs.backend = reference if name == "reference" else _native
            try:
                call(path)
                out[path + " " + name] = ["loaded"]
            except BaseException as exc:
                out[path + " " + name] = [c.__name__ for c in type(exc).__mro__]
        codecs.backend = _native
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
""")


def probe_readers(paths, *, reference: bool = False, data_limit: int = 0) -> dict:
    """Every reader (``load_full``, ``verify``, and with ``reference`` the reference codec's
    ``verify``) on each path, in a fresh process so that its peak RSS is the inputs' doing.

    Returns:
        ``{"<path> <reader>": ["loaded"] or the raised error's class names (its MRO),
        "peak_rss_mib": float}``.
    """
    args = [str(data_limit), "1" if reference else "0", *map(str, paths)]
    proc = subprocess.run([sys.executable, "-c", _READERS_PROBE, *args], capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
