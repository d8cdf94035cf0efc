"""MkDocs hooks that put the repository's front pages into the site built from docs/.

README.md becomes the site's index and FORMAT, SECURITY, RELIABILITY and BENCHMARKS pages of
their own, read from the repository root, so that those files stay where GitHub readers find
them. Links are rewritten to match: ``docs/x.md`` in the root pages and ``../X.md`` in docs/
both become plain page links, so ``mkdocs build --strict`` checks them all.
"""

from __future__ import annotations

import os
import re

from mkdocs.structure.files import File

# repository file -> its page in the site
ROOT_PAGES = {"README.md": "index.md", "FORMAT.md": "FORMAT.md", "SECURITY.md": "SECURITY.md",
              "RELIABILITY.md": "RELIABILITY.md", "BENCHMARKS.md": "BENCHMARKS.md"}
_UP = re.compile(r"\]\(\.\./(README|FORMAT|SECURITY|RELIABILITY|BENCHMARKS)\.md")
_DOCS = re.compile(r"\]\(docs/")
_ROOT_LINK = re.compile(r"\]\((README)\.md")


def on_files(files, config):
    """Add the root pages to the site's files."""
    root = os.path.dirname(config.config_file_path)
    for source, page in ROOT_PAGES.items():
        files.append(File.generated(config, page, abs_src_path=os.path.join(root, source)))
    return files


def _up(match: re.Match) -> str:
    name = match.group(1)
    return "](" + ROOT_PAGES[f"{name}.md"]


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Rewrite the links that point across the docs/ boundary."""
    if page.file.src_uri in ROOT_PAGES.values():
        return _ROOT_LINK.sub("](index.md", _DOCS.sub("](", markdown))
    return _UP.sub(_up, markdown)
