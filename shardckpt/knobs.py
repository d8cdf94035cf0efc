"""Tunables, in one place: each has a default, an environment override and what it trades.

Read them through :func:`get` so that an environment variable set after import still counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    env: str
    default: object
    doc: str


KNOBS = {
    "chunk_bytes": Knob("SHARDCKPT_CHUNK_BYTES", 4 << 20,
                        "Target size of one chunk. Smaller chunks let a resharding reader fetch "
                        "less and spread work over more threads; larger ones cost less metadata "
                        "and compress slightly better."),
    "pool_bytes": Knob("SHARDCKPT_POOL_BYTES", 256 << 20,
                       "Hard budget of the native staging pool (encode buffers). More lets "
                       "encoders run further ahead of a slow writer; it never grows past this."),
    "codec": Knob("SHARDCKPT_CODEC", "auto",
                  "'auto' compresses a chunk only while the writer is the bottleneck (never "
                  "slower than raw); 'zstd' always compresses (smallest files); 'raw' never."),
    "zstd_level": Knob("SHARDCKPT_ZSTD_LEVEL", 1,
                       "zstd level; negative levels are faster and compress less."),
    "encode_threads": Knob("SHARDCKPT_ENCODE_THREADS", 0,
                           "Encoder threads per writing process; 0 = one per core."),
    "write_threads": Knob("SHARDCKPT_WRITE_THREADS", 1,
                          "Writer threads per data file. One saturates a local disk; object "
                          "stores and network file systems like more."),
    "files_per_rank": Knob("SHARDCKPT_FILES_PER_RANK", 2,
                           "Data files each rank writes concurrently. A file system serializes "
                           "buffered writes to one file, so two files fill the page cache from "
                           "two cores; more only help on many-core hosts or remote stores."),
    "read_threads": Knob("SHARDCKPT_READ_THREADS", 0,
                         "Threads reading and decoding chunks on load; 0 = one per core."),
    "dist_timeout": Knob("SHARDCKPT_DIST_TIMEOUT", 600.0,
                         "Seconds a distributed save or load waits for the slowest rank before "
                         "declaring it failed. Must cover the slowest rank's whole write."),
    "replica_check_bytes": Knob("SHARDCKPT_REPLICA_CHECK_BYTES", 1 << 62,
                                "Plain (non-DTensor) tensors are taken as replicated across ranks; "
                                "up to this size each rank checksums its copy so that per-rank "
                                "tensors (RNG states) are kept per rank instead of dropped. GPU "
                                "tensors are checked only below 1 MiB (the check needs a copy)."),
    "grace_seconds": Knob("SHARDCKPT_GRACE_SECONDS", 25.0,
                          "After a preemption signal, how long the manager lets the preemption "
                          "checkpoint take before the process exits (status 76). Keep it below "
                          "the scheduler's kill delay (torchrun: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, "
                          "30 s by default; SLURM: the --signal lead time)."),
    "storage_retries": Knob("SHARDCKPT_STORAGE_RETRIES", 6,
                            "Retries of one object-store request after a transient error "
                            "(throttling, 5xx, connection reset, timeout) before the save or load "
                            "fails with StorageError. More rides out longer outages; a dead store "
                            "is reported later."),
    "storage_backoff": Knob("SHARDCKPT_STORAGE_BACKOFF", 0.2,
                            "Seconds before the first retry; each further retry waits twice as "
                            "long (capped at 10 s, with jitter so ranks do not retry in step)."),
    "upload_part_bytes": Knob("SHARDCKPT_UPLOAD_PART_BYTES", 32 << 20,
                              "Raw bytes encoded into one part of a multipart upload, and the "
                              "largest ranged GET on load. Larger parts mean fewer requests; "
                              "memory per rank is about this times remote_concurrency."),
    "remote_concurrency": Knob("SHARDCKPT_REMOTE_CONCURRENCY", 8,
                               "Parts uploaded, or ranges fetched, at once per data file on an "
                               "object store. More hides request latency; each holds a part in "
                               "memory."),
    "max_chunk_bytes": Knob("SHARDCKPT_MAX_CHUNK_BYTES", 1 << 31,
                            "Largest decoded chunk a reader accepts from a manifest (safety)."),
    "staging_pool_fraction": Knob("SHARDCKPT_STAGING_POOL_FRACTION", 0.125,
                                  "Share of async_save's staging_budget_bytes given to the "
                                  "native encode pool (never more than pool_bytes); the staging "
                                  "arena gets the rest, so a save adds about the budget. More "
                                  "lets zstd run further ahead; less stages larger batches."),
    "local_transfer_bytes": Knob("SHARDCKPT_LOCAL_TRANSFER_BYTES", 32 << 20,
                                 "Block size in which the local tier sends a data file to a "
                                 "replica node (and on restore fetches one). Each rank holds "
                                 "about one outgoing and one incoming block; larger blocks mean "
                                 "fewer gloo messages."),
    "background_nice": Knob("SHARDCKPT_BACKGROUND_NICE", 10,
                            "How much lower than the training the background save thread (and "
                            "the native encoders and writers it starts) runs, in nice steps. "
                            "On a host whose cores the training fills, this keeps a save from "
                            "slowing the steps; it then takes longer. 0 keeps equal priority. "
                            "The thread that copies guarded tensors is never lowered."),
    "share_reads": Knob("SHARDCKPT_SHARE_READS", "auto",
                        "1: a distributed load reads the manifest once per node and every chunk "
                        "that several ranks need once in the job; the ranks of a node take the "
                        "bytes from shared memory (/dev/shm), other nodes get them over gloo "
                        "(share.py, nodeshm.py). 0: every rank reads what it needs itself. "
                        "auto: 1 when the job spans several nodes (LOCAL_WORLD_SIZE < world "
                        "size, or SLURM's node count) or loads from an object store, else 0: "
                        "one node's page cache already reads each byte from the disk once."),
    "chunk_index": Knob("SHARDCKPT_CHUNK_INDEX", "auto",
                        "1: every rank writes its chunk rows into its own index file "
                        "data/rank-NNNNN.idx and regular DTensor layouts are described by rule "
                        "(FORMAT.md 3.7), so the coordinator's work and the manifest stay small "
                        "at thousands of ranks; 0: the inline form of revision 1.3 (every chunk "
                        "row in manifest.json); auto: 1 when several ranks save. Incremental "
                        "saves always use the inline form."),
    "share_round_bytes": Knob("SHARDCKPT_SHARE_ROUND_BYTES", 256 << 20,
                              "Stored bytes of shared chunks exchanged per all-to-all on load. "
                              "Each rank holds about this much (sent plus received) at once; "
                              "smaller rounds cost more collectives."),
    "lease_seconds": Knob("SHARDCKPT_LEASE_SECONDS", 30.0,
                          "Validity of a manager's lease on its root (renewed every third of "
                          "it). Shorter lets a job restarted on another host take the root "
                          "sooner after a crash; longer rides out longer storage stalls and "
                          "clock skew between hosts."),
}


def get(name: str):
    """The knob's value: its environment variable (parsed like the default) or the default."""
    knob = KNOBS[name]
    raw = os.environ.get(knob.env)
    if raw is None or raw == "":
        return knob.default
    return type(knob.default)(raw)
