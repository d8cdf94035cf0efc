"""The how-to pages' Python examples run: each page's ```python blocks in order, in one
namespace, in a temporary folder; a block right under ``<!-- not run: reason -->`` is skipped."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# page -> the module its examples need
PAGES = {"hf-trainer.md": "transformers", "hf-sft-subclass.md": "transformers",
         "hf-start-from-folder.md": "transformers"}
BLOCK = re.compile(r"(<!--\s*not run:[^>]*-->\s*\n)?```python\n(.*?)```", re.S)


def blocks(page: str) -> list[str]:
    """The runnable ```python blocks of ``docs/page``."""
    with open(os.path.join(ROOT, "docs", page)) as fh:
        text = fh.read()
    return [code for skip, code in BLOCK.findall(text) if not skip]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_examples_run(page, tmp_path, monkeypatch):
    if importlib.util.find_spec(PAGES[page]) is None:
        pytest.skip(f"needs {PAGES[page]}")
    monkeypatch.chdir(tmp_path)
    found = blocks(page)
    assert found, f"{page} has no runnable example"
    namespace: dict = {}
    for code in found:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


def test_every_skipped_block_says_why():
    for page in PAGES:
        with open(os.path.join(ROOT, "docs", page)) as fh:
            for reason in re.findall(r"<!--\s*not run:([^>]*)-->", fh.read()):
                assert reason.strip(), page
