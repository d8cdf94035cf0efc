"""An HF weights folder into 2 FSDP2 ranks: shardckpt.load against DCP's HuggingFaceStorageReader.

Usage:
    python scripts/bench/hf_load.py [--hidden 512] [--layers 8] [--vocab 8192] [--reps 3] [--cold]

A randomly initialised Llama of the given size is written with ``save_pretrained`` (fp32,
several shards of 50 MB and an index). Each rep loads it into a fully_shard-ed Llama on 2 gloo
ranks with each contender, in alternating order: ``shardckpt.load(model, folder)``, and
``dcp.load(model.state_dict(), storage_reader=HuggingFaceStorageReader(folder))``. Reported per
contender, medians over reps: the wall time of the slowest rank from a common barrier, and the
bytes the two rank processes read by read(2)/pread(2) during the load (``rchar`` from
/proc/self/io; it also counts reads of gloo sockets, and misses reads through mmap, which is how
DCP's reader (safetensors ``safe_open``) gets its bytes), and the bytes they made the block
device deliver (``read_bytes``: mmap faults and readahead included, only meaningful with
``--cold``, which drops the page cache before each load and needs root), beside the bytes the
ranks' slices hold. The ``read / slices`` column divides rchar.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import harness as bh  # noqa: E402
from shardckpt.testing import run_with_ranks  # noqa: E402

CONTENDERS = ("shardckpt", "DCP HuggingFaceStorageReader")


def _config(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=128)


def _io() -> tuple[int, int]:
    """(rchar, read_bytes) of this process: bytes read by read(2)-like calls, and bytes it made
    the block device deliver (mmap page faults included; nothing when the page cache has it)."""
    with open("/proc/self/io") as fh:
        fields = dict(line.split(": ") for line in fh.read().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


def _load(rank, world, folder, sizes, who, cold):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import shardckpt
    torch.set_num_threads(1)
    model = LlamaForCausalLM(_config(*sizes))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sd = model.state_dict()
    slice_bytes = sum(v.to_local().numel() * v.element_size() for v in sd.values())
    if cold and rank == 0:
        bh.drop_page_cache()
    dist.barrier()
    io0, t0 = _io(), time.perf_counter()
    if who == "shardckpt":
        shardckpt.load(model, folder)
    else:
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(folder))
    seconds = time.perf_counter() - t0
    io1 = _io()
    dist.barrier()
    return {"seconds": seconds, "read": io1[0] - io0[0], "device": io1[1] - io0[1],
            "slice": slice_bytes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cold", action="store_true")
    a = p.parse_args()
    from transformers import LlamaForCausalLM
    sizes = (a.hidden, a.layers, a.vocab)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = os.path.join(tmp, "hf")
        torch.manual_seed(0)
        LlamaForCausalLM(_config(*sizes)).save_pretrained(folder, max_shard_size="50MB")
        total = bh.disk_bytes(folder)
        bh.log(f"folder: {total / bh.MIB:.1f} MiB in {len(os.listdir(folder))} files")
        records: dict[str, list] = {c: [] for c in CONTENDERS}
        for rep in range(a.reps):
            for who in bh.rotated(list(CONTENDERS), rep):
                res = run_with_ranks(2, _load, folder, sizes, who, a.cold, timeout=600)
                records[who].append({"seconds": max(r.value["seconds"] for r in res),
                                     "read": sum(r.value["read"] for r in res),
                                     "device": sum(r.value["device"] for r in res),
                                     "slice": sum(r.value["slice"] for r in res)})
                bh.log(f"rep {rep} {who}: {records[who][-1]}")
    rows = [[who, bh.fmt(bh.med(recs, "seconds"), ".3f"),
             bh.fmt(bh.med(recs, "read") / bh.MIB, ".1f"),
             bh.fmt(bh.med(recs, "device") / bh.MIB, ".1f"),
             bh.fmt(bh.med(recs, "slice") / bh.MIB, ".1f"),
             bh.fmt(bh.med(recs, "read") / bh.med(recs, "slice"), ".3f")]
            for who, recs in records.items()]
    print(f"HF folder {total / bh.MIB:.1f} MiB (fp32 Llama hidden {a.hidden}, {a.layers} layers, "
          f"vocab {a.vocab}) into 2 FSDP2 gloo ranks, {a.reps} reps, "
          f"{'cold' if a.cold else 'warm'} page cache")
    print(bh.table(["contender", "wall s", "rchar MiB", "device MiB", "slices MiB",
                    "read / slices"], rows))


if __name__ == "__main__":
    main()
