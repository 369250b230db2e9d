"""The data plane (installed as ``caig_ray.dataplane``): Ray Data sources and the catalog's validation tasks
(``catalog``), the job-long render-and-score pipeline and the one helper that builds every model stage on
its actor pool (``stream``), and the backlog-driven renderer pool (``elastic``). The processes that hold
models live in ``caig_ray.actors``; see docs/architecture.md."""
