"""Load a Hugging Face weights folder into a state, each rank reading only its slices' bytes.

``shardckpt.load(state, folder)`` comes here when ``folder`` holds ``model.safetensors`` or
``model.safetensors.index.json`` and no shardckpt manifest. The steps: open the folder as
untrusted input (format/safetensors.py), name the target's tensors (a module's state dict,
nested dicts and lists; tied weights count once), map the folder's names onto them
(``key_map``), compare shapes and dtypes (every difference in one StateMismatchError), then
read: a plain tensor reads its whole range, a DTensor (FSDP2, tensor parallel) only the runs of
bytes its local box covers, straight into its memory when the dtypes agree, else through a
buffer of its local size that is cast on copy (a bf16 folder into fp32 master weights). With
several ranks all ranks agree on the outcome, so none trains on half-loaded weights.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..dist.rounds import exchange
from ..errors import StateMismatchError, StorageError, UnsupportedValueError
from ..format.safetensors import SINGLE, Entry, open_regular, read_header, read_index
from ..format.tree import local_box

logger = logging.getLogger("shardckpt")


@dataclass
class HFLoadStats:
    """What one rank's HF load did: tensors filled, the bytes of the folder those slices cover
    (in the folder's dtype), the bytes read from files (headers included), seconds."""

    tensors: int = 0
    placed_bytes: int = 0
    read_bytes: int = 0
    seconds: float = 0.0


last_stats = HFLoadStats()  # this process's last HF load (benchmarks and tests read it)


@dataclass(frozen=True)
class _Fill:
    name: str  # the target's name
    entry: Entry
    target: torch.Tensor


def target_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted name: tensor}`` of ``state``: modules by their state dict, dicts and lists by
    key and position; other values are not loaded from weights and are skipped.

    Raises:
        UnsupportedValueError: a module or container nested deeper than 64 levels.
    """
    out: dict[str, torch.Tensor] = {}

    def walk(value, name: str, depth: int) -> None:
        if depth > 64:
            raise UnsupportedValueError(f"{name}: nested too deep")
        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}.{k}" if name else str(k), depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}" if name else str(i), depth + 1)
    walk(state, prefix, 0)
    return out


def name_mapper(key_map) -> tuple[Callable[[str], str | None], str]:
    """``(folder name -> target name or None, prefix the expected targets share)``.

    ``key_map``: None (names as they are); a string ``P`` (the folder's tensors go under the
    target's ``P``, e.g. ``"model."`` for ``{"model": model}``; targets outside ``P`` are not
    expected); a dict ``{folder prefix: target prefix}`` (the first matching prefix is
    replaced, names matching none are kept); a callable (None drops the folder's tensor).
    """
    if key_map is None:
        return (lambda n: n), ""
    if isinstance(key_map, str):
        return (lambda n: key_map + n), key_map
    if isinstance(key_map, dict):
        pairs = sorted(key_map.items(), key=lambda kv: -len(kv[0]))

        def by_prefix(n: str) -> str:
            for old, new in pairs:
                if n.startswith(old):
                    return new + n[len(old):]
            return n
        return by_prefix, ""
    if callable(key_map):
        return key_map, ""
    raise TypeError(f"key_map must be None, a prefix string, a dict of prefixes or a callable, "
                    f"not {type(key_map).__name__}")


def _folder_entries(folder: str, stats: HFLoadStats) -> dict[str, Entry]:
    """Every tensor of the folder, each header read (and checked) once.

    Raises:
        StateMismatchError: the index puts a tensor in a file that does not hold it.
        CheckpointError: as ``read_index`` / ``read_header``.
    """
    files = read_index(folder)
    if not files:
        entries, nbytes = read_header(os.path.join(folder, SINGLE))
        stats.read_bytes += nbytes
        return entries
    entries: dict[str, Entry] = {}
    headers: dict[str, dict[str, Entry]] = {}
    for name, path in files.items():
        if path not in headers:
            headers[path], nbytes = read_header(path)
            stats.read_bytes += nbytes
        if name not in headers[path]:
            raise StateMismatchError(mismatched=[(name, f"the index puts it in {path}, which "
                                                        "does not hold it")])
        entries[name] = headers[path][name]
    return entries


def _alias_groups(targets: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Names sharing memory (tied weights): each name -> every name of its group."""
    groups: dict[Any, list[str]] = {}
    for name, t in targets.items():
        local = local_box(t)[0]
        if local.numel() == 0:
            ident = ("empty", name)
        else:
            ident = (local.device, local.data_ptr(), tuple(local.shape), local.stride(),
                     local.dtype)
        groups.setdefault(ident, []).append(name)
    return {n: names for names in groups.values() for n in names}


def plan_fills(targets: dict[str, torch.Tensor], entries: dict[str, Entry], key_map,
               strict: bool) -> list[_Fill]:
    """Which folder tensor fills which target; every mismatch at once.

    Raises:
        StateMismatchError: (``strict``) targets no folder tensor fills, folder tensors no target
            takes; (always) shape or dtype differences.
    """
    mapper, scope = name_mapper(key_map)
    aliases = _alias_groups(targets)
    fills, unexpected, mismatched, covered = [], [], [], set()
    for folder_name, entry in entries.items():
        name = mapper(folder_name)
        if name is None:
            continue
        if name not in targets:
            unexpected.append(folder_name)
            continue
        why = _difference(targets[name], entry)
        covered.update(aliases[name])  # a mismatched target is reported once, not as missing
        if why:
            mismatched.append((name, why))
            continue
        fills.append(_Fill(name, entry, targets[name]))
    missing = [n for n in targets if n.startswith(scope) and n not in covered]
    if mismatched or (strict and (missing or unexpected)):
        raise StateMismatchError(missing if strict else (), unexpected if strict else (),
                                 mismatched)
    return fills


def _difference(target: torch.Tensor, entry: Entry) -> str | None:
    if tuple(target.shape) != entry.shape:
        return f"shape {tuple(target.shape)} in the target, {entry.shape} in {entry.file}"
    if target.dtype != entry.dtype and not (target.dtype.is_floating_point
                                            and entry.dtype.is_floating_point):
        return (f"dtype {target.dtype} in the target, {entry.dtype} in {entry.file} (only "
                "floating dtypes are cast)")
    return None


def byte_runs(shape: tuple, offsets: tuple, sizes: tuple, itemsize: int):
    """``(file byte offset from the tensor's start, length)`` of each contiguous run of a box,
    in the box's row-major order: one run when only the first dimension is cut (FSDP2)."""
    if not shape:
        return [(0, itemsize)]
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    cut = 0  # the first dimension from which the box covers everything
    for d in range(len(shape) - 1, -1, -1):
        if sizes[d] != shape[d]:
            cut = d
            break
    run = sizes[cut] * strides[cut] * itemsize
    outer = [range(offsets[d], offsets[d] + sizes[d]) for d in range(cut)]
    return [((sum(i * s for i, s in zip(idx, strides)) + offsets[cut] * strides[cut])
             * itemsize, run) for idx in itertools.product(*outer)]


def _read_into(fd: int, path: str, runs, base: int, buf: memoryview) -> int:
    at = 0
    for off, length in runs:
        view = buf[at:at + length]
        done = 0
        while done < length:
            try:
                n = os.preadv(fd, [view[done:]], base + off + done)
            except OSError as exc:
                raise StorageError(exc.errno, f"{path}: reading failed: {exc.strerror}") from exc
            if n == 0:
                raise StorageError(f"{path}: ended early (truncated while loading?)")
            done += n
        at += length
    return at


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def fill(fills: list[_Fill], stats: HFLoadStats) -> None:
    """Read every fill's bytes into its target (file by file; each file opened once)."""
    by_file: dict[str, list[_Fill]] = {}
    for f in fills:
        by_file.setdefault(f.entry.file, []).append(f)
    for path, group in by_file.items():
        fd = open_regular(path)
        try:
            for f in sorted(group, key=lambda f: f.entry.start):
                _fill_one(fd, path, f, stats)
        finally:
            os.close(fd)


def _fill_one(fd: int, path: str, f: _Fill, stats: HFLoadStats) -> None:
    local, shape, offsets, _ = local_box(f.target)
    if local.numel() == 0:
        return
    itemsize = torch.empty((), dtype=f.entry.dtype).element_size()
    runs = byte_runs(shape, offsets, tuple(local.shape), itemsize)
    direct = (local.dtype == f.entry.dtype and local.device.type == "cpu"
              and local.is_contiguous())
    buf = local if direct else torch.empty(local.shape, dtype=f.entry.dtype)
    stats.read_bytes += _read_into(fd, path, runs, f.entry.start, _bytes_of(buf))
    if not direct:
        with torch.no_grad():
            local.copy_(buf)  # casts (bf16 -> fp32) and moves to the device
    stats.tensors += 1
    stats.placed_bytes += sum(length for _, length in runs)


def load_hf(state: Any, folder, *, key_map=None, strict: bool = True,
            timeout: float | None = None) -> Any:
    """Load the HF weights folder ``folder`` into ``state`` in place and return it.

    See ``shardckpt.load``; with several ranks every rank calls it and all agree.
    """
    global last_stats
    t0 = time.perf_counter()
    ex = exchange(timeout)
    stats, error = HFLoadStats(), None
    try:
        folder = os.fspath(folder)
        entries = _folder_entries(folder, stats)
        fills = plan_fills(target_tensors(state), entries, key_map, strict)
        fill(fills, stats)
    except Exception as exc:
        error = exc
    ex.round("hf-load", True, error, lambda _: True, raise_own=True)
    stats.seconds = time.perf_counter() - t0
    last_stats = stats
    logger.info("loaded HF folder %s in %.3f s: %d tensors, read %d bytes for %d placed",
                folder, stats.seconds, stats.tensors, stats.read_bytes, stats.placed_bytes)
    return state
