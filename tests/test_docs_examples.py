"""The Python examples of the docs pages (and of README.md) run as written, in a temporary folder.

Every ```python block of a page listed here runs, in order and in one namespace (a page's
examples build on each other); a block right below ``<!-- not run: reason -->`` is skipped.
"""

import importlib.util
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
# page -> the packages its examples need (skipped without them)
PAGES = {"policies.md": (), "resuming.md": (), "trackers.md": ("mlflow", "wandb"),
         "lightning.md": ("lightning",), "accelerate.md": ("accelerate",),
         "hf-trainer.md": ("transformers",), "hf-sft-subclass.md": ("transformers",),
         "hf-start-from-folder.md": ("transformers",),
         "keras.md": ("keras",), "guide.md": (), "cli.md": (),
         "../README.md": ()}  # torchtitan.md: its examples need a real trainer (not run)
BLOCK = re.compile(r"(<!-- not run:[^\n]*-->\s*)?```python\n(.*?)```", re.S)


def examples(page: str) -> list[str]:
    """The runnable Python blocks of ``docs/page``."""
    with open(os.path.join(DOCS, page)) as f:
        return [code for skip, code in BLOCK.findall(f.read()) if not skip]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_examples_run(page, tmp_path, monkeypatch, request):
    missing = [m for m in PAGES[page] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    if "mlflow" in PAGES[page]:  # the examples use $MLFLOW_TRACKING_URI when it is set
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("mlflow_server").url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    blocks = examples(page)
    assert blocks, f"docs/{page} has no runnable example"
    namespace: dict = {}
    try:
        for code in blocks:
            exec(compile(code, f"docs/{page}", "exec"), namespace)
    finally:
        if "mlflow" in PAGES[page]:
            import mlflow
            mlflow.set_tracking_uri(None)


def test_every_page_has_runnable_examples_and_skips_say_why():
    for page in PAGES:
        with open(os.path.join(DOCS, page)) as f:
            text = f.read()
        notes = re.findall(r"(<!--[^\n]*-->)\s*```python\n", text)
        assert all("not run:" in n and len(n) > len("<!-- not run: -->") for n in notes), page
        assert examples(page), f"docs/{page} has no runnable example"


def test_readme_is_short_and_maps_the_docs():
    """README.md stays a front page (at most 150 lines) and links every docs/ page."""
    with open(os.path.join(DOCS, "..", "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 150
    pages = sorted(p for p in os.listdir(DOCS) if p.endswith(".md"))
    assert [p for p in pages if f"docs/{p}" not in text] == []
