"""Every ```python block of the documentation pages listed here runs, each in a fresh namespace
in an empty folder (a block that cannot run carries ``<!-- not run: reason -->`` just above)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["resuming.md"]
BLOCK = re.compile(r"(<!-- not run: [^>]+-->\s*\n)?```python\n(.*?)```", re.S)


def blocks():
    for page in PAGES:
        for n, m in enumerate(BLOCK.finditer((DOCS / page).read_text())):
            if not m.group(1):
                yield pytest.param(m.group(2), id=f"{page}-{n}")


@pytest.mark.parametrize("code", list(blocks()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})
