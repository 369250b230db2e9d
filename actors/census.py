"""``PoolCensus``: how many of our pool actors are up, counted by the actors themselves.

The online loop traces its renderer and scorer pools' sizes while a round runs (the run summary's
``renderer_pool_trace``, the report's pool plot). Ray Data grows and shrinks those pools itself and
publishes no size while it runs; Ray's actor table is readable only through the state API (which
needs the dashboard, off on a local instance) or a private module. So each pool actor reports
itself: once its model is loaded it tells the census every ``every_s`` seconds that it is up
(``report_alive``, a daemon thread in the actor's process), and the census counts the actors heard
from within ``stale_s``. An actor that stops -- released by the pool, killed, crashed -- drops out of
the count ``stale_s`` later; one that Ray restarts reports again under the same actor id.

The census holds no handle to a pool actor (a handle would keep a released actor alive); the pipeline
drops its own handle when it closes, and the census ends with the last pool actor holding one.
"""

from __future__ import annotations

import threading
import time

import ray

REPORT_EVERY_S = 0.2  # how often a pool actor reports
STALE_S = 1.0  # not heard from for this long: no longer counted (several missed reports)


@ray.remote(num_cpus=0, max_restarts=0)
class PoolCensus:
    """The pool actors heard from lately, by kind (``renderer``, ``scorer``)."""

    def __init__(self, stale_s: float = STALE_S):
        self.stale_s = stale_s
        self.last_heard: dict[tuple[str, str], float] = {}  # (kind, actor id) -> monotonic time

    def report(self, kind: str, actor_id: str) -> None:
        self.last_heard[(kind, actor_id)] = time.monotonic()

    def sizes(self) -> dict[str, int]:
        """Actors of each kind heard from within ``stale_s`` seconds."""
        now = time.monotonic()
        counts: dict[str, int] = {}
        for (kind, _), t in self.last_heard.items():
            if now - t <= self.stale_s:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


def report_alive(census, kind: str, every_s: float = REPORT_EVERY_S) -> None:
    """In a Ray actor: tell ``census`` (a ``PoolCensus`` handle, or None: no census) every ``every_s``
    seconds, from a daemon thread, that this actor is up. Call it at the end of ``__init__``: an actor
    counts once its model is loaded, as Ray counts it alive once its constructor returned."""
    if census is None:
        return
    actor_id = ray.get_runtime_context().get_actor_id()

    def loop() -> None:
        while True:
            try:
                ray.get(census.report.remote(kind, actor_id), timeout=10)
            except ray.exceptions.GetTimeoutError:
                pass  # a slow answer: report again next time
            except Exception:  # noqa: BLE001 -- the census is gone (its pipeline closed): nothing to report to
                return
            time.sleep(every_s)

    threading.Thread(target=loop, name=f"pool-census-{kind}", daemon=True).start()
