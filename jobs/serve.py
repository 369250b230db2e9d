"""``caig-ray serve``: the live RM scoring endpoint from the command line. The app itself (FastAPI on
Ray Serve, its contract and limits) is ``caig_ray.jobs.serve_rm``, imported only once the arguments
are read, so ``caig-ray serve --help`` loads no Ray and no model stack."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


class StopServing(Exception):
    """Raised in the main thread by SIGTERM or SIGINT (Ctrl-C): ``caig-ray serve`` shuts down and exits 0."""


def _stop_serving(signum, frame):
    raise StopServing(f"{signal.Signals(signum).name} received")


def _stop_now(signum, frame):
    print(f"caig-ray serve: a second {signal.Signals(signum).name} during the shutdown: exiting without finishing "
          "it", file=sys.stderr, flush=True)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    from caig_ray.jobs._entry import add_config_args, configure_logging, load_job_config, model_arg, pick

    p = argparse.ArgumentParser(prog="caig-ray serve", description=__doc__)
    add_config_args(p)
    p.add_argument("--rm", default=None, help="trained RM folder or object-store URI (train-rm --out); default: "
                                             "reward.model_path")
    p.add_argument("--host", default=None, help="override serve.host")
    p.add_argument("--port", type=int, default=None, help="override serve.port")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging()
    from ray import serve

    from caig_ray.errors import CaigError
    from caig_ray.jobs._ray import init_ray
    from caig_ray.jobs.serve_rm import api_key_env_vars, build_app
    from caig_ray.models.folders import check_model_folder

    over = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        full = load_job_config(args, {**({"serve": over} if over else {}),
                                      **({"storage": args.storage} if args.storage else {})})
        rm = pick("--rm", model_arg(args.rm, full), "reward.model_path", model_arg(full.reward.model_path, full))
        full = full.model_copy(update={"reward": full.reward.model_copy(update={"model_path": rm})})
        check_model_folder(full.reward.model_path, "reward.model_path (--rm)", kind="reward")
        api_key_env_vars(full.serve)  # the key's variable is set: checked before Ray starts
    except CaigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = full.serve
    started_ray = init_ray()
    # SIGTERM (Kubernetes, `kill`) stops like Ctrl-C. Installed after ray.init, which sets its own
    # SIGTERM handler (sys.exit(15), nothing shut down); a second signal during the shutdown exits at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_serving)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app({"reward": {"model_path": full.reward.model_path}, "serve": cfg.model_dump(mode="json"),
                             "resources": {"serve": full.resources.serve.model_dump(mode="json")}}),
                  name="caig-rm", route_prefix="/")
        key = (f"API key required: 'Authorization: Bearer <${cfg.api_key_env}>'" if cfg.api_key_env else
               "no API key: keep it behind an authenticating ingress (docs/serving.md)")
        print(f"serving on http://{cfg.host}:{cfg.port} (POST /v1/score, /v1/rank; GET /healthz; /docs); {key}. "
              "Ctrl-C or SIGTERM stops.", flush=True)
        while True:
            time.sleep(3600)
    except StopServing as stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_now)
        serve.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
        print(f"caig-ray serve: {stop}: stopped Serve{' and the local Ray instance it started' if started_ray else ''}"
              "; exiting", file=sys.stderr, flush=True)
        return 0




if __name__ == "__main__":
    sys.exit(main())
