"""Issue 25 case 6: ``shardckpt ls`` (and ``ls --plot``) names as best the checkpoint the
manager itself ranks best, for ``mode="max"`` as for ``"min"``: the manager records its
``monitor`` and ``mode`` in the root, and a root without the record keeps the old rule (lower is
better), said to be assumed."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from shardckpt import cli
from shardckpt.manage.manager import CheckpointManager


def _ls(root, capsys, *extra):
    import json
    capsys.readouterr()
    assert cli.main(["ls", str(root), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _fill(root, values, mode, monitor="acc"):
    with CheckpointManager(root, async_save=False, handle_preemption=False, monitor=monitor,
                           mode=mode) as mgr:
        for step, value in enumerate(values, 1):
            mgr.save(step, {"w": torch.full((4,), float(step))}, {monitor: value})
        return mgr.best_step()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=6,
                       unique=True),
       mode=st.sampled_from(["min", "max"]))
def test_ls_best_is_the_managers_best(tmp_path_factory, capsys, values, mode):
    root = tmp_path_factory.mktemp("root")
    best = _fill(root, values, mode)
    doc = _ls(root, capsys)
    assert (doc["best"], doc["mode"], doc["mode_source"]) == (best, mode, "manager")
    assert [r["step"] for r in doc["checkpoints"] if r["best"]] == [best]


def test_higher_is_better_example_and_the_text_output(tmp_path, capsys):
    best = _fill(tmp_path, [0.50, 0.90, 0.70], "max")
    assert best == 2
    capsys.readouterr()
    assert cli.main(["ls", str(tmp_path)]) == 0
    assert "best by acc (max): 2" in capsys.readouterr().out


def test_options_override_and_old_roots_say_assumed(tmp_path, capsys):
    _fill(tmp_path, [0.50, 0.90, 0.70], "max")
    assert _ls(tmp_path, capsys, "--mode", "min")["best"] == 1  # an explicit option wins
    os.remove(tmp_path / ".manager.json")  # a root written before the record existed
    doc = _ls(tmp_path, capsys)
    assert (doc["best"], doc["mode"], doc["mode_source"]) == (1, "min", "assumed")
    capsys.readouterr()
    cli.main(["ls", str(tmp_path)])
    assert "mode assumed" in capsys.readouterr().out


def test_plot_marks_the_managers_best(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from shardckpt.cli import plot
    _fill(tmp_path, [0.50, 0.90, 0.70], "max")
    drawn = {}
    real = plot.draw
    monkeypatch.setattr(plot, "draw", lambda doc, dest: (drawn.update(doc), real(doc, dest)))
    capsys.readouterr()
    assert cli.main(["ls", str(tmp_path), "--plot", str(tmp_path / "h.png")]) == 0
    assert drawn["best"] == 2 and drawn["mode"] == "max"
    assert (tmp_path / "h.png").stat().st_size > 0


def test_record_is_written_atomically_and_only_when_it_changes(tmp_path):
    _fill(tmp_path, [1.0, 2.0], "max")
    first = os.stat(tmp_path / ".manager.json")
    _fill(tmp_path, [1.0, 2.0], "max")  # same settings: not rewritten
    assert os.stat(tmp_path / ".manager.json").st_ino == first.st_ino
    _fill(tmp_path, [1.0, 2.0], "min")  # changed: replaced by a rename (a new inode)
    assert os.stat(tmp_path / ".manager.json").st_ino != first.st_ino
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
