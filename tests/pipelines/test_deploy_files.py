"""Everything in deploy/ parses and names commands, configs, images, Secrets and volumes that
exist: the Serve config, the container file, the KubeRay manifests and the cluster config."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

from attribution_core.config import ProjectConfig, from_mapping
from pipelines.serve.app import IMPORT_PATH, ServeArgs
from pipelines.serve.messages import ServedVersion
from pipelines.serve.runner import application_config

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_parses_and_names_the_builder_the_config_and_the_deployments():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = ServeArgs(**app.args)
    cfg = ProjectConfig.load(ROOT / args.config)
    ours = application_config(ServeArgs(config=str(ROOT / args.config)))
    assert [d["name"] for d in raw["applications"][0]["deployments"]] == [d["name"] for d in ours["deployments"]]
    assert len(ours["deployments"]) == 1 + cfg.serve.partitions
    for deployment in raw["applications"][0]["deployments"]:
        assert set(deployment["user_config"]) == set(ours["deployments"][0]["user_config"])
        from_mapping(ServedVersion, deployment["user_config"], "user_config")  # what each replica rebuilds


# ---------------------------------------------------------------- the cluster (deploy/kuberay)
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"


def manifests() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in manifests() if doc["kind"] == kind]


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"the Makefile defines no {name}"
    return match.group(1)


def built_images() -> set[str]:
    """The tags `make image-cpu` / `make image-gpu` build."""
    image, tag = make_variable("IMAGE"), make_variable("IMAGE_TAG")
    return {f"{image}:{tag}-cpu", f"{image}:{tag}-gpu"}


def pod_specs(doc: dict) -> list[dict]:
    """Every pod template of a RayJob / RayService / CronJob."""
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def image_path(path: str) -> Path:
    """A path inside the image -> the repository file the Dockerfile copies there."""
    workdir = re.search(r"^WORKDIR\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert path.startswith(workdir + "/"), f"{path} is not under the image's WORKDIR {workdir}"
    rel = path[len(workdir) + 1:]
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = {s for line in copied for s in line.split()}
    assert rel.split("/")[0] in sources, f"{rel} is not copied into the image (COPY sources: {sorted(sources)})"
    assert (ROOT / rel).is_file(), f"{path} names {rel}, which is not in the repository"
    return ROOT / rel


def test_every_deploy_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.name for p in files} >= {"serve_config.yaml", "cluster.yaml", "index-rayjob.yaml", "reindex-rayjob.yaml",
                                       "reindex-cronjob.yaml", "rayservice.yaml", "secrets.example.yaml"}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} is empty"
    ProjectConfig.load(DEPLOY / "cluster.yaml")
    body = {"Secret": {"stringData"}, "ServiceAccount": set(), "Role": {"rules"}, "RoleBinding": {"roleRef", "subjects"}}
    for name, doc in manifests():
        assert {"apiVersion", "kind", "metadata", *body.get(doc["kind"], {"spec"})} <= set(doc), name


def test_container_file_builds_on_the_pinned_ray_image_and_installs_the_project():
    import ray

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-{py}-cpu"
    assert make_variable("RAY_IMAGE") == f"rayproject/ray:{ray.__version__}-{py}"  # + -cpu / -gpu
    assert "FROM ${RAY_IMAGE}" in dockerfile
    constraints = (ROOT / "constraints.txt").read_text()
    for pin in re.findall(r'"(torch==[\d.]+)"', dockerfile):
        assert pin in constraints.splitlines(), f"{pin} differs from constraints.txt"
    assert f"ray=={ray.__version__}" in constraints.splitlines()
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for source in line.split():
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "artifacts/" in ignored  # the build context stays small
    makefile = (ROOT / "Makefile").read_text()
    assert "image-cpu:" in makefile and "image-gpu:" in makefile and "-f deploy/Dockerfile" in makefile


def test_ray_manifests_run_commands_configs_and_images_that_exist():
    import ray

    from pipelines.cli import build_parser

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    jobs = of_kind("RayJob")
    assert {n for n, _ in jobs} == {"index-rayjob.yaml", "reindex-rayjob.yaml"}
    for name, doc in jobs + of_kind("RayService"):
        assert doc["apiVersion"] == "ray.io/v1", name
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__, name
        for pod in pod_specs(doc):
            for container in pod["containers"]:
                assert container["image"] in built_images(), f"{name}: {container['image']} is not built by make"
    for name, doc in jobs:
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] in scripts, f"{name}: {argv[0]} is not a console script of the project"
        args = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command or flag
        assert args.command == "reindex" and args.json
        cfg = ProjectConfig.load(image_path(args.config))
        assert cfg.index.actors == 0  # 0: one featurizing actor per GPU
        gpu_groups = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == "1"]
        assert gpu_groups, f"{name} has no GPU worker group"
    (_, full), = [j for j in jobs if j[0] == "index-rayjob.yaml"]
    assert "--full" in shlex.split(full["spec"]["entrypoint"])


def test_rayservice_serves_the_serve_config_with_the_cluster_paths():
    from ray.serve.schema import ServeDeploySchema

    (_, service), = of_kind("RayService")
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert app.import_path == IMPORT_PATH
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = ServeArgs(**app.args)
    cfg = ProjectConfig.load(image_path(args.config))
    assert args.index == cfg.index.out and args.model == cfg.model.path
    ours = application_config(ServeArgs(config=str(image_path(args.config))))
    deployments = raw["applications"][0]["deployments"]
    assert [d["name"] for d in deployments] == [d["name"] for d in ours["deployments"]]
    for deployment in deployments:
        assert deployment["user_config"] == {**ours["deployments"][0]["user_config"], "index": cfg.index.out}
    assert raw["http_options"]["port"] == cfg.serve.port
    # The reindex jobs wait for this endpoint through KubeRay's serve Service.
    assert cfg.reindex.endpoint == f"http://{service['metadata']['name']}-serve-svc:{cfg.serve.port}"


def test_secrets_and_volumes_are_the_ones_defined():
    secrets = {doc["metadata"]["name"]: doc["stringData"] for _, doc in of_kind("Secret")}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets["attribution-s3"])
    cfg = ProjectConfig.load(DEPLOY / "cluster.yaml")
    assert cfg.serve.api_key_env in secrets["attribution-api-key"]
    assert cfg.index.out.startswith("s3://") and cfg.data.uri.startswith("s3://")
    for name, doc in of_kind("RayJob") + of_kind("RayService"):
        for pod in pod_specs(doc):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            for container in pod["containers"]:
                refs = {e["secretRef"]["name"] for e in container.get("envFrom", [])}
                assert "attribution-s3" in refs and refs <= set(secrets), f"{name}: secrets {refs}"
                mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                assert set(mounts) <= set(claims) and set(claims.values()) == {"attribution-models"}, name
                assert any(cfg.model.path.startswith(p + "/") for p in mounts.values()), name


def test_cronjob_creates_the_reindex_rayjob_with_the_rights_it_needs():
    (name, cron), = of_kind("CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = pod_specs(cron)[0]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    assert re.fullmatch(r"[\w./-]+:v\d+\.\d+\.\d+", container["image"])  # a pinned kubectl, not :latest
    mounted = Path(container["command"][3])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(mounted.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # The ConfigMap is made from the RayJob file, as the file's header says.
    text = (KUBERAY / "reindex-cronjob.yaml").read_text()
    assert (f"kubectl create configmap {volume['configMap']['name']} "
            f"--from-file=deploy/kuberay/{mounted.name}") in text
    assert (KUBERAY / mounted.name).is_file()
    account = pod["serviceAccountName"]
    assert [d for _, d in of_kind("ServiceAccount") if d["metadata"]["name"] == account]
    (binding,) = [d for _, d in of_kind("RoleBinding") if d["subjects"][0]["name"] == account]
    (role,) = [d for _, d in of_kind("Role") if d["metadata"]["name"] == binding["roleRef"]["name"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"])


def test_one_gpu_pool_split_between_the_endpoint_and_the_index_job():
    """deploy/README.md, "One GPU pool": the endpoint's model replicas take a fraction of the
    RayService's GPUs, and an index job on that cluster takes the GPUs they leave whole."""
    from pipelines.index.actors import gpu_actors_that_fit

    cfg = ProjectConfig.load(DEPLOY / "cluster.yaml")
    (_, service), = of_kind("RayService")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
    gpus = sum(g["replicas"] * int(lim.get("nvidia.com/gpu", 0)) for g, lim in zip(groups, limits))
    held = cfg.serve.featurizer_replicas * cfg.serve.gpus_per_replica
    assert 0 < cfg.serve.gpus_per_replica < 1 and held <= gpus
    assert cfg.index.actors == 0 and cfg.index.gpus_per_actor == 1
    for pool in (gpus, 8):  # the RayService as shipped, and grown to a pool of 8
        expected = pool - cfg.serve.featurizer_replicas if pool > cfg.serve.featurizer_replicas else 1
        assert gpu_actors_that_fit(pool, pool - held, cfg.index.gpus_per_actor) == expected
    readme = (DEPLOY / "README.md").read_text()
    for key in ("serve.gpus_per_replica", "serve.featurizer_replicas", "index.gpus_per_actor", "index.actors"):
        assert f"`{key}`" in readme.split("## One GPU pool")[1].split("\n## ")[0], key
