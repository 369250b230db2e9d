"""The online algorithm of ``caig-ray train``, pure: no Ray, no actor, only what it is given.

    plan (RoundPlan) -> feed (Feed: sample with the policy, put blocks into the pipeline)
        -> train (RoundTrainer: scored pairs -> DPO+PCPO steps, every pair's fate recorded)
        -> evaluate (Evaluator) -> checkpoint (Checkpoints), logged by RunLog
    the run folder's claim (claim_run_folder: run.json) and the run's summary.json (run_summary)

The policy group and the render-and-score pipeline come in through the two protocols of
``caig_ray.loop.protocols``; ``jobs/train.py`` builds the Ray ones (``PolicyGroup``, ``PairStream``)
and runs the rounds, so a unit test can drive these parts with in-process ones
(``tests/test_loop_core.py``). docs/architecture.md has the picture.
"""

from caig_ray.loop.checkpoints import Checkpoints, check_same_run, run_checkpoints
from caig_ray.loop.evaluation import EVAL_SEED_ROUND, Evaluator
from caig_ray.loop.feed import Feed, policy_input
from caig_ray.loop.plan import RoundPlan
from caig_ray.loop.protocols import Pipeline, Policy
from caig_ray.loop.runfolder import claim_run_folder, write_run_record
from caig_ray.loop.runlog import RunLog
from caig_ray.loop.summary import run_summary
from caig_ray.loop.trainer import RoundTrainer, market_verdicts

__all__ = ["Checkpoints", "EVAL_SEED_ROUND", "Evaluator", "Feed", "Pipeline", "Policy", "RoundPlan", "RoundTrainer",
           "RunLog", "check_same_run", "claim_run_folder", "market_verdicts", "policy_input", "run_checkpoints",
           "run_summary", "write_run_record"]
