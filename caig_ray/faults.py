"""Injected faults for the stress tests (``online.faults``): each fires at most once per job.

A fault leaves a marker file when it fires, so the actor Ray restarts (whose ``__init__`` runs
again, counting from zero) does not die a second time. Never armed unless a config asks for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def should_fire(marker_dir: str | None, name: str) -> bool:
    """True exactly once per (marker_dir, name): atomically claims the marker file."""
    if not marker_dir:
        return False
    Path(marker_dir).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(Path(marker_dir) / f"{name}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def fired(marker_dir: str | None, name: str) -> bool:
    return bool(marker_dir) and (Path(marker_dir) / f"{name}.fired").exists()


class BatchFault:
    """Counts the batches an actor processed; after ``after`` of them, the process exits (once per job)."""

    def __init__(self, marker_dir: str | None, name: str, after: int | None):
        self.marker_dir, self.name, self.after, self.count = marker_dir, name, after, 0

    @classmethod
    def of(cls, faults, name: str, after_field: str, armed: bool = True) -> "BatchFault":
        """The fault ``online.faults.<after_field>`` (a ``FaultConfig``; None: never armed) for role ``name``."""
        if faults is None or not armed:
            return cls(None, name, None)
        return cls(faults.marker_dir, name, getattr(faults, after_field))

    def tick(self) -> None:
        self.count += 1
        if self.after is not None and self.count >= self.after and should_fire(self.marker_dir, self.name):
            os._exit(1)  # a hard crash: no cleanup, no exception for Ray to report gracefully
