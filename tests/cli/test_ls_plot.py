"""``shardckpt ls ROOT --plot FILE.png``: a PNG of the history, and a one-line error without
matplotlib."""

import importlib.util
import os
import sys

import pytest
import torch

from tests.cli.conftest import save_step

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="needs shardckpt[plot]")


def _history(root):
    for i, step in enumerate((100, 200, 300, 400)):
        save_step(root, step, {"w": torch.randn(2000 * (i + 1))},
                  metrics={"val_loss": [0.9, 0.5, 0.7, 0.6][i]})
    os.makedirs(f"{root}/step-00000500")  # an interrupted save


@needs_mpl
def test_plot_draws_the_history(root, run, tmp_path):
    _history(root)
    png = tmp_path / "history.png"
    status, out, _ = run("ls", root, "--plot", png)
    assert status == 0 and f"plotted to {png}" in out
    import matplotlib.image
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 800  # two panels
    # The best checkpoint's star is drawn in gold (and nothing else is gold).
    gold = (image[..., 0] > 0.95) & (image[..., 1] > 0.75) & (image[..., 2] < 0.1)
    assert gold.sum() > 100
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@needs_mpl
def test_plot_without_metrics_has_one_panel(root, run, tmp_path):
    save_step(root, 1, {"w": torch.ones(10)})
    status, _, _ = run("ls", root, "--plot", tmp_path / "one.png", "--json")
    import matplotlib.image
    assert status == 0 and matplotlib.image.imread(tmp_path / "one.png").shape[0] < 500


def test_plot_without_matplotlib_names_the_pip_command(root, run, tmp_path, monkeypatch):
    _history(root)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, err = run("ls", root, "--plot", tmp_path / "x.png")
    assert status == 1 and "pip install 'shardckpt[plot]'" in err and len(err.splitlines()) == 1
