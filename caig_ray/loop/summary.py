"""``summary.json`` of ``caig-ray train``: the run's totals and its per-evaluation curves, from the run's
state (``RunState``) and the pipelines' pool traces (docs/online-loop.md: the run folder)."""

from __future__ import annotations

from caig_ray.config import OnlineConfig
from caig_ray.online import RunState


def run_summary(oc: OnlineConfig, state: RunState, *, wall_s: float, pool_trace: list, pool_max: int,
                pool_sample_errors: int, wait_s: float, max_lag_steps: int, recoveries: dict[str, int],
                policy_path: str, storage: str) -> dict:
    """The summary; ``*_by_round`` lists follow ``eval_after_rounds`` (one entry per evaluation), the
    ``pairs_*`` totals add every round's counts, ``true_ctr_lift`` is the last evaluation's lift."""
    rounds, evals = state.rounds, state.evals

    def total(key: str) -> float:
        return sum(r[key] for r in rounds)

    def by_eval(key: str) -> list:
        return [e.get(key) for e in evals]

    summary = {
        "rounds": len(rounds), "steps": state.step,
        **{f"{k}_by_round": by_eval(k) for k in ("true_ctr", "base_true_ctr", "match_rate", "base_match_rate",
                                                  "mismatch_share", "base_mismatch_share")},
        "mismatch_share_by_category": evals[-1].get("mismatch_share_by_category") if evals else None,
        "base_mismatch_share_by_category": evals[-1].get("base_mismatch_share_by_category") if evals else None,
        "eval_samples": oc.eval_samples,
        "rm_win_rate_by_round": [e["rm_win_rate"] for e in evals],
        "eval_after_rounds": [e["after_rounds"] for e in evals],
        **{k: total(k) for k in ("pairs_planned", "pairs_rendered", "pairs_scored", "pairs_trained",
                                 "pairs_skipped", "pairs_lost")},
        "pairs_skipped_tie": sum(r["skipped_reasons"].get("tie", 0) for r in rounds),
        "pairs_skipped_duplicate": sum(r["skipped_reasons"].get("duplicate", 0) for r in rounds),
        "pairs_duplicated": total("pairs_duplicated"),
        "renderer_pool_size_max": pool_max, "renderer_pool_trace": pool_trace,
        "pool_sample_errors": pool_sample_errors,
        "max_policy_lag": oc.max_policy_lag, "policy_lag_steps_max": max_lag_steps,
        "driver_wait_s": wait_s, "render_busy_s": total("render_busy_s"), "train_s": total("train_s"),
        "pipeline": oc.pipeline, "online_wall_s": wall_s, "policy_path": policy_path,
        "recoveries": sum(recoveries.values()), "recoveries_by_kind": dict(recoveries),
        "storage": storage,
    }
    if evals and "lift" in evals[-1]:
        summary["true_ctr_lift"] = evals[-1]["lift"]
    return summary
