"""Stop only the Ray processes this test run started: those whose command line names our own Ray
temp dir (gcs_server, raylet, dashboard, log monitor...) and every process below them (workers,
whose titles read ``ray::...``). A host-wide stop would also end other people's Ray clusters on
the host (a running job or demo included), so nothing here stops by a broad rule.

    python tests/ray_cleanup.py TEMP_DIR      (scripts/test.sh does this on exit)
"""

from __future__ import annotations

import contextlib
import os
import sys

import psutil


def own_ray_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes started under ``temp_dir`` and their descendants (not this process)."""
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_own_ray(temp_dir: str, timeout_s: float = 4, rounds: int = 5) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``, every process of ``own_ray_processes``; returns how many.

    The grace is short: a head's gcs_server and autoscaler monitor outlive SIGTERM for 18 s and more
    (measured: every other process is gone within 3 s), and nothing of a test's own cluster needs keeping.

    Repeated until none is left (at most ``rounds`` times) because a raylet that is still starting
    workers when the scan runs can spawn one more after it (seen in CI: one ``python3`` worker left)."""
    stopped: set[int] = set()
    for _ in range(rounds):
        procs = own_ray_processes(temp_dir)
        if not procs:
            break
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        stopped.update(p.pid for p in procs)
    return len(stopped)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].strip("/"):
        sys.exit("usage: python tests/ray_cleanup.py TEMP_DIR")
    n = stop_own_ray(sys.argv[1])
    print(f"ray cleanup: stopped {n} process(es) under {sys.argv[1]}")
