"""``storage`` (caig_ray/storage.py): where every output lives -- a shared POSIX path or an object
store (a local S3 server, moto, started by the test) -- and that every entrypoint writes only there."""

import json
from pathlib import Path

import pytest

from caig_ray.config import ConfigError
from caig_ray.storage import Output, resolve_output, staging_root


def test_out_resolves_under_a_posix_storage_and_outside_is_refused(tmp_path):
    root = tmp_path / "shared"
    assert resolve_output(str(root), "runs/a") == Output(root / "runs" / "a")
    assert resolve_output(str(root), str(root / "runs" / "b")).local == root / "runs" / "b"
    assert resolve_output(None, tmp_path / "x").local == tmp_path / "x"
    for bad in (str(tmp_path / "elsewhere"), "../escape"):
        with pytest.raises(ConfigError, match="outside storage"):
            resolve_output(str(root), bad)
    with pytest.raises(ConfigError, match="--storage"):
        resolve_output(None, "s3://bucket/run")


def test_out_under_an_object_store_is_staged_and_uploaded(s3_store, tmp_path):
    out = resolve_output(s3_store, "runs/a")
    assert out.staged and staging_root() in out.local.parents and out.uri.split("?")[0].endswith("/storage/runs/a")
    with pytest.raises(ConfigError, match="relative"):
        resolve_output(s3_store, str(tmp_path / "abs"))
    with pytest.raises(ConfigError, match="outside storage"):
        resolve_output(s3_store, "s3://another-bucket/run")
    (out.local / "sub").mkdir(parents=True)
    (out.local / "sub" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    (out.local / "keep-local").write_text("x")
    out.upload(exclude=("keep-local",))
    assert out.listdir() == ["sub"] and out.child("sub/w.bin").exists()
    fresh = Output(tmp_path / "fresh", out.uri)  # another pod: nothing local
    assert fresh.download() and (fresh.local / "sub" / "w.bin").read_bytes() == b"\x00\x01" * 1000
    out.child("sub").delete()
    assert not out.child("sub").exists() and not Output(tmp_path / "none", out.child("sub").uri).download()


def test_a_bad_storage_uri_is_one_clear_error():
    with pytest.raises(ConfigError, match="storage 'nosuchfs://x'"):
        resolve_output("nosuchfs://x", "run")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_entrypoint_writes_only_under_storage(quick_world, tmp_path, monkeypatch):
    """make-world, train-rm, evaluate-rm, generate and train with --storage and relative --out: every
    file they write is under the storage folder, none in the working directory."""
    import ray

    storage, cwd = tmp_path / "shared", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    st = ["--storage", str(storage), "--preset", "quick"]
    try:
        _run_every_entrypoint(st, storage, quick_world)
    finally:
        ray.shutdown()  # the mains leave the local Ray they started up for the process (a CLI exits)
    assert not _files(cwd), _files(cwd)
    written = _files(storage)
    for expected in ("world/catalog/catalog.json", "rm/config.json", "rm/train_metrics.json", "rm_eval.json",
                     "ads/generate_summary.json", "ads/gallery.html", "runs/online/summary.json",
                     "runs/online/metrics.jsonl",
                     "runs/online/checkpoints/round_000/state.json", "runs/online/policy/config.json",
                     "runs/online/pairs/round_000.parquet", "runs/online/report.html"):
        assert expected in written, expected
    assert any(f.startswith("ads/best/part-") for f in written)  # generate's parts, as it went
    assert any(f.startswith("ads/catalog/valid/") for f in written)  # and its validated catalog
    assert any(f.startswith("rm_ray/") for f in written)  # Ray Train's own checkpoints: under storage too
    assert any(f.startswith("rm_tensorboard/") for f in written)


def _run_every_entrypoint(st: list[str], storage: Path, quick_world) -> None:
    from caig_ray.jobs import caig, evaluate_rm, generate, make_world, train_rm

    assert make_world.main([*st, "--out", "world", "--no-models"]) == 0
    assert train_rm.main([*st, "--world", str(quick_world.root), "--out", "rm", "--epochs", "1",
                          "--max-pairs", "16"]) == 0
    assert evaluate_rm.main([*st, "--world", str(quick_world.root), "--rm", str(storage / "rm"),
                             "--out", "rm_eval.json"]) == 0
    assert generate.main([*st, "--catalog", str(quick_world.catalog), "--policy", str(quick_world.policy),
                          "--rm", str(storage / "rm"), "--out", "ads", "--n", "2"]) == 0
    assert caig.main([*st, "--catalog", str(quick_world.catalog), "--policy", str(quick_world.policy),
                      "--rm", str(storage / "rm"), "--out", "runs/online", "--rounds", "1"]) == 0
    summary = json.loads((storage / "runs" / "online" / "summary.json").read_text())
    assert summary["storage"] == str(storage / "runs" / "online")
