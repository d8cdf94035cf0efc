"""Preemption signals: note them, never act inside the handler, and bound the time to exit.

Schedulers announce preemption with a signal (SLURM ``--signal=TERM@<grace>``, Kubernetes and
torchrun's agent send SIGTERM) and kill the job a grace period later. The handler here only
records the signal; the training loop's next ``CheckpointManager.maybe_save`` sees it, all ranks
agree, save, commit and stop. Doing the save inside the handler would run it in the middle of
whatever the main thread was doing (an optimizer step, a collective).

A second delivery of the same signal is expected (torchrun forwards the group's SIGTERM to its
workers, which already got it directly) and only re-records it: the save in progress goes on.
From the first signal a watchdog allows ``grace_seconds``; if the preemption checkpoint has not
committed by then the process exits with ``EXIT_GRACE_EXPIRED``. That never damages a committed
checkpoint (commits are atomic), and a process that exits by itself is better than one the
scheduler kills in the middle of reporting.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

#: Exit status of a training process that saved a checkpoint because it was preempted: a
#: launcher should restart (requeue) it. 75 is ``EX_TEMPFAIL`` of sysexits.h.
EXIT_PREEMPTED = 75
#: Exit status when the preemption checkpoint could not commit within the grace period; the
#: previous checkpoint is intact, so a restart resumes from it.
EXIT_GRACE_EXPIRED = 76


class PreemptionWatcher:
    """Signal handlers that set a flag, chained to the handlers they replace.

    Args:
        signals: the signals to watch (installed on construction; main thread only).
        grace_seconds: from the first signal, how long the process may take to commit its
            checkpoint before it exits with ``EXIT_GRACE_EXPIRED``; None: no deadline.
    """

    def __init__(self, signals=(signal.SIGTERM,), grace_seconds: float | None = None):
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("preemption handlers can only be installed from the main thread "
                             "(pass handle_preemption=False elsewhere)")
        self.grace_seconds = grace_seconds
        self.signal_number: int | None = None
        self.signalled_at: float | None = None
        self.count = 0
        self._done = threading.Event()  # the preemption checkpoint committed, or closed
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def pending(self) -> bool:
        """A preemption signal arrived in this process."""
        return self.signal_number is not None

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signal_number is None:
            self.signal_number = signum
            print(f"[shardckpt] received signal {signum}: saving a checkpoint at the next "
                  "maybe_save, then stopping", file=sys.stderr, flush=True)
            self.arm()
        previous = self._previous.get(signum)
        # Python-level handlers the program installed before us still run. The default action
        # (terminate) does not: deferring it is the point. default_int_handler would raise
        # KeyboardInterrupt into the save, so it is not chained either.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def arm(self) -> None:
        """Start the grace period, once: on the first signal here, or when the ranks agreed on
        a preemption that another rank was signalled for (this rank must also commit or exit
        in time, not hang in a collective with ranks that have gone)."""
        if self.signalled_at is not None:
            return
        self.signalled_at = time.monotonic()
        if self.grace_seconds is not None:
            threading.Thread(target=self._watchdog, name="shardckpt-preemption-watchdog",
                             daemon=True).start()

    def _watchdog(self) -> None:
        if self._done.wait(self.grace_seconds):
            return
        print(f"[shardckpt] the preemption checkpoint did not commit within "
              f"{self.grace_seconds:g} s of the preemption signal; exiting with status "
              f"{EXIT_GRACE_EXPIRED} (committed checkpoints are intact)",
              file=sys.stderr, flush=True)
        os._exit(EXIT_GRACE_EXPIRED)

    def committed(self) -> None:
        """The preemption checkpoint is durable: the watchdog stands down."""
        self._done.set()

    def close(self) -> None:
        """Put the replaced handlers back and stop the watchdog."""
        self._done.set()
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
