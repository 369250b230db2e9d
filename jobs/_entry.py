"""The shared shape of a job's ``main``: preset/config arguments, config overrides from flags, the
job itself, and bad config or data reported as one line on stderr with exit code 2.

Every job's first line of output (stderr) names the config it resolved: ``caig-ray train: config
my.yaml on preset gpu-cluster``. Flags always win over the config; the config wins over a world's
defaults."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
from typing import IO, Any, Callable, Iterator

from caig_ray.config import CaigConfig, ConfigError, load_config_described
from caig_ray.errors import CaigError
from caig_ray.storage import Output, model_location, refuse_used, resolve_output

# what a job runs on when neither --preset nor --config is given: the laptop demo's world and models
DEFAULT_PRESET = "demo"


def configure_logging() -> None:
    """The one logging set-up, at the entry point: caig-ray's own progress at INFO, libraries at
    WARNING, everything on stderr (stdout carries only a job's result)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("caig_ray").setLevel(logging.INFO)
    logging.getLogger("__main__").setLevel(logging.INFO)  # a job run as `python -m caig_ray.jobs.<name>`


@contextlib.contextmanager
def stdout_for_result() -> Iterator[IO[str]]:
    """While a job runs, whatever writes to stdout -- a library's logger that holds the stream, a
    print, a child process -- lands on stderr; the stream yielded is the real stdout, for the result
    alone, so ``caig-ray JOB ... | jq`` reads one JSON document."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
        sys.stderr.flush()
        err_fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured stream (tests): swap objects
        real, sys.stdout = sys.stdout, sys.stderr
        try:
            yield real
        finally:
            sys.stdout = real
        return
    keep = os.dup(fd)
    os.dup2(err_fd, fd)
    result = open(keep, "w", closefd=False)
    try:
        yield result
    finally:
        with contextlib.suppress(BrokenPipeError):  # the reader left (`| head`): restore the streams all the same
            result.flush()
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        os.dup2(keep, fd)
        os.close(keep)


@contextlib.contextmanager
def stage(name: str, log: logging.Logger | None = None) -> Iterator[None]:
    """A long job's stage marker: its start and, at the end, its elapsed time (stderr, INFO)."""
    log = log or logging.getLogger("caig_ray.stage")
    t0 = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s done in %.1f s", name, time.perf_counter() - t0)


def clear_local(out: Output) -> None:
    """Remove ``out``'s local copy: a staging cache, or an output the user asked to replace."""
    import shutil

    if out.local.is_dir():
        shutil.rmtree(out.local)
    elif out.local.exists():
        out.local.unlink()


def print_result(summary: dict, stream: IO[str] | None = None) -> None:
    """A job's result: one JSON document."""
    print(json.dumps(summary, indent=1, default=str), file=stream or sys.stdout, flush=True)


def add_config_args(p: argparse.ArgumentParser, overwrite: bool = False) -> None:
    p.set_defaults(prog=p.prog)  # the job's name in its first line of output
    p.add_argument("--preset", default=None,
                   help=f"preset name (quick, demo, gpu-cluster); with --config, the base of a file that names none "
                        f"(default: {DEFAULT_PRESET})")
    p.add_argument("--config", default=None,
                   help="a YAML config: its first line `base: PRESET` names what it layers on; it holds only what "
                        "differs (caig-ray config show --diff writes one)")
    p.add_argument("--storage", default=None,
                   help="where every output lives (overrides the config's storage): a shared POSIX path or an "
                        "object-store URI (s3://bucket/prefix); --out is relative to it")
    if overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help="replace what --out holds (without it, a used --out is refused and left untouched)")


def load_job_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> CaigConfig:
    """The config ``args`` name (``--config`` on its base, or ``--preset``), ``overrides`` (the flags
    that are set) on top; prints the job's first line, naming what it resolved, on stderr."""
    source = args.config or args.preset or DEFAULT_PRESET
    cfg, where = load_config_described(source, overrides, preset=args.preset if args.config else None)
    prog = getattr(args, "prog", None) or os.path.basename(sys.argv[0])
    print(f"{prog}: config {where}" + (f"; storage {cfg.storage}" if cfg.storage else ""), file=sys.stderr,
          flush=True)
    return with_model_locations(cfg)


def with_model_locations(cfg: CaigConfig) -> CaigConfig:
    """The config's model paths as every process reads them (``model_location``): a URI under an
    object-store ``storage`` takes its query, a local folder is made absolute."""
    loc = lambda v: model_location(v, cfg.storage)  # noqa: E731
    return cfg.model_copy(update={
        "policy": cfg.policy.model_copy(update={"model_path": loc(cfg.policy.model_path)}),
        "reward": cfg.reward.model_copy(update={"model_path": loc(cfg.reward.model_path),
                                                "backbone_path": loc(cfg.reward.backbone_path)}),
        "renderer": cfg.renderer.model_copy(update={"sd_path": loc(cfg.renderer.sd_path),
                                                    "controlnet_path": loc(cfg.renderer.controlnet_path)}),
    })


def model_arg(value: str | None, cfg: CaigConfig) -> str | None:
    """A model flag's value as every process can read it (``caig_ray.storage.model_location``)."""
    return model_location(value, cfg.storage)


def run_job(args: argparse.Namespace, job: Callable[[CaigConfig, Output], dict], section: str | None = None,
            overrides: dict[str, Any] | None = None, upload: bool = True) -> int:
    """Load the config (flags that are set override ``section``), resolve ``--out`` under ``storage``
    (a used one refused unless the job has ``--overwrite`` and it is given), run ``job(cfg, out)``,
    upload ``out`` (object store), print the summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging()
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    with stdout_for_result() as result:
        try:
            top = {"storage": args.storage} if getattr(args, "storage", None) else {}
            cfg = load_job_config(args, {**({section: over} if over and section else {}), **top} or None)
            out = resolve_output(cfg.storage, args.out)
            overwrite = getattr(args, "overwrite", None)
            if overwrite is False:
                refuse_used(out, "pass --overwrite to replace it, or give a new --out")
            if out.staged:
                clear_local(out)  # the staging copy is a cache of the store: never mixed into what is uploaded
            elif overwrite:
                clear_local(out)  # the user asked to replace it: nothing of the old copy stays beside the new
            summary = job(cfg, out)
            if upload:
                if overwrite:
                    out.delete()  # the user asked to replace it: no file of the old copy stays beside the new
                out.upload()
        except CaigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print_result(summary, result)
    return 0


def pick(flag: str, given: Any, key: str, configured: Any, fallback: Any = None) -> Any:
    """An input's value: the flag's when given, else the config's (``key``), else ``fallback`` (a
    world's default); neither is one clear error naming both."""
    for value in (given, configured, fallback):
        if value is not None:
            return value
    raise ConfigError(f"give {flag} or set {key} in the config")
