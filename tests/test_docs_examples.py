"""The docs' examples run: every ```python block of the pages listed here executes in a fresh
interpreter inside a temporary folder, unless an HTML comment ``<!-- not run: reason -->`` stands
right above it (then the reason must be given)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
# Pages whose examples are checked (add yours).
PAGES = ["keras.md", "torchtitan.md"]
BLOCK = re.compile(r"(?:<!--(?P<note>[^>]*)-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def blocks(page: str):
    """``(lang, code, note)`` of each fenced block of ``page``."""
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        text = f.read()
    for m in BLOCK.finditer(text):
        yield m.group("lang"), m.group("code"), (m.group("note") or "").strip()


CASES = [(page, i, code) for page in PAGES
         for i, (lang, code, note) in enumerate(blocks(page))
         if lang == "python" and not note.startswith("not run")]


def test_every_example_not_run_says_why():
    for page in PAGES:
        for lang, _, note in blocks(page):
            if lang in ("python", "bash") and note.startswith("not run"):
                assert note.removeprefix("not run").strip(": ").strip(), page
            elif lang == "bash":
                pytest.fail(f"{page}: a bash block is neither run here nor marked not run")


@pytest.mark.parametrize("page,index,code", CASES, ids=[f"{p}[{i}]" for p, i, _ in CASES])
def test_example_runs(tmp_path, page, index, code):
    if page == "keras.md" and importlib.util.find_spec("keras") is None:
        pytest.skip("needs shardckpt[keras]")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert done.returncode == 0, done.stderr[-3000:]
