"""``caig-ray <command> ...``: runs the same entrypoints ``ray job submit -- python -m caig_ray.jobs.<name>``
runs on a cluster, here in the local process."""

from __future__ import annotations

import importlib
import os
import sys

from caig_ray.jobs._signals import SIGTERM_RECEIVED, interrupt_reached_entry_point, stop_on_sigterm

COMMANDS = {
    "make-world": ("caig_ray.jobs.make_world", "write the simulated market and tiny models to a folder"),
    "demo": ("caig_ray.jobs.demo", "the README demo on the embedded default"),
    "train-rm": ("caig_ray.jobs.train_rm", "train the reward model (Ray Train + DeepSpeed ZeRO)"),
    "pretrain-pm": ("caig_ray.jobs.pretrain_pm", "e-commerce SFT of the prompt model (TRL SFTTrainer + DeepSpeed)"),
    "train": ("caig_ray.jobs.train", "the online loop: sample, render, RM-score, DPO+PCPO train (Ray Data + DeepSpeed)"),
    "report": ("caig_ray.jobs.report", "write report.html for an online run folder"),
    "generate": ("caig_ray.jobs.generate", "write, render and rank ads for every product of a catalog"),
    "serve": ("caig_ray.jobs.serve", "live RM scoring over HTTP (Ray Serve + FastAPI)"),
    "evaluate-rm": ("caig_ray.jobs.evaluate_rm", "RM pairwise accuracy vs chance, a CNN baseline and the Bayes ceiling"),
    "config": ("caig_ray.jobs.config_show", "config show --preset NAME: the resolved config and where each job runs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    if argv[:1] == ["--version"]:
        from importlib.metadata import version

        print(f"caig-ray {version('caig-ray')}")
        return 0
    # what Kubernetes, `ray job stop` and `kill` send: like Ctrl-C (caig_ray.jobs._ray installs it again after ray.init)
    stop_on_sigterm()
    try:
        return _run(argv)
    except BrokenPipeError:  # `caig-ray ... | head`: the reader has what it wanted; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail on the closed pipe again
        return 0
    except KeyboardInterrupt as e:
        # the job's own finally blocks ran on the way here: its actors and its local Ray are stopped
        interrupt_reached_entry_point()
        how = "SIGTERM" if SIGTERM_RECEIVED or "SIGTERM" in str(e) else "Ctrl-C"
        print(f"caig-ray {argv[0] if argv else ''}: stopped by {how}; what it started is shut down", file=sys.stderr)
        return 143 if how == "SIGTERM" else 130


def _run(argv: list[str]) -> int:
    from caig_ray.jobs._entry import configure_logging

    configure_logging()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: caig-ray [--version] <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<12} {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
