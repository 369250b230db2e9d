"""Checkpoints in storage and the rule for what a resumed run may change."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from caig_ray.config import CaigConfig, ConfigError
from caig_ray.loop.protocols import Policy
from caig_ray.online import RunState
from caig_ray.storage import Output, atomic_write_text


RESUME_MAY_CHANGE = "online.rounds, online.faults, resources.renderers.sizing / idle_release_s and storage"


def check_same_run(saved: CaigConfig, now: CaigConfig, where: Path) -> None:
    """--resume must continue the same run: only online.rounds, online.faults, how the renderer pool is
    sized (it renders the same pairs either way: tests/test_online_loop.py) and storage (a run copied to
    another store) may change."""
    a, b = saved.model_dump(mode="json"), now.model_dump(mode="json")
    for d in (a, b):
        d["online"].pop("rounds"), d["online"].pop("faults"), d.pop("storage")
        d["resources"]["renderers"].pop("sizing"), d["resources"]["renderers"].pop("idle_release_s")
    if a != b:
        diff = sorted(
            f"{sec}.{k}" if isinstance(a[sec], dict) else sec
            for sec in a for k in (a[sec] if isinstance(a[sec], dict) else [sec])
            if (a[sec].get(k) != b[sec].get(k) if isinstance(a[sec], dict) else a[sec] != b[sec]))
        raise ConfigError(f"--resume with a config that differs from the run's {where}: {', '.join(diff) or 'name'}; "
                          f"only {RESUME_MAY_CHANGE} may change")


def run_checkpoints(store: Output, run_id: str) -> list[str]:
    """Names of the run's complete checkpoints in storage, oldest first: ``round_XXX`` holding a
    ``state.json`` of this run (``RunState.run_id``) -- another run's files are never counted."""
    ckpts, done = store.child("checkpoints"), []
    for n in ckpts.listdir():
        state = ckpts.child(f"{n}/state.json")
        if n.startswith("round_") and state.exists() and state.download():
            if RunState.from_json(state.local.read_text()).run_id == run_id:
                done.append(n)
    return sorted(done, key=lambda n: int(n.removeprefix("round_")))  # by round: round_1000 after round_999


class Checkpoints:
    """Checkpoints in storage: every rank's part of the weights and optimizer, then ``state.json``
    (a ``RunState``) written last -- a checkpoint without it is incomplete and ignored."""

    def __init__(self, store: Output, keep: int, run_id: str, resume: bool):
        self.store, self.keep, self.run_id = store, keep, run_id
        done = run_checkpoints(store, run_id) if resume else []
        if resume and not done:
            print(f"--resume: no checkpoint of run {run_id} under {store.child('checkpoints')}; starting from round 0",
                  file=sys.stderr)
        self.latest = store.child(f"checkpoints/{done[-1]}") if done else None

    def restored_state(self) -> RunState:
        """The loop's state at the last checkpoint (a fresh one before the first)."""
        if self.latest is None:
            return RunState(run_id=self.run_id)
        return RunState.from_json((self.latest.local / "state.json").read_text())

    def load_into(self, group: Policy) -> None:
        if self.latest is not None:
            group.load(self.latest.local, self.latest.uri)

    def save(self, r: int, group: Policy, state: RunState) -> None:
        ckpt = self.store.child(f"checkpoints/round_{r:03d}")
        d = ckpt.local
        if d.exists():  # this run's own checkpoint of round r (a round re-run after a recovery): a folder holds one run
            shutil.rmtree(d)
        ckpt.delete()
        group.save(d, ckpt.uri)  # every rank's part; uploaded node by node with object-store storage
        # trained rounds leave the pending set; rounds sampled ahead (max_policy_lag) stay with their samples
        state.pending = {k: v for k, v in state.pending.items() if int(k) > r}
        self.store.upload(exclude=("checkpoints", "policy"))  # metrics, pairs, config: as far as this checkpoint
        atomic_write_text(d / "state.json", state.to_json())  # last: a checkpoint without it is incomplete, ignored
        ckpt.child("state.json").upload()
        self.latest = ckpt
        ckpts = self.store.child("checkpoints")
        for old in run_checkpoints(self.store, self.run_id)[:-self.keep]:  # this run's only
            shutil.rmtree(ckpts.local / old, ignore_errors=True)
            ckpts.child(old).delete()
