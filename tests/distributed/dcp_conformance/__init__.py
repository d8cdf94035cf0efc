"""PyTorch's DCP tests (test/distributed/checkpoint/), adapted to run against shardckpt.integrations.dcp.Writer
and Reader on CPU/gloo. Each module names the upstream file it follows; what DCP asserts about its
own file format (``.metadata``, ``__0_0.distcp``, FileSystemWriter extensions) is left out, and
each module says why."""
