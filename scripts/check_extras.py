"""Checks that every integration's framework imports in this environment, side by side.

Usage:
    .venv/bin/python scripts/check_extras.py [--torch 2.13.0]

scripts/setup.sh runs it after installing the ``test`` extra and torchtitan (``--no-deps``):
installing one framework must not break another's import (torchtitan's metadata alone would
move huggingface-hub and fsspec back). Each import runs in a fresh interpreter, so one module's
side effects cannot hide another's failure. Prints one line per framework with its version;
exits 1 when any fails to import or when torch is not the version given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# (distribution whose version is printed, the imports that must work)
FRAMEWORKS = [
    ("torch", "import torch"),
    ("transformers", "import transformers, transformers.modeling_utils"),
    ("huggingface_hub", "import huggingface_hub"),
    ("lightning", "import lightning.fabric.plugins.io.checkpoint_io"),
    ("accelerate", "import accelerate"),
    ("fsspec", "import fsspec"),
    ("s3fs", "import s3fs"),
    ("moto", "import moto"),
    ("tensorboard", "from torch.utils.tensorboard import SummaryWriter"),
    ("safetensors", "import safetensors.torch"),
    ("mlflow", "import mlflow"),
    ("wandb", "import wandb"),
    ("torchdata", "from torchdata.stateful_dataloader import StatefulDataLoader"),
    ("keras", "import keras; assert keras.backend.backend() == 'torch'"),
    ("torchtitan", "import torchtitan.components.checkpointer, "
                   "torchtitan.components.optimizer, torchtitan.components.dataloader"),
]


def check(dist: str, code: str) -> str | None:
    """The error of importing ``code`` in a fresh interpreter, or None."""
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch", help="the torch version that must still be installed")
    args = p.parse_args()
    from importlib.metadata import PackageNotFoundError, version
    failed = 0
    for dist, code in FRAMEWORKS:
        try:
            have = version(dist)
        except PackageNotFoundError:
            have = "not installed"
        error = check(dist, code)
        print(f"check_extras: {dist:16} {have:14} {'ok' if error is None else error}")
        failed += error is not None
    if args.torch and not version("torch").startswith(args.torch):
        print(f"check_extras: torch is {version('torch')}, not {args.torch}: an extra replaced "
              "it", file=sys.stderr)
        failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
