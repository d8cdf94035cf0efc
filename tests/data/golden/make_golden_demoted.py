"""Writes the golden demoted pair of FORMAT.md revision 1.5 (section 3.6.4): the revision 1.3
incremental pair, then its base demoted to its ``model`` subtree while the newer checkpoint keeps
referencing the base's files.

Usage: python tests/data/golden/make_golden_demoted.py   (once: later readers must load the pair
as it is committed).
"""

import os
import shutil
import sys

try:
    from .make_golden_incremental import BASE, INCREMENTAL
    from .make_golden_incremental import ROOT as INCREMENTAL_ROOT
except ImportError:  # run as a script
    from make_golden_incremental import BASE, INCREMENTAL
    from make_golden_incremental import ROOT as INCREMENTAL_ROOT

ROOT = "v1.5-demoted"


def main() -> int:
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    from shardckpt.format.demote import demote
    from shardckpt.storage import open_storage
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(here, ROOT)
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(os.path.join(here, INCREMENTAL_ROOT), root)
    print(demote(open_storage(root), BASE), f"wrote {root} ({BASE} demoted, {INCREMENTAL} kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
