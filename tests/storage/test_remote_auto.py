"""``codec="auto"`` on object stores: compress while the uploads are the bottleneck."""

import threading
import time

import torch

import shardckpt
from shardckpt.save.upload import Pressure, upload
from shardckpt.testing.faulty_storage import FaultPlan, inject
from tests.helpers import assert_same


class SlowMultipart:
    """Just enough of a Storage for ``upload``: multipart with a slow part upload."""

    multipart_min_bytes = 1

    def __init__(self, seconds: float):
        self.seconds, self.parts = seconds, {}
        self.lock = threading.Lock()

    def begin_upload(self, path):
        return "id"

    def upload_part(self, path, upload_id, number, data):
        time.sleep(self.seconds)
        with self.lock:
            self.parts[number] = bytes(data)
        return number

    def complete_upload(self, path, upload_id, tags):
        self.tags = tags


def test_pressure_follows_the_upload_slots():
    assert Pressure().codec("zstd") == "zstd" and Pressure().codec("raw") == "raw"
    pressure, seen = Pressure(), []

    def parts():
        for i in range(6):
            seen.append(pressure.codec("auto"))  # asked as each part is encoded
            yield bytes([i]) * 10
    store = SlowMultipart(0.05)
    assert upload(store, "f", parts(), concurrency=1, pressure=pressure) == 60
    assert b"".join(store.parts[n] for n in sorted(store.parts)) == b"".join(
        bytes([i]) * 10 for i in range(6))
    # The first parts go out while slots are free; once a part waits for a slot, the rest
    # are compressed.
    assert seen[0] == "raw" and seen[-1] == "zstd"


def _state():
    torch.manual_seed(0)
    smooth = torch.linspace(0, 1, 3 << 20).to(torch.bfloat16)  # 6 MiB that compress well
    return {"w": smooth, "z": torch.zeros(3 << 20), "r": torch.randn(1 << 20)}


def test_auto_compresses_when_uploads_fall_behind(s3_url, monkeypatch):
    url, opts = s3_url
    monkeypatch.setenv("SHARDCKPT_UPLOAD_PART_BYTES", str(2 << 20))
    monkeypatch.setenv("SHARDCKPT_REMOTE_CONCURRENCY", "1")
    monkeypatch.setenv("SHARDCKPT_FILES_PER_RANK", "1")
    state = _state()
    with inject(FaultPlan(latency=0.3, ops=("upload_part",))):
        auto = shardckpt.save(state, f"{url}/auto", codec="auto", storage_options=opts)
        raw = shardckpt.save(state, f"{url}/raw", codec="raw", storage_options=opts)
    assert raw.stats["chunks_compressed"] == 0 and raw.stored_bytes >= raw.raw_bytes
    assert auto.stats["chunks_compressed"] > 0 and auto.stored_bytes < 0.8 * raw.stored_bytes
    assert_same(shardckpt.load_full(f"{url}/auto", storage_options=opts), state)
    shardckpt.verify(f"{url}/auto", storage_options=opts)
