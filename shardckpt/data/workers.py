"""DataLoader workers that survive a preemption signal sent to the whole process group, yet exit
with the training process.

Schedulers (SLURM, Kubernetes, ``kill -TERM -- -PGID``) and torchrun's agent signal a process
group, and a DataLoader's workers belong to the training process's group. A worker killed by that
SIGTERM makes the training process raise ("DataLoader worker ... is killed by signal") wherever
it is, before its preemption checkpoint is saved. Ignoring SIGTERM in the workers is not enough:
a training process that exits on an exception ends its daemonic workers with SIGTERM too
(``multiprocessing``'s exit handler terminates, then joins them), and would wait forever. So a
worker ignores SIGTERM until its parent has started to exit: an ``atexit`` hook of the parent,
which runs before ``multiprocessing``'s, sets an event the workers inherited.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from typing import Callable

_exiting = None  # this process's "exiting" event, shared with the workers it starts


def preemption_safe(worker_init_fn: Callable[[int], None] | None = None) -> "PreemptionSafe":
    """A DataLoader ``worker_init_fn`` whose workers outlive a process-group SIGTERM.

    :meth:`DistributedSampler.track` installs it on the loader it iterates; pass
    ``worker_init_fn=preemption_safe(your_fn)`` yourself otherwise. Call it in the training
    process, before the loader starts its workers.

    Args:
        worker_init_fn: the loader's own ``worker_init_fn``, run after (None: nothing).

    Returns:
        a picklable callable for ``DataLoader(worker_init_fn=...)``.
    """
    return PreemptionSafe(worker_init_fn)


class PreemptionSafe:
    """See :func:`preemption_safe`.

    Args:
        inner: the loader's own ``worker_init_fn``, or None.
    """

    def __init__(self, inner: Callable[[int], None] | None = None):
        self.inner = inner
        self.exiting = _exiting_event()

    def __call__(self, worker_id: int) -> None:
        """Runs in each worker: install the SIGTERM handler, then the loader's own function."""
        global _exiting
        _exiting = self.exiting
        signal.signal(signal.SIGTERM, _on_sigterm)
        if self.inner is not None:
            self.inner(worker_id)


def shield(loader) -> None:
    """Make the workers ``loader`` starts from now on preemption-safe (idempotent)."""
    if getattr(loader, "num_workers", 0) > 0 and \
            not isinstance(loader.worker_init_fn, PreemptionSafe):
        loader.worker_init_fn = PreemptionSafe(loader.worker_init_fn)


def _exiting_event():
    global _exiting
    if _exiting is None:
        _exiting = multiprocessing.get_context().Event()
        atexit.register(_exiting.set)  # runs before multiprocessing's, registered earlier
    return _exiting


def _on_sigterm(signum, frame) -> None:
    if _exiting is not None and _exiting.is_set():  # the parent is exiting: die as asked
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # else: a preemption signal for the whole group; the training process decides when to stop
