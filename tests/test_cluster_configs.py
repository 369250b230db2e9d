import importlib
from pathlib import Path

import yaml

from caig_ray.config import CaigConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_serve_config_parses_and_points_at_a_real_builder():
    doc = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    (app,) = doc["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = CaigConfig.model_validate(app["args"])  # the args are a valid partial config
    assert cfg.reward.model_path and cfg.resources.serve.use_gpu


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _entrypoint_module(cmd: str) -> str:
    parts = cmd.split()
    return parts[parts.index("-m") + 1]


def test_kuberay_raycluster_autoscales_renderers_from_zero():
    doc = _load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and "headGroupSpec" in spec
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    renderer = groups["renderer"]
    assert renderer["minReplicas"] == 0 and renderer["maxReplicas"] > 0
    limits = renderer["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_rayjob_and_rayservice_reference_real_entrypoints():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and "rayClusterSpec" in job["spec"]
    importlib.import_module(_entrypoint_module(job["spec"]["entrypoint"]))
    svc = _load("rayservice.yaml")
    assert svc["kind"] == "RayService" and "rayClusterConfig" in svc["spec"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    CaigConfig.model_validate(app["args"])
    assert app["args"] == _load("serve.yaml")["applications"][0]["args"]  # one Serve config, two carriers


def test_aws_launcher_matches_rays_cluster_schema():
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = _load("aws-launcher.yaml")
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"]["renderer_gpu"]["min_workers"] == 0


def test_online_rayjob_resumes_and_its_renderers_land_on_the_renderer_group():
    from caig_ray.config import load_config

    job = _load("rayjob-online.yaml")
    cmd = job["spec"]["entrypoint"]
    assert _entrypoint_module(cmd) == "caig_ray.jobs.caig" and "--resume" in cmd.split()
    importlib.import_module("caig_ray.jobs.caig")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["renderer"]["minReplicas"] == 0
    advertised = json_resources(groups["renderer"]["rayStartParams"]["resources"])
    renderers = load_config("gpu-cluster").resources.renderers
    assert set(renderers.resources) <= set(advertised)  # the preset's renderers fit that group
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def json_resources(value: str) -> dict:
    import json

    return json.loads(json.loads(value))  # KubeRay wants the JSON object as a quoted string


def _groups(doc):
    spec = doc["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _cluster_specs():
    yield "raycluster.yaml", _load("raycluster.yaml")
    for name in ("rayjob.yaml", "rayjob-online.yaml"):
        yield name, {"spec": _load(name)["spec"]["rayClusterSpec"]}
    yield "rayservice.yaml", {"spec": _load("rayservice.yaml")["spec"]["rayClusterConfig"]}


def test_every_group_mounts_the_shared_storage_at_the_same_paths():
    """Every output is under the preset's ``storage``, which every group mounts from one shared
    volume: checkpoints, models and run folders one node writes are seen by every other node."""
    from caig_ray.config import load_config

    storage = load_config("gpu-cluster").storage
    groups = [(manifest, name, group) for manifest, doc in _cluster_specs() for name, group in _groups(doc)]
    for manifest, name, group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: claims[m["name"]] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get(storage) == "caig-storage", (manifest, name)
    cfg = load_config("gpu-cluster")
    for path in (cfg.reward.model_path, cfg.reward.backbone_path):
        assert path.startswith(storage + "/")  # the preset reads what its jobs wrote, where every group mounts it


def test_every_manifest_entrypoint_writes_under_storage():
    """Each job's --out resolves under the preset's storage (resolve_output refuses anything else),
    and the models it reads are there too."""
    import shlex

    from caig_ray.config import load_config
    from caig_ray.storage import resolve_output

    storage = load_config("gpu-cluster").storage
    for manifest in ("rayjob.yaml", "rayjob-online.yaml"):
        args = shlex.split(_load(manifest)["spec"]["entrypoint"])
        out = resolve_output(storage, args[args.index("--out") + 1])
        assert str(out.local).startswith(storage + "/"), manifest
        for flag in ("--policy", "--rm"):
            if flag in args:
                assert args[args.index(flag) + 1].startswith(storage + "/"), (manifest, flag)


def test_trainer_nodes_hold_the_presets_policy_bundles():
    from caig_ray.config import load_config

    res = load_config("gpu-cluster").resources
    for manifest in ("raycluster.yaml", "rayjob.yaml", "rayjob-online.yaml"):
        doc = dict(_cluster_specs())[manifest]
        limits = dict(_groups(doc))["trainer"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for role in (res.policy, res.reward_training, res.pretraining):  # PACK: one node holds every rank
            assert int(limits["nvidia.com/gpu"]) >= role.num_workers * role.num_gpus, manifest
            assert int(limits["cpu"]) >= role.num_workers * role.num_cpus, manifest
