"""What a training job consumed, step by step: launch/train.py ``--record-indices DIR`` writes
it, and the data-position tests read it back to check that every sample index of every epoch
was trained on exactly once across preemptions, lost hosts and world-size changes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    """The indices one global step trained on, by the incarnation of the job that counts."""

    epoch: int
    world: int
    run: int                                   # the incarnation's start time (ns, rank 0's)
    ranks: dict[int, list[int]] = field(default_factory=dict)

    @property
    def indices(self) -> list[int]:
        return sorted(i for own in self.ranks.values() for i in own)


class Recorder:
    """Appends one line per step to ``<folder>/<run>-rank<rank>.txt``: ``step epoch world i,...``.

    Args:
        folder: where the files go (shared by every rank and every incarnation).
        run: an id every rank of this incarnation shares and a later incarnation exceeds
            (rank 0's start time, broadcast).
        rank: this process's rank.
        world: the world size.
    """

    def __init__(self, folder, run: int, rank: int, world: int):
        os.makedirs(folder, exist_ok=True)
        self.world = world
        self.file = open(Path(folder) / f"{run}-rank{rank}.txt", "a", buffering=1)

    def record(self, step: int, epoch: int, indices) -> None:
        """Note that this rank trained ``step`` (of ``epoch``) on ``indices``."""
        self.file.write(f"{step} {epoch} {self.world} {','.join(map(str, indices))}\n")


def read_steps(folder) -> tuple[dict[int, Step], dict[int, int]]:
    """Every step's record from the last incarnation that trained it (a step trained again after
    a resume replaces the lost one), and how many incarnations trained each step.

    Returns:
        ``({step: Step}, {step: incarnations})``.
    """
    lines: dict[int, dict[int, Step]] = {}
    for path in sorted(Path(folder).glob("*-rank*.txt")):
        run, rank = path.stem.split("-rank")
        for line in path.read_text().splitlines():
            step, epoch, world, indices = line.split(" ")
            runs = lines.setdefault(int(step), {})
            rec = runs.setdefault(int(run), Step(int(epoch), int(world), int(run)))
            rec.ranks[int(rank)] = [int(i) for i in indices.split(",") if i]
    return ({s: runs[max(runs)] for s, runs in lines.items()},
            {s: len(runs) for s, runs in lines.items()})


def exactly_once_problems(folder, windows: int, batch: int, epochs: int, seed: int = 0,
                          steps_per_epoch: int | None = None) -> list[str]:
    """What contradicts "every index of every epoch trained on exactly once, in the global
    batches of an uninterrupted run" in the records under ``folder`` (empty: nothing).

    The uninterrupted run's global batch ``k`` of epoch ``e`` is positions ``kB .. kB + B - 1``
    of ``randperm(windows)`` seeded with ``seed + e`` (launch/train.py's sampler, drop_last).

    Args:
        folder: the ``--record-indices`` folder.
        windows: samples in an epoch.
        batch: the global batch.
        epochs: how many epochs the job ran.
        seed: the sampler's seed.
        steps_per_epoch: default ``windows // batch``.
    """
    import torch
    per_epoch = steps_per_epoch or windows // batch
    steps, _ = read_steps(folder)
    problems = [f"steps {sorted(set(range(1, epochs * per_epoch + 1)) - set(steps))} missing"]
    problems = problems if len(steps) < epochs * per_epoch else []
    for epoch in range(epochs):
        order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed + epoch))
        order, consumed = order.tolist(), []
        for k in range(per_epoch):
            step = steps.get(epoch * per_epoch + k + 1)
            if step is None:
                continue
            consumed += step.indices
            if step.epoch != epoch or len(step.ranks) != step.world:
                problems.append(f"step {epoch * per_epoch + k + 1}: epoch {step.epoch}, "
                                f"{len(step.ranks)} of {step.world} ranks recorded")
            if step.indices != sorted(order[k * batch:(k + 1) * batch]):
                problems.append(f"step {epoch * per_epoch + k + 1}: global batch {step.indices}"
                                " is not the uninterrupted run's")
        if sorted(consumed) != sorted(order[:per_epoch * batch]):
            problems.append(f"epoch {epoch}: {len(consumed)} indices, "
                            f"{len(consumed) - len(set(consumed))} repeated")
    return problems
