"""encode_chunks / decode_chunks (the object-store path): the same bytes as write_file, checked
and decoded from memory, in the native core and the reference codec alike."""

from __future__ import annotations

import pytest
import torch

from shardckpt import _native
from shardckpt.codecs import status
from shardckpt.codecs import reference
from shardckpt.types import FILE_HEADER


def _chunks(t: torch.Tensor, n: int) -> list[tuple]:
    step = t.numel() // n * t.element_size()
    return [(t.data_ptr() + i * step, step, t.element_size()) for i in range(n)]


@pytest.mark.parametrize("backend", [_native, reference], ids=["native", "reference"])
@pytest.mark.parametrize("policy", ["raw", "zstd"])
def test_encode_matches_write_file_and_decodes(tmp_path, backend, policy):
    src = torch.arange(1 << 16, dtype=torch.float32).sin_()
    chunks = _chunks(src, 4)
    st, data, recs, _ = backend.encode_chunks(chunks, policy, 1, 1, 64 << 20, FILE_HEADER)
    assert st[0] == status.OK and bytes(data[:len(FILE_HEADER)]) == FILE_HEADER
    st, frecs, _ = backend.write_file(str(tmp_path / "f"), chunks, policy, 1, 1, 1, 64 << 20,
                                      False, FILE_HEADER)
    assert bytes(data) == (tmp_path / "f").read_bytes() and list(recs) == list(frecs)
    out = torch.empty_like(src)
    per = out.numel() // 4 * 4
    reads = [(o, n, per, kind, 4, crc, out.data_ptr() + i * per)
             for i, (o, n, kind, crc) in enumerate(recs)]
    assert backend.decode_chunks(data, "f", reads, 2)[0] == status.OK
    assert torch.equal(out, src)
    data[recs[2][0] + 3] ^= 0xFF
    code, _, chunk, _ = backend.decode_chunks(data, "f", reads, 1)
    assert (code, chunk) == (status.CHECKSUM, 2)
    code, _, chunk, _ = backend.decode_chunks(bytes(data[:-1]), "f", reads[3:], 1)
    assert (code, chunk) == (status.TRUNCATED, 0)
