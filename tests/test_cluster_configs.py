import importlib
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from caig_ray.config import CaigConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBE_MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayjob-online.yaml", "rayservice.yaml")
JOB_MANIFESTS = ("rayjob.yaml", "rayjob-online.yaml")
# the Secret holding the Ray token (docs/cluster.md creates it): KubeRay's authOptions.secretName, and
# the key KubeRay reads (its RAY_AUTH_TOKEN_SECRET_KEY); the operator injects RAY_AUTH_TOKEN from it
TOKEN_SECRET = {"name": "ray-auth", "key": "auth_token"}
# KubeRay's authOptions of every cluster spec (KubeRay >= v1.6.0: secretName)
AUTH_OPTIONS = {"mode": "token", "secretName": TOKEN_SECRET["name"]}
# what KubeRay's authOptions sets on every Ray container, the autoscaler and a RayJob's submitter
KUBERAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _serve_docs():
    yield "serve.yaml", _load("serve.yaml")
    yield "rayservice.yaml serveConfigV2", yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])


# ---------------------------------------------------------------------------------------------- Serve


def test_serve_config_parses_and_points_at_a_real_builder():
    doc = _load("serve.yaml")
    (app,) = doc["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = CaigConfig.model_validate(app["args"])  # the args are a valid partial config
    assert cfg.reward.model_path and cfg.resources.serve.use_gpu
    assert cfg.serve.api_key_env  # closed by default: requests carry the API key (docs/serving.md)


def test_serve_configs_pass_rays_own_deploy_schema():
    """What `serve deploy` / `serve run` / KubeRay hand to Ray: no local working_dir (the code is in the
    image), and serve.yaml and the RayService carry one and the same config."""
    from ray.serve.schema import ServeDeploySchema

    docs = dict(_serve_docs())
    for name, doc in docs.items():
        ServeDeploySchema.model_validate(doc)
        for app in doc["applications"]:
            assert "working_dir" not in (app.get("runtime_env") or {}), name
            assert "py_modules" not in (app.get("runtime_env") or {}), name
    assert docs["serve.yaml"] == docs["rayservice.yaml serveConfigV2"]


# -------------------------------------------------------------------------------------------- KubeRay


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


def _shell_words(cmd: str, **env: str) -> list[str]:
    """The entrypoint's argv as a POSIX shell expands it: Ray's job supervisor runs the entrypoint with
    ``subprocess.Popen(entrypoint, shell=True)`` (ray/dashboard/modules/job/job_supervisor.py)."""
    assert not re.search(r"[;&|<>`\n]", cmd), cmd  # one command, nothing else runs
    for sub in re.findall(r"\$\(([^)]*)\)", cmd):
        assert sub == "date -u +%G-W%V", sub  # the only command substitution: the ISO week
    res = subprocess.run(["/bin/sh", "-c", f'set -- {cmd}\nprintf "%s\\0" "$@"'], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.split("\0")[:-1]


def _command_module(args: list[str]) -> str:
    """``caig-ray <command> ...`` -> the module that command runs (the CLI's own table)."""
    from caig_ray.jobs.cli import COMMANDS

    assert args[0] == "caig-ray", args
    return COMMANDS[args[1]][0]


def test_the_caig_ray_command_is_the_packaged_console_script():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["caig-ray"] == "caig_ray.jobs.cli:main"


def test_rayjob_and_rayservice_reference_real_entrypoints():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and "rayClusterSpec" in job["spec"]
    args = _shell_words(job["spec"]["entrypoint"])
    assert args[:2] == ["caig-ray", "train-rm"]
    importlib.import_module(_command_module(args))
    svc = _load("rayservice.yaml")
    assert svc["kind"] == "RayService" and "rayClusterConfig" in svc["spec"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    CaigConfig.model_validate(app["args"])
    assert app["args"] == _load("serve.yaml")["applications"][0]["args"]  # one Serve config, two carriers


def test_no_manifest_uploads_a_working_dir():
    """The code is in the image: a RayJob's submitter has no checkout to upload."""
    for name in JOB_MANIFESTS:
        spec = _load(name)["spec"]
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        assert "working_dir" not in runtime_env and "py_modules" not in runtime_env, name
    for name, doc in _all_docs():
        for node in _walk(doc):
            assert not (isinstance(node, dict) and {"working_dir", "py_modules"} & set(node)), name


def test_aws_launcher_matches_rays_cluster_schema():
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = _load("aws-launcher.yaml")
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"]["renderer_gpu"]["min_workers"] == 0


def test_aws_launcher_installs_this_checkout_on_every_node():
    """file_mounts copies the checkout (local paths are relative to where `ray up` runs: the repo top)
    and every node pip-installs it, not editable; Ray there is the manifests' Ray."""
    doc = _load("aws-launcher.yaml")
    assert doc["file_mounts"]["~/caig-ray"] == "."
    assert (ROOT / doc["file_mounts"]["~/caig-ray"] / "pyproject.toml").is_file()
    setup = doc["setup_commands"]
    assert "pip install -c ~/caig-ray/constraints.txt ~/caig-ray" in setup
    assert not any(" -e " in c or "--editable" in c for c in setup)
    ray_pin = next(c for c in setup if "ray[" in c)
    assert f"=={_dockerfile_ray_version()}" in ray_pin
    assert "/.venv/" in doc["rsync_exclude"] and "/.git/" in doc["rsync_exclude"] and doc["rsync_filter"] == [".gitignore"]


def test_online_rayjob_resumes_and_its_renderers_land_on_the_renderer_group():
    from caig_ray.config import load_config

    job = _load("rayjob-online.yaml")
    args = _shell_words(job["spec"]["entrypoint"])
    assert args[:2] == ["caig-ray", "train"] and "--resume" in args
    assert _command_module(args) == "caig_ray.jobs.train"
    importlib.import_module("caig_ray.jobs.train")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["renderer"]["minReplicas"] == 0
    advertised = json_resources(groups["renderer"]["rayStartParams"]["resources"])
    renderers = load_config("gpu-cluster").resources.renderers
    assert set(renderers.resources) <= set(advertised)  # the preset's renderers fit that group
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def _iso_weeks_now() -> set[str]:
    now = datetime.now(timezone.utc)
    return {f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}" for t in (now - timedelta(minutes=5), now)}


def _flag(args, flag):
    return args[args.index(flag) + 1]


def test_weekly_online_job_writes_a_fresh_dated_run_and_takes_its_start_policy_from_the_env():
    """--out is this ISO week's folder (a retried attempt of the same week resumes its own run; the next
    week's launch gets a new one); --policy is the pretrained PM unless CAIG_START_POLICY names one."""
    cmd = _load("rayjob-online.yaml")["spec"]["entrypoint"]
    default = _shell_words(cmd)
    assert _flag(default, "--out") in {f"runs/caig-online-{w}" for w in _iso_weeks_now()}
    assert _flag(default, "--policy") == "/storage/checkpoints/caig-pm"
    assert _flag(_shell_words(cmd, CAIG_START_POLICY=""), "--policy") == "/storage/checkpoints/caig-pm"
    last_week = "/storage/runs/caig-online-2026-W19/policy"
    assert _flag(_shell_words(cmd, CAIG_START_POLICY=last_week), "--policy") == last_week


def test_online_start_policy_has_one_source_wherever_the_entrypoint_is_expanded():
    """The submitter pod (`ray job submit` runs there) and the head (the job supervisor's shell) read
    CAIG_START_POLICY from the same ConfigMap key."""
    spec = _load("rayjob-online.yaml")["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    refs = [_env(c)["CAIG_START_POLICY"]["valueFrom"]["configMapKeyRef"] for c in (head, submitter)]
    assert refs[0] == refs[1] and refs[0]["optional"] is True


def json_resources(value: str) -> dict:
    import json

    return json.loads(json.loads(value))  # KubeRay wants the JSON object as a quoted string


def _groups(doc):
    spec = doc["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _cluster_specs():
    yield "raycluster.yaml", _load("raycluster.yaml")
    for name in JOB_MANIFESTS:
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
    and the models it reads are there too -- with the entrypoint's shell parts expanded, both with and
    without CAIG_START_POLICY."""
    from caig_ray.config import load_config
    from caig_ray.storage import resolve_output

    storage = load_config("gpu-cluster").storage
    for manifest in JOB_MANIFESTS:
        cmd = _load(manifest)["spec"]["entrypoint"]
        for env in ({}, {"CAIG_START_POLICY": "/storage/runs/caig-online-2026-W19/policy"}):
            args = _shell_words(cmd, **env)
            out = resolve_output(storage, _flag(args, "--out"))
            assert str(out.local).startswith(storage + "/"), manifest
            for flag in ("--policy", "--rm"):
                if flag in args:
                    assert _flag(args, flag).startswith(storage + "/"), (manifest, flag)


def test_trainer_nodes_hold_the_presets_policy_bundles():
    from caig_ray.config import load_config

    res = load_config("gpu-cluster").resources
    for manifest in ("raycluster.yaml", *JOB_MANIFESTS):
        doc = dict(_cluster_specs())[manifest]
        limits = dict(_groups(doc))["trainer"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for role in (res.policy, res.reward_training, res.pretraining):  # PACK: one node holds every rank
            assert int(limits["nvidia.com/gpu"]) >= role.num_workers * role.num_gpus, manifest
            assert int(limits["cpu"]) >= role.num_workers * role.num_cpus, manifest


# ---------------------------------------------------------------------------------- closed by default


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env") or []}


def _ray_processes(manifest: str):
    """(where, env list) of every process of a manifest that talks to Ray: each container of each
    group, the autoscaler sidecar, and a RayJob's submitter."""
    doc = _load(manifest)
    spec = dict(_cluster_specs())[manifest]["spec"]
    for name, group in _groups({"spec": spec}):
        for c in group["template"]["spec"]["containers"]:
            yield f"{manifest} {name}/{c['name']}", c.get("env") or []
    if spec.get("enableInTreeAutoscaling"):
        yield f"{manifest} autoscaler", (spec.get("autoscalerOptions") or {}).get("env") or []
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            yield f"{manifest} submitter/{c['name']}", c.get("env") or []


def test_every_cluster_spec_turns_on_kuberays_token_auth_with_the_secret():
    """KubeRay's authOptions on every RayCluster spec (the RayJobs' rayClusterSpec, the RayService's
    rayClusterConfig): the operator then gives every Ray process the token and presents it itself on
    its calls to the head (RayJob status, RayService Serve config), which env vars alone cannot do."""
    from packaging.version import Version

    for manifest, doc in _cluster_specs():
        spec = doc["spec"]
        assert spec.get("authOptions") == AUTH_OPTIONS, manifest
        assert Version(spec["rayVersion"]) >= Version("2.52.0"), manifest  # KubeRay refuses token mode below


def test_no_container_sets_the_auth_env_kuberay_injects():
    """authOptions makes KubeRay add RAY_AUTH_MODE and RAY_AUTH_TOKEN to every group's Ray container,
    the autoscaler sidecar and a RayJob's submitter; a hand-written copy is at best redundant (KubeRay
    >= 1.6 skips a name already set) and at worst a duplicate env name (1.5.x appends)."""
    for manifest in KUBE_MANIFESTS:
        processes = list(_ray_processes(manifest))
        assert any("autoscaler" in where for where, _ in processes), manifest
        for where, env_list in processes:
            names = {e["name"] for e in env_list}
            assert not names & {*KUBERAY_AUTH_ENV, "RAY_AUTH_TOKEN_PATH"}, where


def _secret_refs(node):
    for n in _walk(node):
        if isinstance(n, dict) and isinstance(n.get("secretKeyRef"), dict):
            yield n["secretKeyRef"]


def test_every_hand_set_ray_auth_env_matches_the_secret_key():
    """Whatever Ray auth env a manifest still sets by hand agrees with the Secret KubeRay reads: mode
    token, the token from Secret ray-auth, key auth_token (required, never inline); and every
    reference to that Secret names that key."""
    for name, doc in _all_docs():
        for node in _walk(doc):
            if not (isinstance(node, dict) and isinstance(node.get("env"), list)):
                continue
            for e in node["env"]:
                if e.get("name") == "RAY_AUTH_MODE":
                    assert e.get("value") == "token", (name, e)
                if e.get("name") == "RAY_AUTH_TOKEN":
                    assert "value" not in e, name  # never the token itself in a manifest
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    assert {k: ref.get(k) for k in TOKEN_SECRET} == TOKEN_SECRET and not ref.get("optional"), name
        for ref in _secret_refs(doc):
            if ref.get("name") == TOKEN_SECRET["name"]:
                assert ref.get("key") == TOKEN_SECRET["key"], (name, ref)


def test_no_duplicate_env_names_in_any_container():
    """Every env list (each container, init container, the autoscaler's) names each variable once --
    also after KubeRay adds its auth variables the way v1.5.x does (appending)."""
    for name, doc in _all_docs():
        for node in _walk(doc):
            if isinstance(node, dict) and isinstance(node.get("env"), list):
                names = [e["name"] for e in node["env"]]
                assert len(names) == len(set(names)), (name, names)
    for manifest in KUBE_MANIFESTS:
        for where, env_list in _ray_processes(manifest):
            names = [e["name"] for e in env_list] + list(KUBERAY_AUTH_ENV)
            assert len(names) == len(set(names)), where


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _all_docs():
    for name in (*KUBE_MANIFESTS, "serve.yaml", "aws-launcher.yaml"):
        yield name, _load(name)
    yield "rayservice.yaml serveConfigV2", yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_no_manifest_disables_auth():
    for name in (*KUBE_MANIFESTS, "serve.yaml", "aws-launcher.yaml"):
        text = (CLUSTER / name).read_text()
        assert not re.search(r"disabled", re.sub(r"#.*", "", text)), name  # no `disabled` mode anywhere
        assert not re.search(r"RAY_AUTH_MODE\s*=\s*\"?disabled", text), name
        assert not re.search(r"(value|mode):\s*[\"']?disabled", text), name
    for name, doc in _all_docs():
        for node in _walk(doc):
            if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
                assert node.get("value") == "token", name
            if isinstance(node, dict) and "authOptions" in node:
                assert (node["authOptions"] or {}).get("mode") == "token", name
            if isinstance(node, str):
                assert not re.search(r"RAY_AUTH_MODE=(?!token\b)", node), (name, node)
    launcher = _load("aws-launcher.yaml")
    for cmd in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.startswith("RAY_AUTH_MODE=token "), cmd
    assert launcher["file_mounts"]["~/.ray/auth_token"]  # every node gets the cluster's token at Ray's default path


def test_nothing_is_exposed_outside_the_cluster():
    """No Service of type LoadBalancer or NodePort; every head Service is ClusterIP; the launcher's
    dashboard stays on the head's localhost (reached through `ray dashboard`, an SSH tunnel)."""
    for name, doc in _all_docs():
        for node in _walk(doc):
            if isinstance(node, dict):
                for key in ("type", "serviceType"):
                    assert node.get(key) not in ("LoadBalancer", "NodePort"), (name, node)
    for manifest, doc in _cluster_specs():
        assert doc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", manifest
    launcher = _load("aws-launcher.yaml")
    for cmd in launcher["head_start_ray_commands"]:
        assert "dashboard-host" not in cmd, cmd  # Ray's default: localhost


def test_the_serve_endpoint_requires_its_api_key_on_every_node_that_builds_or_runs_it():
    """RayService: serve.api_key_env names a variable every Ray container sets from a Secret (the
    application is built, and its replicas run, on any of them)."""
    svc = _load("rayservice.yaml")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    name = app["args"]["serve"]["api_key_env"]
    spec = svc["spec"]["rayClusterConfig"]
    for group_name, group in _groups({"spec": spec}):
        for c in group["template"]["spec"]["containers"]:
            ref = _env(c)[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and not ref.get("optional"), group_name


# ---------------------------------------------------------------------------------------- the image


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _dockerfile_tag() -> str:
    (tag,) = set(re.findall(r"docker build -t (\S+) \.", _dockerfile()))
    return tag


def _dockerfile_ray_version() -> str:
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", _dockerfile(), re.M)
    return version


def _images(node):
    for n in _walk(node):
        if isinstance(n, dict) and "image" in n and isinstance(n.get("name"), str):
            yield n["image"]


def test_every_manifest_runs_the_image_the_dockerfile_builds():
    tag = _dockerfile_tag()
    assert tag == "caig-ray:latest"
    for manifest in KUBE_MANIFESTS:
        images = list(_images(_load(manifest)))
        assert images and set(images) == {tag}, (manifest, images)
    for manifest, doc in _cluster_specs():
        assert doc["spec"]["rayVersion"] == _dockerfile_ray_version(), manifest  # the image's Ray


def test_dockerfile_installs_the_project_offline_ready_and_not_editable():
    text = _dockerfile()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    major, minor = (int(x) for x in re.match(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda", base).groups())
    assert (major, minor) >= (2, 6)  # pyproject: torch>=2.6, a CUDA build
    assert re.search(r"^ENV HF_HUB_OFFLINE=1\b", text, re.M)
    installs = [run for run in _dockerfile_runs() if "pip install" in run]
    assert installs and not any(" -e " in run or "--editable" in run for run in installs)
    assert any(re.search(r"pip install .* \.(\s|$)", run) for run in installs)


# the build's copy of constraints.txt, less the pins the base image's torch does not accept
IMAGE_CONSTRAINTS = "/tmp/constraints-image.txt"


def _dockerfile_runs() -> list[str]:
    """Each RUN instruction's shell command, its continuation lines joined as Docker joins them."""
    joined = re.sub(r"\\\n", "", _dockerfile())
    return [line[len("RUN "):] for line in joined.splitlines() if line.startswith("RUN ")]


def _constraint_pins() -> list[str]:
    return [s.strip() for s in (ROOT / "constraints.txt").read_text().splitlines()
            if s.strip() and not s.startswith("#")]


def test_the_image_and_the_launcher_install_with_the_repos_constraints():
    """Both installs pin every dependency to constraints.txt (what CI ran with): the Dockerfile copies it
    into the build and installs with it (through the build's copy, see the next test); the launcher's
    nodes install with the checkout's copy."""
    copied = [src for srcs, dest in _dockerfile_copies() for src in srcs if dest == "./"]
    assert "constraints.txt" in copied
    (make,) = [r for r in _dockerfile_runs() if f"constraints.txt {IMAGE_CONSTRAINTS}" in r]
    (install,) = [r for r in _dockerfile_runs() if re.search(r"pip install .* \.(\s|$)", r)]
    assert re.search(rf"pip install -c {IMAGE_CONSTRAINTS} -c /tmp/torch-constraints.txt ", install), install
    assert _dockerfile_runs().index(make) < _dockerfile_runs().index(install)  # made before it is used
    ray_pin = [p for p in _constraint_pins() if p.lower().startswith("ray==")]
    assert ray_pin == [f"ray=={_dockerfile_ray_version()}"]  # the image's Ray is the constraints' Ray
    assert not [p for p in _constraint_pins() if p.lower().startswith("torch==")]  # the base's CUDA torch stays
    setup = _load("aws-launcher.yaml")["setup_commands"]
    installs = [c for c in setup if "pip install" in c]
    assert installs and all(c.startswith("pip install -c ~/caig-ray/constraints.txt ") for c in installs), installs


def _run_image_constraints_step(tmp_path, pythonpath=None):
    (make,) = [r for r in _dockerfile_runs() if f"constraints.txt {IMAGE_CONSTRAINTS}" in r]
    out = tmp_path / "constraints-image.txt"
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    res = subprocess.run(["/bin/sh", "-c", make.replace(IMAGE_CONSTRAINTS, str(out))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, out.read_text().splitlines()


def test_the_image_keeps_every_constraint_the_base_torch_accepts(tmp_path):
    """The Dockerfile's step that makes the build's constraints, run as Docker runs it: with CI's own torch
    (this venv's) it keeps every pin; with torch 2.6.0 (the default base image's, which requires
    sympy==1.13.1) it leaves out only the sympy pin, and says so."""
    stdout, kept = _run_image_constraints_step(tmp_path)
    assert kept == _constraint_pins(), stdout
    fake = tmp_path / "site"
    (fake / "torch-2.6.0.dist-info").mkdir(parents=True)
    (fake / "torch-2.6.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.6.0\nRequires-Dist: filelock\n"
        "Requires-Dist: typing-extensions>=4.10.0\nRequires-Dist: networkx\n"
        "Requires-Dist: triton==3.2.0; platform_system == \"Linux\" and platform_machine == \"x86_64\"\n"
        "Requires-Dist: setuptools; python_version >= \"3.12\"\n"
        "Requires-Dist: sympy==1.13.1; python_version >= \"3.9\"\n"
        "Requires-Dist: opt-einsum>=3.3; extra == \"opt-einsum\"\n")
    stdout, kept = _run_image_constraints_step(tmp_path, pythonpath=fake)
    (sympy,) = [p for p in _constraint_pins() if p.lower().startswith("sympy==")]
    assert sympy != "sympy==1.13.1"  # else this case tests nothing
    assert kept == [p for p in _constraint_pins() if p != sympy] and sympy in stdout, stdout


def _dockerfile_copies() -> list[tuple[list[str], str]]:
    out = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY "):
            *srcs, dest = line.split()[1:]
            out.append((srcs, dest))
    return out


def test_dockerignore_keeps_the_context_small_and_the_copied_sources_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for must in (".venv", ".git", "runs", "bench/results/*.png"):
        assert must in patterns, must
    for srcs, _ in _dockerfile_copies():
        for src in srcs:
            assert src not in patterns, src


def test_the_wheel_the_image_installs_holds_the_package_and_no_top_level_jobs(tmp_path):
    """Build, from exactly what the Dockerfile copies, the wheel its `pip install .` installs."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for srcs, dest in _dockerfile_copies():
        for name in srcs:
            path = ROOT / name
            if path.is_dir():  # Docker copies a directory's contents into dest
                shutil.copytree(path, src / dest, ignore=skip, dirs_exist_ok=True)
            else:
                shutil.copy2(path, src / dest / path.name if dest.endswith("/") else src / dest)
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    (wheel,) = dist.glob("caig_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("caig_ray/jobs/cli.py", "caig_ray/jobs/serve_rm.py", "caig_ray/jobs/train.py",
                 "caig_ray/actors/scorer.py", "caig_ray/presets/gpu-cluster.yaml"):
        assert must in names, must
    # every module of the checkout (a new subpackage or folder too: it must be in pyproject's packages and
    # in a COPY line, or the image lacks it and fails at import on the cluster only)
    home = {"caig_ray": "caig_ray", "actors": "caig_ray/actors", "dataplane": "caig_ray/dataplane",
            "jobs": "caig_ray/jobs"}
    modules = {home[top] + "/" + path.relative_to(ROOT / top).as_posix()
               for top in home for path in (ROOT / top).rglob("*.py") if "__pycache__" not in path.parts}
    assert modules - set(names) == set(), "modules of the checkout missing from the image's wheel"
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"jobs", "actors", "dataplane"}, tops
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "caig-ray = caig_ray.jobs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_cluster_readme_names_real_config_keys_and_points_to_the_docs():
    text = (CLUSTER / "README.md").read_text()
    assert "online.renderers" not in text and "resources.renderers.resources" in text
    assert "docs/cluster.md" in text and (ROOT / "docs" / "cluster.md").is_file()
