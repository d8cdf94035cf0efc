"""Rendering: rich tables and progress bars in a terminal, plain text in a pipe."""

import io

import torch

import shardckpt
from shardckpt.cli import output


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_rich_tables_and_progress(ckpt, monkeypatch, capsys):
    shardckpt.save({"w": torch.arange(1000.0)}, ckpt)
    monkeypatch.setattr(output, "_isatty", lambda stream: True)
    from shardckpt import cli
    assert cli.main(["inspect", str(ckpt)]) == 0
    assert cli.main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "┃" in out or "│" in out  # rich's box drawing, not the plain layout


def test_plain_table_alignment():
    out = output.Output()
    out.stream, out.tty = io.StringIO(), False
    out.table(["a", "long name"], [[1, "x"], ["wide value", 2]])
    assert out.stream.getvalue().splitlines() == [
        "a           long name", "1           x", "wide value  2"]


def test_jsonable_and_sizes():
    assert output.jsonable({"x": [float("inf"), float("nan"), 1.5]}) == {"x": ["inf", "nan", 1.5]}
    assert output.human_bytes(512) == "512 B" and output.human_bytes(3 << 20) == "3.0 MiB"
