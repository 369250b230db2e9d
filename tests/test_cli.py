"""The CLI as scripts use it: the result alone on stdout (one JSON document), logs on stderr, a fast
``--help`` that loads no model stack, ``--version``, no traceback on a closed pipe, and a quiet log
when another Ray runs on the host."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "caig_ray.jobs.cli"]
HEAVY = ("torch", "ray", "transformers", "diffusers", "deepspeed", "matplotlib")


@pytest.mark.parametrize("command", ["train", "train-rm", "pretrain-pm", "evaluate-rm", "generate", "make-world",
                                     "demo", "config", "serve", "report"])
def test_help_loads_no_model_stack(command):
    code = ("import sys\nfrom caig_ray.jobs.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", (command, res.stdout[-300:])  # nothing heavy imported
    assert "usage:" in res.stdout and wall < 10  # the bound that matters is the import list above


def test_version_and_a_closed_pipe():
    res = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and re.fullmatch(r"caig-ray \d+\.\d+\.\d+\S*\n", res.stdout)
    proc = subprocess.Popen([*CLI, "config", "show", "--preset", "gpu-cluster"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_make_world_stdout_is_one_json_document(tmp_path):
    res = subprocess.run([*CLI, "make-world", "--preset", "quick", "--no-models", "--out", str(tmp_path / "w")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)  # the whole of stdout, nothing before or after
    assert summary["n_products"] == 40
    assert res.stderr.splitlines()[0] == "caig-ray make-world: config preset quick"
    assert "world written to" in res.stderr


# The interrupt SIGTERM raises is dropped when the handler runs inside a weakref callback (Python prints
# "Exception ignored in" and goes on): the watcher delivers it again; a clean-up in a ``finally`` that
# outlasts the watcher's looks is not interrupted a second time.
_DROPPED_INTERRUPT = """
import os, signal, sys, time, weakref
from caig_ray.jobs._signals import SIGTERM_RECEIVED, interrupt_reached_entry_point, stop_on_sigterm
stop_on_sigterm()
class Sink: pass
def callback(ref):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the handler runs between these bytecodes, inside the callback
        pass
obj = Sink()
ref = weakref.ref(obj, callback)
t0 = time.monotonic()
try:
    del obj
    print("dropped", flush=True)
    while time.monotonic() - t0 < 15:
        time.sleep(0.05)
    print("never re-delivered")
    sys.exit(1)
except KeyboardInterrupt as e:
    interrupt_reached_entry_point()
    print("stopped", e, len(SIGTERM_RECEIVED), flush=True)
"""
_LONG_CLEAN_UP = """
import os, signal, time
from caig_ray.jobs._signals import SIGTERM_RECEIVED, interrupt_reached_entry_point, stop_on_sigterm
stop_on_sigterm()
try:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    finally:
        time.sleep(3.5)  # longer than two of the watcher's looks
        print("clean-up done", flush=True)
except KeyboardInterrupt as e:
    interrupt_reached_entry_point()
    print("stopped", e, len(SIGTERM_RECEIVED), flush=True)
"""


def test_a_dropped_sigterm_interrupt_is_delivered_again_and_a_clean_up_is_not_interrupted():
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in (_DROPPED_INTERRUPT, _LONG_CLEAN_UP)]  # side by side: each mostly waits
    (dropped_out, dropped_err), (clean_up_out, clean_up_err) = (p.communicate(timeout=60) for p in procs)
    assert procs[0].returncode == 0, (dropped_out, dropped_err[-2000:])
    assert "Exception ignored in" in dropped_err  # the first interrupt was dropped, as in the CI run
    assert dropped_out.splitlines() == ["dropped", "stopped SIGTERM 2"]
    assert procs[1].returncode == 0, clean_up_err[-2000:]
    assert clean_up_out.splitlines() == ["clean-up done", "stopped SIGTERM 1"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_a_running_job_like_ctrl_c(quick_world, tmp_path):
    """SIGTERM while train-rm trains (after ray.init, which installs a handler of its own): the job's
    clean-up runs, one line says so, exit 143; no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as e:
        proc = subprocess.Popen([*CLI, "train-rm", "--preset", "quick", "--world", str(quick_world.root),
                                 "--out", str(tmp_path / "rm"), "--epochs", "50"],
                                stdout=subprocess.PIPE, stderr=e, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Started a local Ray instance" not in err.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        time.sleep(5)  # inside the job (Ray Train starting its workers)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = err.read_text(errors="replace")
    assert proc.returncode == 143, (proc.returncode, log[-3000:])
    assert "caig-ray train-rm: stopped by SIGTERM; what it started is shut down" in log
    assert "Traceback" not in log and out == b""  # no result: the job did not finish
    assert not (tmp_path / "rm").exists()
