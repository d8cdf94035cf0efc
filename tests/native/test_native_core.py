"""Tests of the native core through ``shardckpt._native`` alone (no Python pipeline on top).

Each on-disk result is also checked against an independent decoder (the ``crc32c`` and
``zstandard`` packages plus numpy, as FORMAT.md section 6 shows), so the module cannot pass by
agreeing only with itself.
"""

import errno
import os
import subprocess
import sys
import textwrap
import threading

import crc32c as crc32c_ref
import numpy as np
import pytest
import zstandard

from shardckpt import _native

HEADER = b"SHRDCKPT" + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
KIND_RAW, KIND_SHUFFLE, KIND_ZSTD, KIND_SHUFFLE_ZSTD = 0, 1, 2, 3
OK, INVALID, IO_ERROR, NO_SPACE, CHECKSUM, DECODE, TRUNCATED = range(7)
POLICIES = ["raw", "zstd", "auto"]


# --- helpers ---------------------------------------------------------------------------------


def smooth_floats(n, seed=0):
    """Compressible float32 data: a slow ramp with a little noise, like trained weights."""
    rng = np.random.default_rng(seed)
    return (np.linspace(-1, 1, n) + rng.normal(0, 1e-3, n)).astype(np.float32)


def random_bytes(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def chunk_arrays(arr, chunk_elems):
    """Split a 1-D array into consecutive chunk views."""
    return [arr[i : i + chunk_elems] for i in range(0, arr.size, chunk_elems)]


def as_chunks(arrays):
    return [(a.ctypes.data, a.nbytes, a.itemsize) for a in arrays]


def write(path, arrays, policy="zstd", level=1, encode_threads=2, write_threads=1,
          pool_bytes=64 << 20, durable=False, header=HEADER):
    return _native.write_file(str(path), as_chunks(arrays), policy, level, encode_threads,
                              write_threads, pool_bytes, durable, header)


def read_requests(arrays, records, dests=None):
    reqs = []
    for i, (a, (off, length, kind, crc)) in enumerate(zip(arrays, records)):
        dest = 0 if dests is None else dests[i].ctypes.data
        reqs.append((off, length, a.nbytes, kind, a.itemsize, crc, dest))
    return reqs


def reference_decode(blob, kind, elemsize):
    """Decode stored bytes with zstandard + numpy only (FORMAT.md section 6)."""
    data = blob
    if kind in (KIND_ZSTD, KIND_SHUFFLE_ZSTD):
        data = zstandard.ZstdDecompressor().decompress(data)
    if kind in (KIND_SHUFFLE, KIND_SHUFFLE_ZSTD):
        data = np.frombuffer(data, np.uint8).reshape(elemsize, -1).T.tobytes()
    return data


def check_file_layout(path, records, header=HEADER):
    """Header first, then chunks back to back with no holes, each with the right crc32c."""
    blob = path.read_bytes()
    assert blob[: len(header)] == header
    cursor = len(header)
    for off, length, _kind, crc in sorted(records):
        assert off == cursor
        assert crc32c_ref.crc32c(blob[off : off + length]) == crc
        cursor += length
    assert cursor == len(blob)
    return blob


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# --- crc32c ----------------------------------------------------------------------------------


def test_crc32c_check_value():
    assert _native.crc32c(b"123456789") == 0xE3069283
    assert _native.crc32c(b"") == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_crc32c_accepts_bytes_like(wrap):
    assert _native.crc32c(wrap(b"123456789")) == 0xE3069283


def test_crc32c_accepts_numpy_of_any_dtype():
    arr = smooth_floats(1001)
    assert _native.crc32c(arr) == crc32c_ref.crc32c(arr.tobytes())


def test_crc32c_matches_reference_on_many_lengths_and_alignments():
    data = random_bytes(5000 + 16).tobytes()
    view = memoryview(data)
    lengths = list(range(0, 70)) + list(range(70, 5001, 37)) + [767, 768, 769, 4999, 5000]
    for n in lengths:
        for start in (0, 1, 3, 7):
            piece = view[start : start + n]
            assert _native.crc32c(piece) == crc32c_ref.crc32c(piece), (n, start)


def test_crc32c_large_buffer_matches_reference():
    data = random_bytes((3 << 20) + 12345).tobytes()
    assert _native.crc32c(data) == crc32c_ref.crc32c(data)


def test_crc32c_continues_from_previous_value():
    data = random_bytes(10000).tobytes()
    for cut in (0, 1, 100, 4097, 10000):
        assert _native.crc32c(data[cut:], _native.crc32c(data[:cut])) == _native.crc32c(data)


def test_crc32c_rejects_non_buffers_and_non_contiguous():
    with pytest.raises(TypeError):
        _native.crc32c("text")
    with pytest.raises((BufferError, TypeError, ValueError)):
        _native.crc32c(np.arange(10, dtype=np.uint8)[::2])


# --- shuffle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 255, 1001, 65537])
def test_shuffle_matches_numpy_reference(k, count):
    data = random_bytes(k * count, seed=k + count).tobytes()
    expected = np.frombuffer(data, np.uint8).reshape(-1, k).T.tobytes()
    shuffled = _native.shuffle(data, k)
    assert shuffled == expected
    assert _native.unshuffle(shuffled, k) == data


def test_shuffle_rejects_partial_elements():
    with pytest.raises(ValueError):
        _native.shuffle(b"12345", 4)
    with pytest.raises(ValueError):
        _native.unshuffle(b"12345", 0)


# --- write_file / read_chunks ------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_round_trip_mixed_chunks(tmp_path, policy):
    floats = smooth_floats(300_000)
    noise = random_bytes(1 << 20)
    ints = np.arange(50_001, dtype=np.int64) * 3
    halves = smooth_floats(20_001).astype(np.float16)
    arrays = chunk_arrays(floats, 65_536) + chunk_arrays(noise, 1 << 18) + [ints, halves]
    path = tmp_path / "rank-00000.bin"

    (code, msg, chunk, err), records, stats = write(path, arrays, policy=policy)
    assert (code, msg, chunk, err) == (OK, "", -1, 0)
    assert len(records) == len(arrays)
    blob = check_file_layout(path, records)
    assert stats["file_size"] == len(blob) == len(HEADER) + stats["stored_bytes"]
    assert stats["raw_bytes"] == sum(a.nbytes for a in arrays)
    assert stats["chunks_raw"] + stats["chunks_compressed"] == len(arrays)

    for a, (off, length, kind, _crc) in zip(arrays, records):
        assert reference_decode(blob[off : off + length], kind, a.itemsize) == a.tobytes()
        if kind == KIND_RAW:
            assert length == a.nbytes
        else:
            assert length < a.nbytes  # compressed only when it shrinks

    dests = [np.empty_like(a) for a in arrays]
    status = _native.read_chunks(str(path), read_requests(arrays, records, dests), 3)
    assert status == (OK, "", -1, 0)
    for a, d in zip(arrays, dests):
        np.testing.assert_array_equal(a, d)
    assert _native.read_chunks(str(path), read_requests(arrays, records), 2)[0] == OK


def test_zstd_policy_compresses_floats_and_stores_noise_raw(tmp_path):
    floats = chunk_arrays(smooth_floats(200_000), 50_000)
    noise = chunk_arrays(random_bytes(1 << 20), 1 << 18)
    path = tmp_path / "f.bin"
    status, records, stats = write(path, floats + noise, policy="zstd")
    assert status[0] == OK
    kinds = [r[2] for r in records]
    assert kinds[: len(floats)] == [KIND_SHUFFLE_ZSTD] * len(floats)
    assert kinds[len(floats) :] == [KIND_RAW] * len(noise)
    assert stats["chunks_compressed"] == len(floats)
    assert stats["stored_bytes"] < stats["raw_bytes"]


def test_zstd_without_shuffle_for_single_byte_elements(tmp_path):
    data = np.tile(np.arange(64, dtype=np.uint8), 4096)
    status, records, _ = write(tmp_path / "f.bin", [data], policy="zstd", level=-5)
    assert status[0] == OK
    assert records[0][2] == KIND_ZSTD


def test_raw_policy_never_compresses_and_uses_no_pool(tmp_path):
    arrays = chunk_arrays(smooth_floats(100_000), 10_000)
    status, records, stats = write(tmp_path / "f.bin", arrays, policy="raw", pool_bytes=0)
    assert status[0] == OK
    assert {r[2] for r in records} == {KIND_RAW}
    assert stats["chunks_compressed"] == 0
    assert stats["pool_peak_bytes"] == 0


def test_header_is_written_at_offset_zero(tmp_path):
    header = HEADER + b"extra"
    path = tmp_path / "f.bin"
    status, records, _ = write(path, [smooth_floats(1000)], header=header)
    assert status[0] == OK
    assert path.read_bytes()[: len(header)] == header
    assert records[0][0] == len(header)


def test_no_chunks_writes_only_the_header(tmp_path):
    path = tmp_path / "f.bin"
    status, records, stats = write(path, [], durable=True)
    assert status[0] == OK and records == []
    assert path.read_bytes() == HEADER
    assert stats["file_size"] == len(HEADER)


@pytest.mark.parametrize("policy", ["zstd", "auto"])
def test_pool_budget_is_respected_with_many_chunks(tmp_path, policy):
    chunk_elems = 16_384  # 64 KiB chunks
    arrays = chunk_arrays(smooth_floats(chunk_elems * 300), chunk_elems)
    budget = 3 * 64 * 1024  # one shuffle scratch + two output buffers
    path = tmp_path / "f.bin"
    status, records, stats = write(path, arrays, policy=policy, pool_bytes=budget,
                                   encode_threads=4, write_threads=2)
    assert status[0] == OK
    assert stats["pool_peak_bytes"] <= budget
    if policy == "zstd":
        assert stats["pool_peak_bytes"] > 0
    check_file_layout(path, records)
    dests = [np.empty_like(a) for a in arrays]
    assert _native.read_chunks(str(path), read_requests(arrays, records, dests), 2)[0] == OK
    for a, d in zip(arrays, dests):
        np.testing.assert_array_equal(a, d)


def test_pool_too_small_for_one_chunk_is_invalid_under_zstd(tmp_path):
    path = tmp_path / "f.bin"
    status, records, _ = write(path, [smooth_floats(100_000)], policy="zstd", pool_bytes=4096)
    assert status[0] == INVALID and "pool_bytes" in status[1]
    assert not path.exists()


def test_auto_stores_chunks_too_big_for_the_pool_raw(tmp_path):
    small, big = smooth_floats(1024), smooth_floats(100_000)
    path = tmp_path / "f.bin"
    status, records, stats = write(path, [big, small] * 20, policy="auto", pool_bytes=16 << 10,
                                   encode_threads=2)
    assert status[0] == OK
    assert all(r[2] == KIND_RAW for r in records[::2])  # 400 KB chunks never fit 16 KiB
    assert stats["pool_peak_bytes"] <= 16 << 10
    check_file_layout(path, records)


def test_checksum_corruption_is_reported_with_the_chunk(tmp_path):
    arrays = chunk_arrays(smooth_floats(100_000), 10_000)
    path = tmp_path / "f.bin"
    status, records, _ = write(path, arrays, policy="zstd")
    assert status[0] == OK
    victim = 6
    off, length, _, crc = records[victim]
    flip_byte(path, off + length // 2)
    dests = [np.empty_like(a) for a in arrays]
    code, msg, chunk, _ = _native.read_chunks(str(path), read_requests(arrays, records, dests), 2)
    assert (code, chunk) == (CHECKSUM, victim)
    assert f"0x{crc:08x}" in msg
    # The other chunks still verify on their own: chunks are independent.
    rest = [r for i, r in enumerate(read_requests(arrays, records)) if i != victim]
    assert _native.read_chunks(str(path), rest, 2)[0] == OK


def test_raw_chunk_corruption_is_detected(tmp_path):
    data = random_bytes(100_000)
    path = tmp_path / "f.bin"
    status, records, _ = write(path, [data], policy="raw")
    flip_byte(path, records[0][0])
    code, _, chunk, _ = _native.read_chunks(str(path), read_requests([data], records), 1)
    assert (code, chunk) == (CHECKSUM, 0)


def test_truncated_file_is_reported(tmp_path):
    arrays = chunk_arrays(smooth_floats(40_000), 10_000)
    path = tmp_path / "f.bin"
    status, records, _ = write(path, arrays, policy="raw")
    last = max(range(len(records)), key=lambda i: records[i][0])
    os.truncate(path, records[last][0] + records[last][1] - 1)
    code, _, chunk, _ = _native.read_chunks(str(path), read_requests(arrays, records), 2)
    assert (code, chunk) == (TRUNCATED, last)


def test_wrong_declared_length_is_a_decode_error(tmp_path):
    data = smooth_floats(10_000)
    path = tmp_path / "f.bin"
    status, records, _ = write(path, [data], policy="zstd")
    off, length, kind, crc = records[0]
    assert kind == KIND_SHUFFLE_ZSTD
    req = (off, length, data.nbytes - 4, kind, 4, crc, 0)
    code, _, chunk, _ = _native.read_chunks(str(path), [req], 1)
    assert (code, chunk) == (DECODE, 0)


def test_uncompressed_length_mismatch_is_invalid(tmp_path):
    data = random_bytes(1000)
    path = tmp_path / "f.bin"
    _, records, _ = write(path, [data], policy="raw")
    off, length, kind, crc = records[0]
    assert _native.read_chunks(str(path), [(off, length, length + 1, kind, 1, crc, 0)], 1)[0] == INVALID


def test_existing_path_is_an_io_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"keep me")
    (code, msg, chunk, err), records, _ = write(path, [smooth_floats(100)])
    assert (code, err) == (IO_ERROR, errno.EEXIST)
    assert str(path) in msg
    assert path.read_bytes() == b"keep me"


def test_missing_directory_and_missing_file_are_io_errors(tmp_path):
    status, _, _ = write(tmp_path / "no" / "f.bin", [smooth_floats(100)])
    assert (status[0], status[3]) == (IO_ERROR, errno.ENOENT)
    status = _native.read_chunks(str(tmp_path / "absent.bin"), [], 1)
    assert (status[0], status[3]) == (IO_ERROR, errno.ENOENT)


# Runs in a child process: it caps the file size (RLIMIT_FSIZE) so that a pwrite fails part way
# through the file while every encode and write thread is busy.
_FAILING_WRITE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, resource, signal, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("shardckpt._native", sys.argv[1])
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    chunks = [(data.ctypes.data + off, 1 << 16, 1) for off in range(0, data.nbytes, 1 << 16)]
    for policy in ("raw", "zstd", "auto"):
        status, records, _ = native.write_file(
            sys.argv[2] + policy, chunks, policy, 1, 4, 2, 1 << 20, False, b"H" * 16)
        print(policy, status[0], status[2], status[3], len(records))
    """
)


def test_write_error_mid_file_stops_every_thread(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITE_SCRIPT, _native.__file__, str(tmp_path / "f")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split("\n")
    results = [line.split() for line in out if line]
    assert [r[0] for r in results] == POLICIES
    for _policy, code, chunk, err, n_records in results:
        assert (int(code), int(err)) == (IO_ERROR, errno.EFBIG)
        assert 0 <= int(chunk) < 128
        assert n_records == "0"


def test_malformed_arguments_raise(tmp_path):
    with pytest.raises(ValueError):
        write(tmp_path / "a.bin", [smooth_floats(10)], policy="lz4")
    with pytest.raises(ValueError):
        _native.read_chunks(str(tmp_path / "a.bin"), [(16, 4, 4, 9, 1, 0, 0)], 1)
    with pytest.raises(TypeError):
        _native.write_file(str(tmp_path / "b.bin"), [(0, 1)], "raw", 1, 1, 1, 1 << 20, False, HEADER)


def test_concurrent_saves_from_python_threads(tmp_path):
    """The GIL is released, and independent calls share no state."""
    arrays = chunk_arrays(smooth_floats(400_000), 40_000)
    results = {}

    def save(i):
        results[i] = write(tmp_path / f"r{i}.bin", arrays, policy=POLICIES[i % 3])

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        status, records, _ = results[i]
        assert status[0] == OK
        dests = [np.empty_like(a) for a in arrays]
        assert _native.read_chunks(str(tmp_path / f"r{i}.bin"), read_requests(arrays, records, dests), 2)[0] == OK
        for a, d in zip(arrays, dests):
            np.testing.assert_array_equal(a, d)


def test_features():
    f = _native.features()
    assert set(f) >= {"version", "zstd", "crc32c", "threads", "sync_file_range", "policies"}
    assert f["version"] == _native.__version__
    assert f["crc32c"] in ("sse4.2", "software")
    assert f["policies"] == ["raw", "zstd", "auto"]
    assert isinstance(f["sync_file_range"], bool)
    assert f["threads"] >= 1
    assert f["zstd"].count(".") == 2
