"""Which run a run folder holds (``run.json``, a ``RunRecord``): a fresh run claims only an unused folder;
``--resume`` continues only the run named there while it has rounds left (docs/operations.md)."""

from __future__ import annotations

import logging
import time

from caig_ray.online import RunRecord
from caig_ray.storage import Output, OutputInUse, atomic_write_text, is_used, new_run_id, refuse_used

logger = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def claim_run_folder(store: Output, rounds: int, resume: bool) -> RunRecord:
    """The run this job is: a new one in an unused folder, or (``resume``) the one the folder holds while
    it has rounds left to train (``rounds``: the job's ``online.rounds``). Nothing of another run is reused
    or replaced: a used folder without ``resume``, a folder of something else, a finished run are refused
    (``OutputInUse``, naming the remedy)."""
    held = store.child("run.json")
    record = RunRecord.from_json(held.local.read_text()) if held.download() else None
    if not resume:
        if record is None:
            remedy = "give a new --out (an unused folder)"
        elif record.status == "finished":
            remedy = f"it holds {record.describe()}; pass a new --out"
        else:
            remedy = f"it holds {record.describe()}: pass --resume to continue it, or a new --out"
        refuse_used(store, remedy)
    elif record is None and is_used(store):
        raise OutputInUse(f"--resume: {store} holds no caig-ray run (no run.json): give the run's own folder, "
                          "or a new --out")
    elif record is not None:
        if record.status == "finished":
            raise OutputInUse(f"--resume: {record.describe()}; pass a new --out")
        if record.rounds_done >= rounds:  # stopped after its last checkpoint, before its policy was saved
            logger.warning("--resume: finishing %s: its policy is saved from the last checkpoint", record.describe())
        else:
            logger.warning("--resume: continuing %s to round %d", record.describe(), rounds)
        record.rounds = rounds
        return record
    else:
        logger.warning("--resume: %s is empty: starting a new run", store)
    return RunRecord(run_id=new_run_id(), started_at=_now(), rounds=rounds)


def write_run_record(store: Output, record: RunRecord, finished: bool = False, **changes) -> None:
    """Update ``record`` (``finished``: status and time) and write it to the folder and its store."""
    for k, v in changes.items():
        setattr(record, k, v)
    if finished:
        record.status, record.finished_at = "finished", _now()
    atomic_write_text(store.local / "run.json", record.to_json())
    store.child("run.json").upload()
