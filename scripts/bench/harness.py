"""The benchmarks' shared harness: the plumbing around a run, written once for every script.

Walking nested states, fsync and page-cache helpers, peak-RSS readings, running a child process
or train.py, timing from a barrier among ranks, the round-robin order of contenders, medians,
ratios, target checks and plain-text tables. The states the benchmarks save live in
``states.py``. Nothing here imports shardckpt at module level (only the helpers that run it do, when
called), so a benchmark can time the baselines even while the library is broken.

Every script in this folder runs as ``python scripts/bench/NAME.py``: Python puts this folder
first on the path, so ``import harness`` finds this file.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

GIB = 1 << 30
MIB = 1 << 20
CORES = os.cpu_count() or 1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- walking nested states -------------------------------------------------------------------

def map_state(obj, fn):
    """A copy of the nested containers of ``obj`` with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_state(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_state(v, fn) for v in obj)
    return obj


def leaves(obj, path=()):
    """``(path, value)`` for every non-container leaf, depth first in insertion order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (str(i),))
    else:
        yield path, obj


def tensors_of(state) -> list[torch.Tensor]:
    return [v for _, v in leaves(state) if isinstance(v, torch.Tensor)]


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


def flat_tensors(state) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """``({key: tensor}, {key: plain value})`` with each piece of memory kept once.

    safetensors refuses tensors that share memory; a real user drops the aliases (as
    ``safetensors.torch.save_model`` does), so the benchmark does too instead of paying for a copy.
    """
    tensors, plain, seen = {}, {}, set()
    for path, value in leaves(state):
        key = "/".join(path)
        if not isinstance(value, torch.Tensor):
            plain[key] = value
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                 value.stride(), value.dtype)
        if ident not in seen:
            seen.add(ident)
            tensors[key] = value if value.is_contiguous() else value.contiguous()
    return tensors, plain


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (bf16 has no numpy dtype; bytes always do)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def first_difference(expected: dict, got: dict) -> str | None:
    """The first key whose tensor is missing or not bit-identical; None when all match."""
    for key, t in expected.items():
        other = got.get(key)
        if not isinstance(other, torch.Tensor) or other.shape != t.shape or other.dtype != t.dtype:
            return f"{key}: missing or wrong shape/dtype"
        if not torch.equal(byte_view(t), byte_view(other)):
            return f"{key}: values differ"
    return None


def touch_pages(state) -> None:
    """Read one byte of every 4 KiB page of every tensor.

    safetensors' ``load_file`` maps the file and returns at once; the bytes arrive on first use.
    Touching each page makes a lazy loader pay for its reads on the clock, as eager ones do; on
    memory that is already resident it costs a few milliseconds per GiB.
    """
    for t in tensors_of(state):
        b = byte_view(t)
        if b.numel():
            int(b[::4096].sum())


def zero_fraction(state) -> float:
    """Share of the state's bytes that are zero: a hint at how compressible it is."""
    zeros = sum(int((byte_view(t) == 0).sum()) for t in tensors_of(state))
    return zeros / max(1, state_bytes(state))


# ---- files and the page cache ----------------------------------------------------------------

def fsync_tree(path: str) -> None:
    """fsync ``path`` (a file, or every file below a folder), its folders and its parent."""
    targets = [path]
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            targets += [os.path.join(root, n) for n in files + dirs]
    targets.append(os.path.dirname(os.path.abspath(path)))
    for p in targets:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def slug(name: str) -> str:
    """``name`` as a file-name fragment."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def disk_bytes(path: str) -> int:
    """Total size of the files at ``path`` (what a user pays for on disk, metadata included)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, n))
               for root, _, files in os.walk(path) for n in files)


def drop_page_cache() -> bool:
    """Write back dirty pages and evict the page cache, so a load reads from the disk.

    Needs root; returns False where the kernel refuses, and the caller reports warm-cache loads.
    """
    os.sync()
    return write_proc("/proc/sys/vm/drop_caches", "3")


def write_proc(path: str, value: str) -> bool:
    """Write ``value`` to a kernel control file; False where the kernel refuses (not root,
    too old)."""
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
        return True
    except OSError:
        return False


def write_json(doc, path: str | None) -> None:
    """Every measurement of a run, for later analysis (``--json PATH``; None: skip)."""
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)


# ---- numbers and tables ----------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rotated(items: list, rep: int) -> list:
    """Start each repetition at the next contender, so none always runs first or last."""
    k = rep % len(items)
    return items[k:] + items[:k]


def dig(record, *keys):
    """``record[k1][k2]...`` through dicts (str keys) and lists (int keys); None where absent."""
    for k in keys:
        if isinstance(record, dict):
            record = record.get(k)
        elif isinstance(record, list) and isinstance(k, int) and -len(record) <= k < len(record):
            record = record[k]
        else:
            return None
    return record


def med(records: list, *keys) -> float | None:
    """Median of ``record[k1][k2]...`` over the records that have it (errors are skipped)."""
    return median([dig(r, *keys) for r in records])


def spread(records: list, *keys, spec: str = ".2f") -> str:
    """``min-max`` of the repetitions: how far to trust a median on a noisy machine."""
    values = [v for v in (med([r], *keys) for r in records) if v is not None]
    return f"{min(values):{spec}}-{max(values):{spec}}" if values else "-"


def first_error(records: list) -> str | None:
    return next((r["error"] for r in records if "error" in r), None)


def ratio(a, b):
    return None if a is None or not b else a / b


def check(what: str, value, limit: float | None) -> dict:
    """A target as ``measured <= limit``; ``limit=None`` makes it an info line."""
    ok = None if limit is None else (value is not None and value <= limit)
    return {"check": what, "value": value, "limit": limit, "pass": ok}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_checks(results: list[dict]) -> None:
    """The target checks under one heading: PASS, FAIL, or info where there is no limit."""
    print("\nTARGET CHECKS (ratios of medians)")
    for c in results:
        verdict = "info" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        limit = "" if c["limit"] is None else f" (limit {c['limit']})"
        print(f"  {verdict:4}  {c['check']}: {fmt(c['value'], '.3f')}{limit}")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the numbers right-aligned.

    A row shorter than the headers (an error message) prints its cells after the first column
    without shaping the widths.
    """
    full = [headers] + [r for r in rows if len(r) == len(headers)]
    widths = [max(len(str(r[i])) for r in full) for i in range(len(headers))]

    def line(cells):
        if len(cells) < len(headers):
            return "  ".join([str(cells[0]).ljust(widths[0])] + [str(c) for c in cells[1:]])
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


# ---- running contenders ----------------------------------------------------------------------

def error_record(exc: BaseException) -> dict:
    """The record of a contender that failed: the run goes on and the report shows the error."""
    return {"error": f"{type(exc).__name__}: {exc}"}


def round_robin(contenders: list, reps: int, measure, describe, tag: str = "") -> dict:
    """``{name: [record per repetition]}`` of ``measure(contender, rep)``.

    The disk and the CPUs drift, so each repetition runs every contender once and starts one
    contender later than the previous (``rotated``): none always runs first or last. A contender
    is a name or has one (``.name``); ``describe(record)`` is its progress line.
    """
    def name(c):
        return getattr(c, "name", c)
    records = {name(c): [] for c in contenders}
    for rep in range(reps):
        for c in rotated(list(contenders), rep):
            record = measure(c, rep)
            records[name(c)].append(record)
            log(f"{tag}rep {rep + 1}/{reps} {name(c)}: {describe(record)}")
    return records


def header(name: str, *facts: str) -> str:
    """The report's first line: the library and its codec backend, torch, the cores, and more."""
    import shardckpt
    import shardckpt.codecs
    return ", ".join([f"{name}: shardckpt {shardckpt.__version__} (backend "
                      f"{shardckpt.codecs.BACKEND})", f"torch {torch.__version__}",
                      f"{CORES} cores", *facts])


def shardckpt_saver(codec: str):
    """``save(state, path)`` by ``shardckpt.save`` with ``codec``; returns its stored bytes."""
    def save(state, path):
        import shardckpt
        info = shardckpt.save(state, path, codec=codec)
        return {"stored_bytes": info.stored_bytes, "stats": info.stats}
    return save


def dcp_saver(**writer_args):
    """``save(state, path)`` by ``dcp.save`` to a ``FileSystemWriter(path, **writer_args)``.

    Its ``sync_files=True`` (the default) fsyncs every file it writes, so it is as durable as
    shardckpt's save.
    """
    def save(state, path):
        import torch.distributed.checkpoint as dcp
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, **writer_args))
    return save


def dcp_cpu_staging():
    """DCP's ``StagingOptions`` for a host without an accelerator: async staging, no pinned or
    shared memory (DCP's own defaults demand pinned memory and a device)."""
    from torch.distributed.checkpoint.staging import StagingOptions
    return StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                          use_async_staging=True, use_non_blocking_copy=False)


# ---- other processes: children, train.py, ranks ----------------------------------------------

def run_child(argv: list[str], timeout: float | None = 900) -> dict:
    """Run ``python ARGV...`` and return the JSON of its last stdout line, or an error record
    (a measurement in a fresh process, so that peaks and caches do not mix)."""
    try:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]  # the exception's own line
            return {"error": f"child exit {done.returncode}: {last[:300]}"}
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - one failing measurement must not abort the run
        return error_record(exc)


TRAIN_DONE = re.compile(r"done: (\d+) steps; checkpoint stall ([\d.]+) s of ([\d.]+) s")


def run_train(args: list[str], nproc: int = 0, env: dict | None = None) -> tuple[float, float]:
    """``(checkpoint stall s, loop s)`` of one run of launch/train.py with ``args``, as train.py
    itself reports them; under torchrun with ``nproc`` ranks when ``nproc`` is given."""
    script = os.path.join(REPO, "launch", "train.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc else [sys.executable]
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    out = subprocess.run(launcher + [script, *args], capture_output=True, text=True, env=env,
                         check=True).stdout
    m = TRAIN_DONE.search(out)
    if m is None:
        raise RuntimeError(f"train.py printed no summary:\n{out[-2000:]}")
    return float(m.group(2)), float(m.group(3))


def from_barrier(fn):
    """``(seconds, result)`` of ``fn()`` on this rank, timed from a barrier every rank meets, so
    that the slowest rank's time is the operation's wall from a common start."""
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_mesh(world: int):
    """A 1-D CPU device mesh over all ``world`` ranks (the benchmarks' FSDP-like layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor; a plain tensor is its own piece."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- memory ----------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0); False
    where the kernel refuses.

    Without it the peak would still hold what came before (a state's build, a temporary fp32
    copy of its largest tensor), which can hide a measurement's growth below it.
    """
    return write_proc("/proc/self/clear_refs", "5")


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    return _proc_status("VmRSS") or 0


def peak_rss_bytes() -> int:
    """The RSS high-water mark since the last ``reset_peak_rss``.

    VmHWM rather than ``ru_maxrss``: every exiting thread folds the high-water mark into
    ``ru_maxrss`` for good, so after a warm-up's threads end, resetting VmHWM no longer lowers
    ``ru_maxrss`` and a peak below the earlier one would read as zero growth.
    """
    peak = _proc_status("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak
