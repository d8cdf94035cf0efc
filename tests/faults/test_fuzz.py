"""Fuzzing the parsers of untrusted bytes: only CheckpointError subclasses may escape.

The chunk decoder (native core and reference codec, which must also agree), and the manifest
parser through three kinds of mutation: table cells, JSON values and body bytes, each re-signed
so the CRC does not stop them first. tests/format/test_manifest.py fuzzes JSON leaves as well;
``scripts/soak_faults.py`` runs the same targets on >= 100,000 random inputs.
"""

import random

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

import shardckpt
from shardckpt.codecs import reference
from shardckpt.testing import fuzz

from .conftest import small_state

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(stored=st.binary(min_size=1, max_size=300), kind=st.integers(0, 3),
       raw_length=st.integers(1, 4096), elemsize=st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_random_bytes_never_escape_the_chunk_decoder(tmp_path, stored, kind, raw_length,
                                                     elemsize):
    fuzz.check_chunk(stored, kind, raw_length, elemsize, tmp_path)


@FAST
@given(raw=st.binary(min_size=1, max_size=2048), elemsize=st.sampled_from([1, 2, 4, 8]),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3),
       cut=st.integers(0, 64), tail=st.binary(max_size=16), declared=st.integers(-64, 64),
       kind=st.integers(0, 3))
def test_mutated_valid_chunks_decode_or_are_refused_alike(tmp_path, raw, elemsize, flips, cut,
                                                          tail, declared, kind):
    raw = raw[:len(raw) - len(raw) % elemsize] or bytes(elemsize)
    stored = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(
        reference.shuffle(raw, elemsize) if kind == 3 else raw) if kind >= 2 else raw)
    for pos, bit in flips:
        stored[pos % len(stored)] ^= 1 << bit
    stored = bytes(stored[:max(1, len(stored) - cut)]) + tail
    outcome = fuzz.check_chunk(stored, kind, max(1, len(raw) + declared), elemsize, tmp_path)
    if not flips and not cut and not tail and not declared:
        assert outcome == "decoded"  # an undamaged chunk must still decode


def test_the_decoder_fuzz_target_does_catch_a_disagreement(tmp_path, monkeypatch):
    """The differential check can fail: a backend that decodes garbage is reported."""
    monkeypatch.setitem(fuzz.BACKENDS, "lenient", _Lenient())
    with pytest.raises(AssertionError, match="disagree"):
        fuzz.check_chunk(b"\x00" * 8, 0, 4, 1, tmp_path)


class _Lenient:
    """Accepts any chunk (a broken decoder, for the test above)."""

    @staticmethod
    def read_chunks(path, reads, threads):
        return (0, "", -1, 0)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shardckpt.save(small_state(), path, codec="zstd", chunk_bytes=256)
    return path, (path / "manifest.json").read_bytes()


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_manifests_raise_only_checkpoint_errors(valid, seed):
    path, data = valid
    fuzz.check_manifest(fuzz.random_manifest(data, random.Random(seed)), path)


def test_random_inputs_reach_both_sides_of_each_parser(valid, tmp_path):
    """The generators are not all-refused noise: each parser both accepts and refuses some."""
    path, data = valid
    rng = random.Random(0)
    chunks = {fuzz.check_chunk(*fuzz.random_chunk(rng), tmp_path) for _ in range(300)}
    manifests = {fuzz.check_manifest(fuzz.random_manifest(data, rng), path) for _ in range(600)}
    assert {"decoded", "refused"} <= chunks
    assert {"loaded", "refused", "refused-on-load"} <= manifests
