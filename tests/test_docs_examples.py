"""The Python examples of the how-to pages run as written: each page's ```python blocks in order,
in one namespace, in a fresh folder. A block right after ``<!-- not run: reason -->`` is
skipped (it needs what a test cannot have)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["policies.md", "resuming.md"]  # pages whose every example runs here
BLOCK = re.compile(r"(<!-- not run:[^>]*-->\s*)?```python\n(.*?)```", re.S)


def blocks(page: str) -> list[str]:
    """The runnable ```python blocks of ``page``, in order."""
    text = (DOCS / page).read_text()
    return [code for skip, code in BLOCK.findall(text) if not skip]


@pytest.mark.parametrize("page", PAGES)
def test_the_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page}"}
    found = blocks(page)
    assert found, f"{page} has no python example"
    for i, code in enumerate(found):
        try:
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page}, example {i + 1}:\n{code}") from exc
