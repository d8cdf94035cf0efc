"""A recording ``on_event`` callback importable by a dotted path (torchtitan's config names it
as a string): every ``CheckpointEvent`` it is handed, in order, with the thread it came on."""

import threading

EVENTS: list = []


def record(event) -> None:
    """Keep ``event`` and the name of the thread that reported it."""
    EVENTS.append((event, threading.current_thread().name))


class Recorder:
    """An instance per integration under test (``events``: what it was handed)."""

    def __init__(self):
        self.events = []

    def __call__(self, event) -> None:
        self.events.append((event, threading.current_thread().name))

    def of(self, kind: str) -> list:
        """``(step, path)`` of the events of ``kind``, in order."""
        return [(e.step, e.path) for e, _ in self.events if e.kind == kind]
