"""The Python examples of the how-to pages run as written: every ```python block of the pages
below that is not marked ``<!-- not run: reason -->`` runs, in order, in one namespace per
page, inside a temporary working directory."""

import importlib.util
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")
# page -> the extra its examples need
PAGES = {"lightning.md": "lightning", "accelerate.md": "accelerate"}
BLOCK = re.compile(r"(<!--[^\n]*-->\n)?```python\n(.*?)```", re.S)


def examples(page: str) -> list[str]:
    """The runnable ```python blocks of ``page``."""
    with open(os.path.join(DOCS, page)) as fh:
        text = fh.read()
    return [code for note, code in BLOCK.findall(text) if "not run" not in note]


def test_every_block_is_run_or_says_why_not():
    for page in PAGES:
        with open(os.path.join(DOCS, page)) as fh:
            text = fh.read()
        for note, _ in BLOCK.findall(text):
            assert not note or "not run:" in note, (page, note)
        assert examples(page), page


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_examples_run(page, tmp_path, monkeypatch):
    if importlib.util.find_spec(PAGES[page]) is None:
        pytest.skip(f"needs shardckpt[{PAGES[page]}]")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.replace('.', '_')}"}
    for code in examples(page):
        exec(compile(code, f"docs/{page}", "exec"), namespace)
