"""How the command line shows results: JSON for scripts, rich tables in a terminal, plain
aligned text when stdout is a pipe or file, and progress bars on stderr only in a terminal.

Every subcommand builds one JSON-able document and hands it here, so ``--json`` and the human
views always agree on what was found.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence


def jsonable(value):
    """``value`` with non-finite floats as strings: JSON has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def human_bytes(n: int | None) -> str:
    """``1.5 MiB`` style sizes."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def human_number(value) -> str:
    """A metric or difference, short: 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Output:
    """Where one command's results go (read from ``sys.stdout`` at construction, so tests that
    capture stdout see them).

    Args:
        as_json: print one JSON document instead of tables and lines.
    """

    def __init__(self, as_json: bool = False):
        self.as_json = as_json
        self.stream = sys.stdout
        self.tty = _isatty(self.stream)

    def json(self, doc) -> None:
        """Print ``doc`` as JSON (only in ``--json`` mode does a command call this)."""
        print(json.dumps(jsonable(doc), indent=2, sort_keys=False), file=self.stream)

    def line(self, text: str = "") -> None:
        """One line of human text."""
        print(text, file=self.stream)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence], title: str | None = None
              ) -> None:
        """A table: rich in a terminal, aligned plain text otherwise."""
        cells = [[str(c) for c in row] for row in rows]
        if self.tty:
            from rich.console import Console
            from rich.table import Table
            table = Table(*columns, title=title)
            for row in cells:
                table.add_row(*row)
            Console(file=self.stream).print(table)
            return
        if title:
            self.line(title)
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        for row in [list(columns)] + cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

    @contextmanager
    def progress(self, description: str, total: float | None = None
                 ) -> Iterator[Callable[[float], None]]:
        """A progress bar on stderr while the block runs (a spinner when ``total`` is None);
        yields ``advance(amount)``. Silent unless stderr is a terminal, so logs and pipes
        never fill with bar redraws."""
        if not _isatty(sys.stderr):
            yield lambda amount: None
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeRemainingColumn)
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if total is not None:
            columns += [DownloadColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda amount: bar.advance(task, amount)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
