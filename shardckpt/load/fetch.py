"""Fetch from an object store: concurrent ranged GETs of runs of adjacent chunks, each run
decoded (and CRC-checked) by the codec backend."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .. import codecs, knobs
from ..format.opening import RemoteFile


def read_chunks(rf: RemoteFile, reads: list[tuple], threads: int) -> tuple:
    """``codecs.backend.read_chunks`` for a RemoteFile: concurrent ranged GETs of runs of
    adjacent chunks, each decoded by the backend. Returns the first failing status (its chunk
    index into ``reads``) or OK."""
    order = sorted(range(len(reads)), key=lambda i: reads[i][0])
    ranges = _ranges(reads, order, knobs.get("upload_part_bytes"))

    def fetch(run: list[int]) -> tuple:
        start = reads[run[0]][0]
        end = max(reads[i][0] + reads[i][1] for i in run)
        data = rf.storage.read(rf.path, start, end - start)
        local = [(reads[i][0] - start,) + tuple(reads[i][1:]) for i in run]
        code, message, chunk, err = codecs.backend.decode_chunks(data, rf.rel, local, threads)
        return code, message, run[chunk] if chunk >= 0 else chunk, err

    with ThreadPoolExecutor(min(max(len(ranges), 1), knobs.get("remote_concurrency"))) as pool:
        for status in pool.map(fetch, ranges):
            if status[0] != 0:
                return status
    return (0, "", -1, 0)


def _ranges(reads: list[tuple], order: list[int], limit: int) -> list[list[int]]:
    """Indices of ``reads`` grouped into runs of back-to-back byte ranges up to ``limit``."""
    runs, run, start, end = [], [], 0, 0
    for i in order:
        offset, length = reads[i][0], reads[i][1]
        if run and offset == end and offset + length - start <= limit:
            run.append(i)
            end = offset + length
            continue
        if run:
            runs.append(run)
        run, start, end = [i], offset, offset + length
    if run:
        runs.append(run)
    return runs
