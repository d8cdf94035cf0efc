"""The docs site builds with MkDocs (Material) with warnings as errors, so a broken link or
anchor in docs/ or in the root pages it includes fails here."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_PAGES = ("README.md", "FORMAT.md", "SECURITY.md", "RELIABILITY.md", "BENCHMARKS.md")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="needs mkdocs and mkdocs-material (pip install '.[docs]')")


def build(config_dir, site) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", os.path.join(config_dir, "mkdocs.yml"), "-d", str(site)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_site_builds_strict_with_the_root_pages(tmp_path):
    done = build(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", "guide/index.html", "cli/index.html", "FORMAT/index.html",
                 "SECURITY/index.html", "RELIABILITY/index.html", "BENCHMARKS/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="guide/' in index and "headline" in index.lower()


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "docs"), copy / "docs")
    shutil.copytree(os.path.join(REPO, "scripts"), copy / "scripts",
                    ignore=shutil.ignore_patterns("bench", "*.sh", "__pycache__"))
    for name in ROOT_PAGES + ("mkdocs.yml",):
        shutil.copy(os.path.join(REPO, name), copy / name)
    with open(copy / "docs" / "cli.md", "a") as f:
        f.write("\nSee [nowhere](no-such-page.md).\n")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr
