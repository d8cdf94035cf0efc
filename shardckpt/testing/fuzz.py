"""Fuzz targets for the two parsers of untrusted bytes: the manifest and the chunk decoder.

Each ``check_*`` takes one input and says what happened (``"decoded"``, ``"refused"``, ...);
it raises AssertionError when the promise breaks: an exception that is not a CheckpointError,
or (chunks) the native core and the reference codec disagreeing. The hypothesis tests in
tests/faults/test_fuzz.py draw the inputs; ``scripts/soak_faults.py`` draws many more from the
``random_*`` generators here.
"""

from __future__ import annotations

import ctypes
import json
import os
import random

import numpy as np

from .. import codecs
from ..format import manifest, tables
from ..codecs import reference
from ..errors import CheckpointError
from ..codecs.status import raise_for
from ..types import FILE_HEADER
from .hostile import resign

BACKENDS = {"reference": reference}
try:
    from .. import _native
    BACKENDS["native"] = _native
except ImportError:  # the reference alone is still fuzzed
    pass


def _zstd_versions_differ() -> bool:
    import zstandard
    native = BACKENDS.get("native")
    return native is not None and native.features()["zstd"] != ".".join(
        map(str, zstandard.ZSTD_VERSION))


# The native core links the system libzstd, the reference python-zstandard's bundled one; their
# releases differ in which malformed frames they detect (an accepted frame still passed the
# chunk's CRC, so only a hostile writer can make one).
ZSTD_VERSIONS_DIFFER = _zstd_versions_differ()


def decode_chunk(backend, stored: bytes, kind: int, raw_length: int, elemsize: int,
                 path: str) -> bytes:
    """One chunk through ``backend.read_chunks`` (its checksum made to match, so decoding is
    reached): the raw bytes, or the typed error ``read`` would raise."""
    with open(path, "wb") as f:
        f.write(FILE_HEADER + stored)
    dest = ctypes.create_string_buffer(max(raw_length, 1))
    read = (len(FILE_HEADER), len(stored), raw_length, kind, elemsize,
            reference.crc32c(stored), ctypes.addressof(dest))
    raise_for(backend.read_chunks(path, [read], 1), file=os.path.basename(path))
    return dest.raw[:raw_length]


def check_chunk(stored: bytes, kind: int, raw_length: int, elemsize: int, workdir) -> str:
    """``decoded`` or ``refused``, the same by every backend (and the same bytes)."""
    results = {}
    for name, backend in BACKENDS.items():
        try:
            results[name] = decode_chunk(backend, stored, kind, raw_length, elemsize,
                                         os.path.join(workdir, f"chunk-{name}.bin"))
        except CheckpointError:
            results[name] = None
        except Exception as exc:  # noqa: BLE001 - the finding itself
            raise AssertionError(f"{name} decoder raised {type(exc).__name__}: {exc}") from exc
    refused = {r is None for r in results.values()}
    if len(refused) > 1 and kind in (codecs.ZSTD, codecs.SHUFFLE_ZSTD) and ZSTD_VERSIONS_DIFFER:
        return "zstd-versions-disagree"  # malformed frames one libzstd release accepts
    if len(refused) > 1 or len({r for r in results.values() if r is not None}) > 1:
        agree = {k: v is not None for k, v in results.items()}
        raise AssertionError(f"backends disagree {agree} on kind={kind} raw_length={raw_length}"
                             f" elemsize={elemsize} stored={stored[:64].hex()}")
    return "refused" if refused == {True} else "decoded"


def random_chunk(rng: random.Random) -> tuple[bytes, int, int, int]:
    """``(stored, kind, raw_length, elemsize)``: random bytes, or a valid chunk mutated."""
    kind, elemsize = rng.randrange(4), rng.choice([1, 2, 4, 8, 3, 16])
    if rng.random() < 0.25:
        stored = rng.randbytes(rng.randrange(1, 300))
        return stored, kind, rng.randrange(1, 4096), elemsize
    n = rng.randrange(1, 512) * elemsize
    raw = bytes(rng.choice([0, 1, 255]) for _ in range(rng.randrange(n))) + rng.randbytes(
        rng.randrange(8)) if rng.random() < 0.5 else rng.randbytes(n)
    raw = raw[:n].ljust(n, b"\0")
    stored, kind = reference.encode(raw, elemsize, rng.choice(["zstd", "raw"]), 1)
    if kind in (codecs.SHUFFLE, codecs.SHUFFLE_ZSTD) or rng.random() < 0.3:
        kind = rng.randrange(4)
    stored = bytearray(stored)
    for _ in range(rng.choice([0, 1, 1, 2, 5])):
        what = rng.randrange(3)
        if what == 0 and stored:
            stored[rng.randrange(len(stored))] ^= 1 << rng.randrange(8)
        elif what == 1 and len(stored) > 1:
            del stored[rng.randrange(1, len(stored)):]
        else:
            stored += rng.randbytes(rng.randrange(1, 16))
    raw_length = n if rng.random() < 0.6 else max(1, n + rng.randrange(-n, n + 64))
    return bytes(stored) or b"\0", kind, raw_length, elemsize


# --- the manifest ---------------------------------------------------------------------------

def check_manifest(data: bytes, ckpt=None) -> str:
    """``refused`` by the parser, else (with ``ckpt``, whose manifest it replaces for the
    call) ``loaded`` or ``refused-on-load`` by load_full."""
    try:
        manifest.parse(data)
    except CheckpointError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - the finding itself
        raise AssertionError(f"parse raised {type(exc).__name__}: {exc}") from exc
    if ckpt is None:
        return "parsed"
    from ..api import load_full
    path = os.path.join(ckpt, "manifest.json")
    original = open(path, "rb").read()
    try:
        with open(path, "wb") as f:
            f.write(data)
        load_full(ckpt)
        return "loaded"
    except CheckpointError:
        return "refused-on-load"
    except Exception as exc:  # noqa: BLE001 - the finding itself
        raise AssertionError(f"load_full raised {type(exc).__name__}: {exc}") from exc
    finally:
        with open(path, "wb") as f:
            f.write(original)


_EXTREMES = [0, 1, -1, 2, 15, 16, 17, 255, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 53,
             (1 << 62), (1 << 63) - 1, -(1 << 63)]


def mutate_table(doc: dict, rng: random.Random) -> None:
    """Set a few cells of a random tensor's shard or chunk table to extreme or nearby values."""
    key = rng.choice(sorted(doc["tensors"]))
    field = rng.choice(["shards", "chunks"])
    nd = len(doc["tensors"][key]["shape"])
    rows = tables.decode(doc["tensors"][key][field], 7 if field == "chunks" else 2 * nd + 1,
                         field).copy()
    for _ in range(rng.randrange(1, 4)):
        if not rows.size:
            break
        r, c = rng.randrange(rows.shape[0]), rng.randrange(rows.shape[1])
        value = rng.choice(_EXTREMES) if rng.random() < 0.5 else \
            int(rows[r, c]) + rng.randrange(-3, 4)
        rows[r, c] = min(max(value, -(1 << 63)), (1 << 63) - 1)
    if rng.random() < 0.1 and len(rows) > 1:
        rows = rows[rng.randrange(len(rows)):] if rng.random() < 0.5 else np.concatenate(
            [rows, rows[:1]])
    doc["tensors"][key][field] = tables.encode(rows)


def mutate_value(doc: dict, rng: random.Random) -> None:
    """Replace a random JSON value anywhere in the document by a random scalar or container."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
    walk(doc, ())
    path = rng.choice(paths[1:])
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = rng.choice([None, True, -1, 0, 1 << 70, 1.5, "", "data/x", "..", [], {},
                                 [[]], {"dict": []}, {"tensor": "w"}, "A" * 300,
                                 rng.choice(_EXTREMES)])


def random_manifest(valid: bytes, rng: random.Random) -> bytes:
    """A mutation of the valid manifest: re-signed structural edits (tables, values), byte
    edits of the body re-signed, or raw byte damage."""
    doc = json.loads(valid)
    how = rng.randrange(4)
    if how == 0:
        mutate_table(doc, rng)
        return resign(doc)
    if how == 1:
        for _ in range(rng.randrange(1, 4)):
            mutate_value(doc, rng)
        return resign(doc)
    body = bytearray(valid[:valid.rfind(manifest.CRC_MEMBER)])
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(body))
        body[i] = rng.choice(b'{}[]":,0123456789-eE.a\\ \x00\xff')
    if how == 2:  # the body damaged and re-signed: JSON and structure must catch it
        return bytes(body) + manifest.CRC_MEMBER + str(reference.crc32c(bytes(body))).encode() \
            + b"}"
    return bytes(body) + valid[len(body):]
