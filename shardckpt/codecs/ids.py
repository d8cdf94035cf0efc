"""The codec chain kinds (FORMAT.md 2.1) by number, shared by the native core's bindings,
the reference codec and the chain mapping in ``shardckpt.codecs``."""

RAW, SHUFFLE, ZSTD, SHUFFLE_ZSTD = 0, 1, 2, 3
