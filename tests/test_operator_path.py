"""The operator's path without traps: no job replaces or mixes into a used --out unless asked
(--overwrite / --resume), flags win over the config and the config over a world's defaults, every
job's first line names the config it resolved, and models are read from object storage as from a
folder. Every refusal here comes before Ray starts."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from chain_checks import job_lines

BAD = Path(__file__).parent / "data" / "bad"


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) with its content's hash."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if p != root else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture()
def pm_folder(quick_world, tmp_path):
    """A user's pretrained PM: the folder a wrong --out would point at."""
    pm = tmp_path / "checkpoints" / "caig-pm"
    shutil.copytree(quick_world.policy, pm)
    return pm


def test_a_model_folder_given_as_out_is_refused_and_left_byte_identical(quick_world, pm_folder, tmp_path, capsys):
    import ray

    from caig_ray.jobs import train as train_job, demo, evaluate_rm, generate, make_world, pretrain_pm, train_rm

    before = _digest(pm_folder)
    q, w = ["--preset", "quick"], ["--world", str(quick_world.root)]
    models = ["--policy", str(quick_world.policy), "--rm", str(quick_world.reward)]
    runs = {
        "train-rm": (train_rm.main, [*q, *w, "--out", str(pm_folder)], "--overwrite"),
        "pretrain-pm": (pretrain_pm.main, [*q, *w, "--out", str(pm_folder)], "--overwrite"),
        "make-world": (make_world.main, [*q, "--out", str(pm_folder)], "--overwrite"),
        "generate": (generate.main, [*q, "--catalog", str(quick_world.catalog), *models, "--out", str(pm_folder)],
                     "--resume"),
        "train": (train_job.main, [*q, "--catalog", str(quick_world.catalog), *models, "--out", str(pm_folder)],
                  "a new --out"),
        "demo": (demo.main, [*q, "--out", str(pm_folder)], "--overwrite"),
    }
    for name, (main, argv, remedy) in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert f"--out {pm_folder} already exists" in err and remedy in err, (name, err)
        assert _digest(pm_folder) == before, name
    # a single-file output too: evaluate-rm's JSON
    result = tmp_path / "rm_eval.json"
    result.write_text('{"kept": true}')
    assert evaluate_rm.main([*q, *w, "--rm", str(quick_world.reward), "--out", str(result)]) == 2
    assert "--overwrite" in capsys.readouterr().err and json.loads(result.read_text()) == {"kept": True}
    assert not ray.is_initialized()


def test_every_job_names_its_config_first_and_a_partial_config_layers_on_its_base(quick_world, pm_folder,
                                                                                   tmp_path, capsys):
    from caig_ray.jobs import train_rm

    assert train_rm.main(["--preset", "quick", "--world", str(quick_world.root), "--out", str(pm_folder)]) == 2
    assert job_lines(capsys.readouterr().err)[0] == "caig-ray train-rm: config preset quick"
    mine = tmp_path / "my.yaml"
    mine.write_text("base: gpu-cluster\npolicy:\n  lr: 0.001\n")
    assert train_rm.main(["--config", str(mine), "--world", str(quick_world.root), "--out", str(pm_folder)]) == 2
    first = job_lines(capsys.readouterr().err)[0]
    assert first == f"caig-ray train-rm: config {mine} on preset gpu-cluster; storage /storage", first
    assert train_rm.main(["--config", str(mine), "--preset", "quick", "--world", str(quick_world.root),
                          "--out", str(pm_folder)]) == 2
    assert "says `base: gpu-cluster` but --preset quick" in capsys.readouterr().err


def test_world_flag_wins_over_data_click_logs_and_the_config_over_the_worlds_defaults(quick_world, tmp_path, capsys):
    """--world's click log is read even where data.click_logs names another; without --world the
    config's is. Told apart by which log the refusal names (no training pair: refused before Ray)."""
    from caig_ray.jobs import train_rm

    world = tmp_path / "bad_world"
    world.mkdir()
    shutil.copy(BAD / "no_pairs.parquet", world / "click_logs.parquet")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base: quick\ndata:\n  click_logs: {quick_world.click_logs}\n"
                   f"reward:\n  backbone_path: {quick_world.reward}\n")
    assert train_rm.main(["--config", str(cfg), "--world", str(world), "--out", str(tmp_path / "rm")]) == 2
    assert f"{world / 'click_logs.parquet'}: 0 training pair(s)" in capsys.readouterr().err
    cfg.write_text(f"base: quick\ndata:\n  click_logs: {BAD / 'no_pairs.parquet'}\n"
                   f"reward:\n  backbone_path: {quick_world.reward}\n")
    assert train_rm.main(["--config", str(cfg), "--out", str(tmp_path / "rm")]) == 2
    assert f"{BAD / 'no_pairs.parquet'}: 0 training pair(s)" in capsys.readouterr().err
    cfg.write_text("base: quick\n")  # no --world, no data.click_logs: one clear error naming both
    assert train_rm.main(["--config", str(cfg), "--out", str(tmp_path / "rm")]) == 2
    assert "give --world or set data.click_logs" in capsys.readouterr().err
    assert not (tmp_path / "rm").exists()


def test_rm_flag_wins_over_reward_model_path_which_train_reads(quick_world, tmp_path, capsys):
    from caig_ray.jobs import train as train_job

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base: quick\nreward:\n  model_path: {tmp_path / 'configured-rm'}\n")
    common = ["--config", str(cfg), "--catalog", str(quick_world.catalog), "--policy", str(quick_world.policy)]
    assert train_job.main([*common, "--rm", str(tmp_path / "flag-rm"), "--out", str(tmp_path / "a")]) == 2
    assert f"model folder not found: {tmp_path / 'flag-rm'}" in capsys.readouterr().err
    assert train_job.main([*common, "--out", str(tmp_path / "b")]) == 2  # no --rm: reward.model_path is read
    assert f"model folder not found: {tmp_path / 'configured-rm'}" in capsys.readouterr().err
    cfg.write_text("base: quick\n")
    assert train_job.main([*common, "--out", str(tmp_path / "c")]) == 2
    assert "give --rm or set reward.model_path" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_checkpoint_rotation_and_resume_see_only_the_runs_own_checkpoints(tmp_path):
    from caig_ray.loop import run_checkpoints
    from caig_ray.online import RunState
    from caig_ray.storage import Output

    run = Output(tmp_path / "run")
    for name, run_id in (("round_000", "mine"), ("round_004", "other"), ("round_001", "mine"), ("round_002", None)):
        (run.local / "checkpoints" / name).mkdir(parents=True)
        if run_id:
            (run.local / "checkpoints" / name / "state.json").write_text(RunState(run_id=run_id).to_json())
    assert run_checkpoints(run, "mine") == ["round_000", "round_001"]  # round_002: incomplete; round_004: not ours


def test_a_model_is_read_from_object_storage_through_one_cached_copy_per_node(quick_world, s3_store, tmp_path,
                                                                            monkeypatch):
    import pyarrow.fs as pafs

    from caig_ray.models.policy import load_policy
    from caig_ray.models.vlm import ModelFolderError, check_model_folder
    from caig_ray.storage import local_model, model_location, resolve_output

    monkeypatch.setenv("CAIG_MODEL_CACHE", str(tmp_path / "cache"))
    stored = resolve_output(s3_store, "models/pm")
    shutil.copytree(quick_world.policy, stored.local)
    stored.upload()
    uri = model_location("s3://caig-runs/storage/models/pm", s3_store)  # the storage's endpoint is carried over
    assert uri == stored.uri
    assert check_model_folder(uri, "--policy") == "qwen2_vl"
    assert not (tmp_path / "cache").exists()  # checked where it is stored: nothing downloaded for the check
    with pytest.raises(ModelFolderError, match="not a trained reward model"):  # weight names read from the store
        check_model_folder(uri, "--rm", kind="reward")
    folder = local_model(uri)
    assert _digest(folder) == {**_digest(quick_world.policy), ".caig-model.json": _digest(folder)[".caig-model.json"]}
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert local_model(uri) == folder and (folder / "config.json").stat().st_mtime_ns == stamp  # not fetched again
    model, _ = load_policy(uri)
    assert model.config.model_type == "qwen2_vl"
    fs, path = pafs.FileSystem.from_uri(uri)  # the stored model changes: the next load fetches it again
    with fs.open_output_stream(f"{path}/extra.txt") as f:
        f.write(b"new file")
    assert (local_model(uri) / "extra.txt").read_bytes() == b"new file"
    with pytest.raises(ModelFolderError, match="--rm: model folder not found: s3://caig-runs/storage/models/nope"):
        check_model_folder(model_location("s3://caig-runs/storage/models/nope", s3_store), "--rm", kind="reward")


def test_the_entrypoints_install_under_the_projects_name_only(tmp_path):
    """Outside the checkout nothing called ``jobs`` or ``actors`` is importable; ``caig_ray.jobs`` is."""
    import subprocess
    import sys

    for name in ("jobs", "actors", "dataplane"):
        res = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode != 0 and f"No module named '{name}'" in res.stderr, (name, res.stdout)
    res = subprocess.run([sys.executable, "-c", "import caig_ray.jobs.cli, caig_ray.dataplane.stream"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_every_flag_wins_over_the_config_key_it_overrides(quick_world, tmp_path, monkeypatch, capsys):
    """Each job's flags against a config that sets the same keys otherwise: the job receives the
    flag's value (the job function is replaced by one that records what it was given)."""
    from caig_ray.jobs import train as train_job, generate, pretrain_pm, train_rm

    seen = {}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""base: quick
storage: {tmp_path / 'configured-storage'}
train_rm: {{epochs: 7, lr: 0.5, zero_stage: 3, max_pairs: 99}}
pretrain: {{epochs: 7, zero_stage: 3}}
online: {{rounds: 7}}
data: {{catalog: {tmp_path / 'configured.json'}}}
reward: {{backbone_path: {tmp_path / 'configured-backbone'}, model_path: {tmp_path / 'configured-rm'}}}
""")
    monkeypatch.setattr(train_rm, "train_rm", lambda c, world, out: seen.update(cfg=c, out=out) or {})
    base = ["--config", str(cfg), "--world", str(quick_world.root)]
    assert train_rm.main([*base, "--out", "rm", "--epochs", "1", "--lr", "0.01", "--zero-stage", "2",
                          "--max-pairs", "16", "--init-from", str(quick_world.policy),
                          "--storage", str(tmp_path / "flag-storage")]) == 0
    tc = seen["cfg"].train_rm
    assert (tc.epochs, tc.lr, tc.zero_stage, tc.max_pairs) == (1, 0.01, 2, 16)
    assert seen["cfg"].reward.backbone_path == str(quick_world.policy)
    assert seen["out"].local == tmp_path / "flag-storage" / "rm"
    assert train_rm.main([*base, "--out", "rm2"]) == 0  # no flags: the config's values
    assert (seen["cfg"].train_rm.epochs, seen["cfg"].reward.backbone_path) == (7, str(tmp_path / "configured-backbone"))

    monkeypatch.setattr(pretrain_pm, "pretrain_pm", lambda c, world, out: seen.update(cfg=c) or {})
    assert pretrain_pm.main([*base, "--out", "pm", "--epochs", "0.5", "--zero-stage", "1"]) == 0
    assert (seen["cfg"].pretrain.epochs, seen["cfg"].pretrain.zero_stage) == (0.5, 1)

    monkeypatch.setattr(train_job, "train", lambda c, out, policy, rm, catalog, resume, **kw: seen.update(
        cfg=c, rm=rm, catalog=catalog) or {})
    common = ["--config", str(cfg), "--policy", str(quick_world.policy)]
    assert train_job.main([*common, "--out", "r1", "--rounds", "2", "--catalog", str(quick_world.catalog),
                      "--rm", str(quick_world.reward)]) == 0
    assert (seen["cfg"].online.rounds, seen["catalog"], seen["rm"]) == (2, str(quick_world.catalog),
                                                                       str(quick_world.reward))
    assert train_job.main([*common, "--out", "r2", "--world", str(quick_world.root)]) == 0  # --world's catalog
    assert seen["catalog"] == str(quick_world.catalog) and seen["rm"] == str(tmp_path / "configured-rm")
    assert train_job.main([*common, "--out", "r3"]) == 0  # neither: the config's data.catalog
    assert (seen["cfg"].online.rounds, seen["catalog"]) == (7, str(tmp_path / "configured.json"))

    monkeypatch.setattr(generate, "generate", lambda c, catalog, out, policy, rm, *a: seen.update(
        catalog=catalog, rm=rm) or {})
    assert generate.main([*common, "--out", "g1", "--catalog", str(quick_world.catalog),
                          "--rm", str(quick_world.reward)]) == 0
    assert (seen["catalog"], seen["rm"]) == (str(quick_world.catalog), str(quick_world.reward))
    assert generate.main([*common, "--out", "g2"]) == 0
    assert (seen["catalog"], seen["rm"]) == (str(tmp_path / "configured.json"), str(tmp_path / "configured-rm"))
    capsys.readouterr()


def test_resume_finishes_a_run_stopped_after_its_last_checkpoint_and_refuses_a_finished_one(tmp_path, caplog):
    from caig_ray.loop.runfolder import claim_run_folder
    from caig_ray.online import RunRecord
    from caig_ray.storage import Output, OutputInUse

    run = Output(tmp_path / "run")
    fresh = claim_run_folder(run, rounds=2, resume=True)  # absent folder: a new run
    assert fresh.status == "running" and fresh.rounds_done == 0
    run.local.mkdir()
    (run.local / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputInUse, match="holds no caig-ray run"):
        claim_run_folder(run, rounds=2, resume=True)
    (run.local / "notes.txt").unlink()
    stopped = RunRecord(run_id="r1", started_at="t", rounds=2, rounds_done=2)  # killed before saving its policy
    (run.local / "run.json").write_text(stopped.to_json())
    assert claim_run_folder(run, rounds=2, resume=True).run_id == "r1"
    assert "finishing run r1" in caplog.text
    with pytest.raises(OutputInUse, match="a new --out"):
        claim_run_folder(run, rounds=2, resume=False)
    (run.local / "run.json").write_text(RunRecord(run_id="r1", started_at="t", rounds=2, rounds_done=2,
                                                  status="finished").to_json())
    with pytest.raises(OutputInUse, match="run r1 finished at round 2; pass a new --out"):
        claim_run_folder(run, rounds=2, resume=True)


def test_overwrite_replaces_a_stored_single_file_output(quick_world, s3_store, tmp_path, monkeypatch):
    """evaluate-rm --overwrite onto an object store: the stored file is replaced (not a crash)."""
    from caig_ray.jobs import evaluate_rm
    from caig_ray.storage import resolve_output

    stored = resolve_output(s3_store, "evals/rm_eval.json")
    stored.local.parent.mkdir(parents=True, exist_ok=True)
    stored.local.write_text('{"old": true}')
    stored.upload()
    monkeypatch.setattr(evaluate_rm, "evaluate_rm", lambda cfg, world, rm, out: (
        out.parent.mkdir(parents=True, exist_ok=True), out.write_text('{"new": true}')) and {"new": True})
    argv = ["--preset", "quick", "--storage", s3_store, "--world", str(quick_world.root), "--rm",
            str(quick_world.reward), "--out", "evals/rm_eval.json"]
    assert evaluate_rm.main(argv) == 2  # used: refused
    assert evaluate_rm.main([*argv, "--overwrite"]) == 0
    fetched = type(stored)(tmp_path / "fetched.json", stored.uri)
    assert fetched.download() and json.loads(fetched.local.read_text()) == {"new": True}
