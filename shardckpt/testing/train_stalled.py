"""launch/train.py with one save made to hang on one host, so that the host can die mid-save.

Run it in place of launch/train.py (``TRAIN=shardckpt/testing/train_stalled.py`` for
launch/torchrun.sh). Environment:
    SHARDCKPT_STALL_HOST   the hostname whose ranks hang (others train normally)
    SHARDCKPT_STALL_SAVE   which save of each process hangs, counting from 1 [2]
    SHARDCKPT_STALL_DIR    a folder every host sees: a hanging rank creates ``stalled-<rank>``
                           in it once its own data file was written (the save is under way,
                           nothing committed); while ``released`` exists there, nothing hangs
The ranks hang after writing their data, before they report to the coordinator: what a host
that loses power in the middle of a save leaves behind.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def _install() -> None:
    from shardckpt.save import pipeline as saver
    if socket.gethostname() != os.environ.get("SHARDCKPT_STALL_HOST"):
        return
    folder = Path(os.environ["SHARDCKPT_STALL_DIR"])
    target, calls = int(os.environ.get("SHARDCKPT_STALL_SAVE", "2")), [0]
    real = saver.write_data_files

    def stalling(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == target and not (folder / "released").exists():
            (folder / f"stalled-{os.environ.get('RANK', '0')}").touch()
            while not (folder / "released").exists():
                time.sleep(0.1)  # until the host is killed
        return result
    saver.write_data_files = stalling


if __name__ == "__main__":
    _install()
    sys.argv[0] = str(TRAIN)
    runpy.run_path(str(TRAIN), run_name="__main__")
