"""``shardckpt ls ROOT --plot FILE.png``: the checkpoint history as a picture.

Top panel: stored size of each committed checkpoint against its step. Bottom panel (when a
metric is known): the monitored metric against the step. Kept checkpoints are filled dots,
the best one a star, the latest one ringed; interrupted or unreadable saves are crosses on the
size panel. Needs matplotlib (``pip install 'shardckpt[plot]'``).
"""

from __future__ import annotations

import os

from ..errors import MissingExtraError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("ls --plot needs the matplotlib package: "
                                "pip install 'shardckpt[plot]'") from None
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt
    return plt


def _metric_points(rows, monitor):
    return [(r["step"], r["metrics"][monitor]) for r in rows
            if r["metrics"] and isinstance(r["metrics"].get(monitor), (int, float))]


def draw(doc: dict, dest: str) -> None:
    """Write the PNG of ``ls``'s JSON document ``doc`` to ``dest`` (atomically)."""
    plt = _pyplot()
    rows = [r for r in doc["checkpoints"] if r["step"] is not None]
    kept = [r for r in rows if r["state"] == "committed"]
    broken = [r for r in rows if r["state"] != "committed"]
    monitor = doc["monitor"]
    points = _metric_points(kept, monitor) if monitor else []
    panels = 2 if points else 1
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(8, 3.2 * panels), squeeze=False)
    size_ax = axes[0][0]
    _size_panel(size_ax, kept, broken, doc)
    if points:
        _metric_panel(axes[1][0], points, doc)
    axes[-1][0].set_xlabel("step")
    fig.suptitle(f"{doc['root']}: {len(kept)} committed checkpoints")
    fig.tight_layout()
    tmp = f"{dest}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, dest)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bytes(row) -> int:
    return row["stored_bytes"] if row["stored_bytes"] is not None else row["bytes"] or 0


def _size_panel(ax, kept, broken, doc) -> None:
    biggest = max([_bytes(r) for r in kept + broken] or [0])
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                                           ("bytes", 1)) if biggest >= s or s == 1)

    def y(row):
        return _bytes(row) / scale
    ax.plot([r["step"] for r in kept], [y(r) for r in kept], "o-", color="tab:blue",
            label="committed (kept)")
    if broken:
        ax.plot([r["step"] for r in broken], [y(r) for r in broken], "x", color="tab:red",
                markersize=9, label="interrupted / unreadable")
    _mark(ax, kept, doc, y)
    ax.set_ylabel(f"stored {unit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _metric_panel(ax, points, doc) -> None:
    ax.plot([s for s, _ in points], [v for _, v in points], "o-", color="tab:green",
            label=doc["monitor"])
    by_step = dict(points)
    if doc["best"] in by_step:
        ax.plot([doc["best"]], [by_step[doc["best"]]], "*", color="gold", markersize=18,
                markeredgecolor="black", label=f"best ({doc['mode']})")
    ax.set_ylabel(doc["monitor"])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _mark(ax, kept, doc, y) -> None:
    by_step = {r["step"]: r for r in kept}
    if doc["best"] in by_step:
        ax.plot([doc["best"]], [y(by_step[doc["best"]])], "*", color="gold", markersize=18,
                markeredgecolor="black", label="best")
    if doc["latest"] in by_step:
        ax.plot([doc["latest"]], [y(by_step[doc["latest"]])], "o", markersize=14,
                markerfacecolor="none", markeredgecolor="black", label="latest")
